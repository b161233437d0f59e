"""Validators for hyperparameter values: each returns None when fine, else the reason."""

from __future__ import annotations

from collections.abc import Callable

Check = Callable[[float], "str | None"]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive(value) -> str | None:
    if not _number(value) or not value > 0:
        return f"must be a number > 0, got {value!r}"
    return None


def non_negative(value) -> str | None:
    if not _number(value) or not value >= 0:
        return f"must be a number >= 0, got {value!r}"
    return None


def half_open(low: float, high: float) -> Check:
    """Value in [low, high)."""

    def check(value) -> str | None:
        if not _number(value) or not low <= value < high:
            return f"must be in [{low}, {high}), got {value!r}"
        return None

    return check


def open_interval(low: float, high: float) -> Check:
    """Value in (low, high)."""

    def check(value) -> str | None:
        if not _number(value) or not low < value < high:
            return f"must be in ({low}, {high}), got {value!r}"
        return None

    return check


def optional(check: Check) -> Check:
    """None is allowed (meaning "derive it"), anything else must pass `check`."""

    def wrapped(value) -> str | None:
        return None if value is None else check(value)

    return wrapped


def one_of(*names: str) -> Check:
    """Value is one of a few names (e.g. a normalisation)."""

    def check(value) -> str | None:
        if value not in names:
            return f"must be one of {', '.join(names)}, got {value!r}"
        return None

    return check


def closed(low: float, high: float) -> Check:
    """Value in [low, high]."""

    def check(value) -> str | None:
        if not _number(value) or not low <= value <= high:
            return f"must be in [{low}, {high}], got {value!r}"
        return None

    return check
