"""Decisions every process takes together (DESIGN §7): one process alone skipping a batch or
stopping would leave the others waiting in a collective until the timeout."""

from __future__ import annotations

import os

import torch


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch) started; 1 without one. Read
    from its environment, so it is known before any process group or model exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def any_process(flag: bool, device: torch.device | str) -> bool:
    """True when `flag` is True in any process of the default process group (one vote each);
    `flag` itself when there is no group or it has one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    vote = torch.tensor([float(flag)], device=device)
    dist.all_reduce(vote, op=dist.ReduceOp.SUM)
    return bool(vote.item() > 0)
