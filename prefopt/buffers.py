"""Gradients and Adam moments in one contiguous block each (the flat buffers of ZeRO/Apex, unsharded).

Why: on the CPU, PyTorch allocates through glibc malloc. Gradients (created during backward) and
Adam's moments (created at the first optimizer step) are long-lived tensors of 0.1-4 MB, and malloc
puts them between the step's temporaries, which have the same sizes; the holes between them are
neither reused well nor returned to the system, so peak RSS ends up well above what is alive.
Measured on the benchmark run (SmolLM2-135M, DPO, gradient checkpointing): at the end of backward
0.6 GB of the heap was free but held (mallinfo2), peak RSS 3.78 GB; with the two blocks, allocated
before the first step (large enough that malloc maps each on its own), the heap holds only
temporaries and the peak is 3.60 GB.

Same arithmetic: autograd accumulates into the views in place (as it does into any existing
gradient), and the optimizer reads and writes ordinary tensors. A parameter that got no gradient
in a step is given ``grad = None`` again before the optimizer step, as ``zero_grad(set_to_none=True)``
would leave it, so optimizers skip it exactly as before.
"""

from __future__ import annotations

import inspect

import torch


def _blocks(tensors: list[torch.Tensor], copies: int) -> list[list[torch.Tensor]]:
    """`copies` zeroed views shaped like each tensor, all in one block per (dtype, device)."""
    views: list[list[torch.Tensor]] = [[] for _ in tensors]
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    for (dtype, device), members in groups.items():
        block = torch.zeros(copies * sum(tensors[i].numel() for i in members), dtype=dtype, device=device)
        offset = 0
        for _ in range(copies):
            for i in members:
                n = tensors[i].numel()
                views[i].append(block[offset : offset + n].view_as(tensors[i]))
                offset += n
    return views


class ContiguousBuffers:
    """Gradient views for `params` (attach before backward, release the untouched before the optimizer
    step) and, once, the optimizer's Adam moments as views of one block."""

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad and p.is_contiguous()]
        self.grads = {p: views[0] for p, views in zip(self.params, _blocks(self.params, 1), strict=True)}
        self._touched: set[torch.Tensor] = set()
        self._hooks = [p.register_post_accumulate_grad_hook(self._touched.add) for p in self.params]
        self.optimizer_state_adopted = False

    def close(self) -> None:
        """Remove the hooks (the model outlives the run in a notebook)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def attach_gradients(self) -> None:
        """Give every parameter without a gradient its (zeroed) view, so backward writes there."""
        for p, view in self.grads.items():
            if p.grad is None:
                view.zero_()
                p.grad = view

    def release_untouched(self) -> None:
        """Before the optimizer step: parameters backward did not reach get `grad = None` back."""
        for p, view in self.grads.items():
            if p.grad is view and p not in self._touched:
                p.grad = None
        self._touched.clear()

    def adopt_optimizer_state(self, optimizer) -> bool:
        """Create a fresh torch Adam/AdamW's per-parameter state as views of one block.

        The state is what the optimizer would create lazily at its first step (keys, dtypes and
        devices read off a throwaway copy of it on a two-element tensor, so this follows torch);
        anything else (another optimizer, a state already loaded on resume) is left alone."""
        raw = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        if self.optimizer_state_adopted or type(raw) not in (torch.optim.Adam, torch.optim.AdamW):
            return False
        params = [p for group in raw.param_groups for p in group["params"]]
        if any(raw.state.get(p) for p in params) or any(not p.is_contiguous() for p in params):
            return False
        templates = [self._template_state(raw, group) for group in raw.param_groups]
        if any(t is None for t in templates):
            return False
        for group, (moments, scalars) in zip(raw.param_groups, templates, strict=True):
            group_params = list(group["params"])
            for p, views in zip(group_params, _blocks(group_params, len(moments)), strict=True):
                raw.state[p] = {
                    **{k: torch.zeros_like(v) for k, v in scalars.items()},
                    **dict(zip(moments, views, strict=True)),
                }
        self.optimizer_state_adopted = True
        return True

    @staticmethod
    def _template_state(raw, group) -> tuple[list[str], dict] | None:
        """(names of the parameter-shaped state tensors, the scalar ones) of this optimizer at step 0,
        or None if its state holds anything else."""
        if not group["params"]:
            return [], {}
        like = group["params"][0]
        probe = torch.zeros(2, dtype=like.dtype, device=like.device, requires_grad=True)
        accepted = inspect.signature(type(raw)).parameters
        twin = type(raw)([probe], **{k: v for k, v in group.items() if k != "params" and k in accepted})
        probe.grad = torch.zeros_like(probe)
        twin.step()
        state = twin.state[probe]
        moments = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == probe.shape]
        scalars = {k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() == 0}
        if len(moments) + len(scalars) != len(state) or set(scalars) != {"step"}:
            return None
        return moments, scalars
