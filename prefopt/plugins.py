"""Import user code that registers losses (`--loss-module`): only what the user names."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from pathlib import Path

from prefopt.errors import PrefoptError


def _failing_line(error: Exception, resolved: str, shown: str) -> str:
    """'FILE:LINE: Error: message' for an exception raised while importing the file `resolved`:
    the syntax error's own line, else the deepest frame of the traceback in that file."""
    line = error.lineno if isinstance(error, SyntaxError) and error.filename == resolved else None
    if line is None:
        frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == resolved]
        line = frames[-1].lineno if frames else None
    message = error.msg if isinstance(error, SyntaxError) else str(error)
    return f"{shown}{f':{line}' if line else ''}: {type(error).__name__}: {message}"


def import_loss_module(name_or_path: str) -> None:
    """Import a module by dotted name, or a .py file by path; its `@register_loss` calls run."""
    path = Path(name_or_path)
    if name_or_path.endswith(".py"):
        if not path.is_file():
            raise PrefoptError(f"--loss-module: file not found: {name_or_path}")
        # Keyed by the resolved path, not the stem: two files named losses.py in different folders
        # are two modules (the second was silently skipped), while one file named twice, by any
        # relative path or symlink, is imported once.
        resolved = str(path.resolve())
        module_name = f"prefopt_user_{path.stem}_{hashlib.sha1(resolved.encode()).hexdigest()[:12]}"
        if module_name in sys.modules:
            return
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as error:  # the user's code failed: where, and why, in one line
            del sys.modules[module_name]  # not half-imported: a fixed file is imported again
            raise PrefoptError(f"--loss-module {_failing_line(error, resolved, name_or_path)}") from None
        return
    try:
        importlib.import_module(name_or_path)
    except ModuleNotFoundError as error:
        raise PrefoptError(f"--loss-module: cannot import '{name_or_path}': {error}") from None
