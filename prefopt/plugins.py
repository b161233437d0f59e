"""Import user code that registers losses (`--loss-module`): only what the user names."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from prefopt.errors import PrefoptError


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
        spec.loader.exec_module(module)
        return
    try:
        importlib.import_module(name_or_path)
    except ModuleNotFoundError as error:
        raise PrefoptError(f"--loss-module: cannot import '{name_or_path}': {error}") from None
