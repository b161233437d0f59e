"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_custom_loss_example_runs(capsys):
    block = next(b for b in python_blocks() if "register_loss(" in b)
    exec(compile(block, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip().startswith("tensor(1.6631")
