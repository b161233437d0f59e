"""From file paths to validated examples, with an optional held-out split."""

from __future__ import annotations

import random

from prefopt.data.files import DataError, read_records
from prefopt.data.formats import NormaliseReport, normalise


def load_examples(paths, fmt: str | None = None) -> tuple[list, NormaliseReport]:
    """Read, detect the format (unless given), validate and de-duplicate."""
    return normalise(read_records(paths), fmt)


def split_held_out(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A fixed-seed random split: (train, held-out). Both sides keep at least one example."""
    if not 0 < fraction < 1:
        raise DataError(f"eval_fraction must be in (0, 1), got {fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    if n_eval < 1:
        raise DataError(f"cannot hold out {fraction:.0%} of {len(examples)} example(s)")
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]
