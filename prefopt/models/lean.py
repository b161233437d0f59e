"""Lean activations: RMSNorm and SwiGLU blocks that keep fewer tensors for backward.

Training memory on a small model is dominated by what autograd keeps between forward and
backward. A stock Llama-style SwiGLU MLP keeps four intermediate-size tensors per token
(gate, SiLU(gate), up, SiLU(gate)*up) and a stock RMSNorm keeps three hidden-size ones.
These replacements compute exactly the same forward (the same ops in the same order, so the
outputs are bitwise equal) but keep only their inputs and the two matmul outputs gate and
up; the cheap pointwise results are recomputed in backward. On SmolLM2-135M this removes
~40% of the saved activations for a few percent more time (docs/performance.md has the benchmark).

The same idea as Megatron-LM's and Liger-Kernel's fused SwiGLU/RMSNorm, in plain PyTorch.

A module is switched over only when (a) its structure is the plain one (bias-free
`nn.Linear` projections: a LoRA- or 4-bit-wrapped projection is left alone) and (b) on a
random input its stock forward and gradients agree with ours; otherwise it keeps its own
forward. The switch changes the module's class to a subclass with a new `forward`, so
state_dict keys, saving and `deepcopy` are unchanged. Eval, no-grad and autocast calls take
the stock forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prefopt.models.precision import autocast_dtype


class _RMSNormFunction(torch.autograd.Function):
    """y = w * (x * rsqrt(mean(x^2) + eps)); keeps x and rsqrt(...) (one float per token)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        input_dtype = x.dtype
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(input_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_y * normed.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = (grad_y * weight).to(torch.float32)
            # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed))
            grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, None


class _SwiGLUFunction(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)); keeps x, gate(x) and up(x), recomputes silu and the product.

    Under autocast (`compute` = its dtype, e.g. bf16 over fp32 master weights) the function does what
    autocast does to the stock MLP: x and the three weights are cast to `compute` and every matmul
    runs there, so the forward is bitwise the stock one. It keeps the cast x (one copy, where the
    stock gate and up projections keep one each) and the cast weights (what the stock matmuls keep
    too). Backward runs the matmuls in `compute` as well and hands each gradient back in its
    input's dtype; x's two parts are cast before they are added, as autograd adds the stock ones."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, compute):
        xc, w_gate_c, w_up_c, w_down_c = (
            t.to(compute) if compute is not None else t for t in (x, w_gate, w_up, w_down)
        )
        gate = F.linear(xc, w_gate_c)
        up = F.linear(xc, w_up_c)
        ctx.save_for_backward(xc, gate, up, w_gate_c, w_up_c, w_down_c)
        ctx.dtypes = (x.dtype, w_gate.dtype, w_up.dtype, w_down.dtype)
        return F.linear(F.silu(gate) * up, w_down_c)

    @staticmethod
    def backward(ctx, grad_out):
        x, gate, up, w_gate, w_up, w_down = ctx.saved_tensors
        x_dtype, gate_dtype, up_dtype, down_dtype = ctx.dtypes
        grad_out = grad_out.to(x.dtype)
        act = F.silu(gate)
        grad_w_down = None
        if ctx.needs_input_grad[3]:
            grad_w_down = grad_out.reshape(-1, grad_out.shape[-1]).T @ (act * up).reshape(-1, up.shape[-1])
            grad_w_down = grad_w_down.to(down_dtype)
        grad_hidden = grad_out @ w_down
        grad_up = grad_hidden * act
        del act
        grad_gate = torch.ops.aten.silu_backward(grad_hidden * up, gate)
        del grad_hidden
        flat_x = x.reshape(-1, x.shape[-1])
        grad_w_gate = grad_w_up = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_w_gate = (grad_gate.reshape(-1, grad_gate.shape[-1]).T @ flat_x).to(gate_dtype)
        if ctx.needs_input_grad[2]:
            grad_w_up = (grad_up.reshape(-1, grad_up.shape[-1]).T @ flat_x).to(up_dtype)
        if ctx.needs_input_grad[0]:
            grad_x = (grad_gate @ w_gate).to(x_dtype) + (grad_up @ w_up).to(x_dtype)
        return grad_x, grad_w_gate, grad_w_up, grad_w_down, None


def _use_stock(x: torch.Tensor) -> bool:
    return not torch.is_grad_enabled()


