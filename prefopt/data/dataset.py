"""Small data as lists: sources to validated examples, with an optional held-out split (evaluation, tools)."""

from __future__ import annotations

from prefopt.data.cache import held_out_positions
from prefopt.data.files import read_records
from prefopt.data.formats import NormaliseReport, normalise


def load_examples(paths, fmt: str | None = None) -> tuple[list, NormaliseReport]:
    """Read, detect the format (unless given), validate and de-duplicate."""
    return normalise(read_records(paths), fmt)


def split_held_out(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A fixed-seed random split: (train, held-out), as training splits its cached table
    (prefopt.data.cache.held_out_positions). Both sides keep at least one example."""
    kept, held = held_out_positions(len(examples), fraction, seed)
    return [examples[i] for i in kept], [examples[i] for i in held]
