"""The loss registry (public API). See docs/design.md and docs/losses.md, "Custom losses".

from prefopt.losses import LossInputs, LossOutput, register_loss, get_loss, available_losses
"""

# Importing a module registers the losses it defines: every module of this package whose name does
# not start with "_" is a loss module, so a new loss is one new file and touches nothing else.
import importlib as _importlib  # noqa: E402
import pkgutil as _pkgutil  # noqa: E402

from prefopt.losses.base import LossError, LossInputs, LossOutput
from prefopt.losses.registry import (
    LossSpec,
    available_losses,
    get_loss,
    get_loss_spec,
    register_loss,
    temporary_losses,
    unregister_loss,
)

_NOT_LOSSES = {"base", "registry", "checks"}
for _module in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _module.name.startswith("_") and _module.name not in _NOT_LOSSES:
        _importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "LossError",
    "LossInputs",
    "LossOutput",
    "LossSpec",
    "available_losses",
    "get_loss",
    "get_loss_spec",
    "register_loss",
    "temporary_losses",
    "unregister_loss",
]