# The stock forward is called through the class the lean one was made from (`_prefopt_stock`),
# not `super(type(self), self)`: once the lean class is subclassed again (FSDP2's `fully_shard`
# swaps every sharded module to an `FSDP<name>` subclass) `type(self)` is that subclass, its
# super() is the lean class, and the call would recurse forever.
def _sharded(*weights) -> bool:
    """A weight a sharding engine holds in pieces (ZeRO-3, FSDP2): the lean functions read weights
    directly (SwiGLU its child projections', outside their calls), so such modules run stock."""
    return any(hasattr(w, "ds_id") or type(w).__name__ == "DTensor" for w in weights)


def _lean_rmsnorm_forward(self, hidden_states):
    if _use_stock(hidden_states) or _sharded(self.weight):
        return self._prefopt_stock.forward(self, hidden_states)
    return _RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def _lean_swiglu_forward(self, x):
    if _use_stock(x) or _sharded(self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight):
        return self._prefopt_stock.forward(self, x)
    weights = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
    return _SwiGLUFunction.apply(x, *weights, autocast_dtype(x.device.type))


def _is_plain_linear(module) -> bool:
    return type(module) is nn.Linear and module.bias is None


def _looks_like_rmsnorm(module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and isinstance(getattr(module, "variance_epsilon", None), float)
    )


def _looks_like_swiglu(module) -> bool:
    return all(_is_plain_linear(getattr(module, name, None)) for name in ("gate_proj", "up_proj", "down_proj")) and (
        hasattr(module, "act_fn")
    )


_SUBCLASSES: dict[tuple[type, str], type] = {}


def _lean_class(cls: type, kind: str) -> type:
    key = (cls, kind)
    if key not in _SUBCLASSES:
        forward = _lean_rmsnorm_forward if kind == "rmsnorm" else _lean_swiglu_forward
        attributes = {"forward": forward, "_prefopt_lean": kind, "_prefopt_stock": cls}
        _SUBCLASSES[key] = type(f"Lean{cls.__name__}", (cls,), attributes)
    return _SUBCLASSES[key]


def _agrees(module, lean_cls: type, width: int) -> bool:
    """Stock vs lean forward and gradients on a small random input, with the module's own weights.

    torch.autograd.grad (not backward) so no parameter's .grad is touched."""
    param = next(module.parameters())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, width, generator=generator).to(param.device, param.dtype)
    trainable = [p for p in module.parameters() if p.requires_grad]
    stock_cls = type(module)
    results = []
    for cls in (stock_cls, lean_cls):
        module.__class__ = cls
        try:
            xi = x.clone().requires_grad_(True)
            with torch.autocast(x.device.type, enabled=False), torch.enable_grad():
                out = module(xi)
                probe = torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype, device=out.device)
                grads = torch.autograd.grad((out * probe).sum(), [xi, *trainable])
        finally:
            module.__class__ = stock_cls
        results.append([out.detach().float(), *(g.float() for g in grads)])
    tolerance = 1e-4 if param.dtype == torch.float32 else 2e-2
    return all(torch.allclose(a, b, rtol=tolerance, atol=tolerance) for a, b in zip(*results, strict=True))


def make_lean(model: nn.Module) -> dict[str, int]:
    """Switch eligible RMSNorm and SwiGLU modules of `model` to their lean versions, in place.

    Returns how many modules of each kind were switched. Modules whose stock forward is not
    the formula above (checked numerically, once per class) keep their own forward.
    """
    verdict: dict[type, bool] = {}
    counts = {"rmsnorm": 0, "swiglu": 0}
    for module in model.modules():
        cls = type(module)
        if getattr(cls, "_prefopt_lean", None):
            continue
        if _looks_like_rmsnorm(module):
            kind, width = "rmsnorm", module.weight.shape[0]
        elif _looks_like_swiglu(module):
            kind, width = "swiglu", module.gate_proj.in_features
        else:
            continue
        lean_cls = _lean_class(cls, kind)
        if cls not in verdict:
            try:
                verdict[cls] = _agrees(module, lean_cls, width)
            except (RuntimeError, TypeError, ValueError, NotImplementedError):  # e.g. weights on "meta": keep stock
                verdict[cls] = False
        if verdict[cls]:
            module.__class__ = lean_cls
            counts[kind] += 1
    return counts
