"""User-facing errors: the CLI prints their message and exits non-zero, with no traceback."""


class PrefoptError(Exception):
    """Something the user can fix: bad input, bad configuration, bad option."""
