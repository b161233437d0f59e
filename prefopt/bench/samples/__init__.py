"""Sample data the programs read (the demo's conversations, the benchmarks' HH-style pairs and
arithmetic prompts), shipped inside the package so an installed wheel runs them from any folder.
`data_samples/` in the repository links to these files for users' examples."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

NAMES = ("arithmetic.jsonl", "conversational.jsonl", "feedback_logs.jsonl", "hh_style.jsonl", "standard.jsonl")


def sample_path(name: str) -> Path:
    """A real file path of the packaged sample `name` (wheels and editable installs alike)."""
    if name not in NAMES:
        raise ValueError(f"no packaged sample {name!r}; there are {', '.join(NAMES)}")
    # pip installs a wheel unpacked, so the resource is a plain file on disk (not inside a zip)
    return Path(str(files(__package__).joinpath(name)))
