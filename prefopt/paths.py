"""Where prefopt keeps what it can make again: converted models, reference log-probs, tokenized data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$PREFOPT_CACHE, else ~/.cache/prefopt."""
    return Path(os.environ.get("PREFOPT_CACHE", Path.home() / ".cache" / "prefopt"))
