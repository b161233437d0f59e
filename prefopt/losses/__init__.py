"""The loss registry (public API). See docs/design.md §2 and the README's "Custom losses".

from prefopt.losses import LossInputs, LossOutput, register_loss, get_loss, available_losses
"""

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

# Importing a module registers the losses it defines.
from prefopt.losses import (  # noqa: E402,F401  isort: skip
    apo,
    bco_pair,
    dpo,
    dpop,
    exo_pair,
    grpo,
    hinge,
    ipo,
    kto,
    nca_pair,
    orpo,
    reinforce_pp,
    remax,
    rloo,
    robust,
    sft,
    simpo,
    sppo_hard,
    tdpo,
)

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
