"""The output folder: what a run writes there, and how other people's files are protected.

A run writes only these names: config.yaml, data-fingerprint.json, metrics.jsonl, summary.json,
checkpoint-N/, final/, .staging/ and .staging-final/ (being written), and the marker .prefopt-run.
A folder holding anything else is not a prefopt run: it is written into only with --overwrite,
and even then a file of the user's with one of our names is never replaced. --overwrite on an
earlier run removes only that run's outputs. An earlier run that never started (no checkpoint,
no final model, no logged step: its first try failed) is replaced without --overwrite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from prefopt.errors import PrefoptError

MARKER = ".prefopt-run"
_OURS = re.compile(
    r"^(config\.yaml|data-fingerprint\.json|metrics\.jsonl|summary\.json|final|checkpoint-\d+|tmp-checkpoint-\d+"
    r"|\.staging|\.staging-final|runs|\.prefopt-run)$"
)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def is_prefopt_run(folder: Path) -> bool:
    return (folder / MARKER).exists()


def checkpoints(folder: Path) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def logged_steps(folder: Path) -> int:
    """The highest training step in metrics.jsonl (0: none)."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        return 0
    last = 0
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(entry, dict) and "loss" in entry:
            last = max(last, int(entry.get("step", 0)))
    return last


def is_started(folder: Path) -> bool:
    """Has a run in `folder` done anything worth keeping: a checkpoint, a final model, a logged step?"""
    folder = Path(folder)
    return bool(
        checkpoints(folder)
        or (folder / "final").exists()
        or (folder / "summary.json").exists()
        or logged_steps(folder) > 0
    )


def prepare_output_dir(folder: str | Path, resume: bool, overwrite: bool) -> Path:
    """Check the folder is ours to write, before any model is loaded. Returns it, created."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PrefoptError(f"output_dir {folder} is a file")
    entries = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    if entries:
        ours = is_prefopt_run(folder)
        if ours and resume:
            pass
        elif ours and (overwrite or not is_started(folder)):
            for name in entries:
                if _OURS.match(name) and name != MARKER:
                    target = folder / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
        elif ours:
            raise PrefoptError(
                f"output_dir {folder} holds an earlier run: pass --resume to continue it or --overwrite to replace it"
            )
        elif resume:
            raise PrefoptError(f"--resume: {folder} is not a prefopt run (no {MARKER})")
        elif not overwrite:
            raise PrefoptError(
                f"output_dir {folder} is not empty and is not a prefopt run; choose another folder "
                "or pass --overwrite to write into it (your files there are kept)"
            )
        else:
            clashes = [name for name in entries if _OURS.match(name)]
            if clashes:
                raise PrefoptError(
                    f"output_dir {folder} has your own {', '.join(clashes)}, which a run would replace; "
                    "choose another folder"
                )
    elif resume:
        raise PrefoptError(f"--resume: {folder} has no run to continue")
    _check_writable(folder)
    (folder / MARKER).write_text("This folder holds a prefopt run.\n")
    return folder


def _check_writable(folder: Path, probe_bytes: int = 1 << 20) -> None:
    """Fail before training starts when the folder cannot be written or the disk is full."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-") as probe:
            probe.write(b"\0" * probe_bytes)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        raise PrefoptError(f"output_dir {folder} is not writable: {error.strerror or error}") from None
