"""The README and docs/ hold up: their examples run, their links and commands are real.

- The custom-loss example in docs/losses.md runs as written.
- Every relative link in README.md and docs/*.md points to an existing file (and heading, for
  `page.md#anchor`), and the README's map names every docs page.
- README.md stays short (the rest lives in docs/).
- Every `prefopt ...` command in a bash/sh/console block parses with the real CLI parser.
- Every `python -m prefopt.X` the docs name is a module that exists.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
SHELL_BLOCKS = {"bash", "sh", "console"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every ``` block."""
    return re.findall(r"^```(\w*)[^\n]*\n(.*?)^```", text, flags=re.S | re.M)


def shell_commands(path: Path) -> list[str]:
    """The `prefopt ...` lines of the page's shell blocks: continuations joined, `$ ` dropped,
    lines with `...` or `<...>` placeholders left out."""
    commands = []
    for language, body in fenced_blocks(path.read_text()):
        if language not in SHELL_BLOCKS:
            continue
        lines, current = [], ""
        for line in body.splitlines():
            if line.rstrip().endswith("\\"):
                current += line.rstrip()[:-1] + " "
                continue
            lines.append(current + line)
            current = ""
        for line in lines:
            line = line.strip().removeprefix("$ ")
            if line.startswith("prefopt ") and "..." not in line and "<" not in line:
                commands.append(line)
    return commands


def test_custom_loss_example_runs(capsys):
    page = ROOT / "docs" / "losses.md"
    block = next(body for language, body in fenced_blocks(page.read_text()) if "register_loss(" in body)
    exec(compile(block, str(page), "exec"), {})  # conftest's fixture unregisters "scaled_dpo" afterwards
    assert capsys.readouterr().out.strip().startswith("tensor(1.6631")


def relative_links(path: Path) -> list[str]:
    """Targets of [text](target) and ![alt](target) links that are not URLs or in-page anchors."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # not inside code blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # nor inside inline code
    targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_point_to_files(page):
    missing = [t for t in relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{rel(page)}: links to missing files: {missing}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_link_anchors_name_headings(page):
    wrong = []
    for target in relative_links(page):
        file, _, anchor = target.partition("#")
        linked = page.parent / file
        if anchor and linked.suffix == ".md" and linked.is_file() and anchor not in anchors(linked):
            wrong.append(target)
    assert not wrong, f"{rel(page)}: links to headings that do not exist: {wrong}"


def test_every_docs_page_is_in_the_readme_map():
    named = {t.split("#")[0] for t in relative_links(README) if t.startswith("docs/") and t.endswith(".md")}
    assert named, "the README names no docs pages"
    assert all((ROOT / t).is_file() for t in named), sorted(t for t in named if not (ROOT / t).is_file())
    unnamed = sorted(rel(page) for page in DOCS if rel(page) not in named)
    assert not unnamed, f"docs pages the README's map does not name: {unnamed}"


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= 250, f"README.md has {lines} lines; move detail into docs/"


COMMANDS = [(page, command) for page in PAGES for command in shell_commands(page)]


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 20, COMMANDS  # the extraction still finds them


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[f"{rel(p)}:{c[:60]}" for p, c in COMMANDS])
def test_documented_commands_parse(page, command):
    from prefopt.cli.main import build_parser

    try:
        build_parser().parse_args(shlex.split(command, comments=True)[1:])
    except SystemExit as exit:
        if exit.code not in (0, None):  # --help / --version exit 0
            pytest.fail(f"{rel(page)}: `{command}` does not parse (exit {exit.code})")


MODULES = sorted(
    {(rel(page), m) for page in PAGES for m in re.findall(r"python -m (prefopt(?:\.\w+)*)", page.read_text())}
)


def test_the_docs_name_python_modules():
    assert any(module == "prefopt.bench.dpo" for _, module in MODULES), MODULES


@pytest.mark.parametrize(("page", "module"), MODULES, ids=[f"{p}:{m}" for p, m in MODULES])
def test_python_m_modules_exist(page, module):
    assert importlib.util.find_spec(module) is not None, f"{page}: `python -m {module}`: no such module"
