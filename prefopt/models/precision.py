"""Precision: what the weights are kept in, what the matmuls run in, and how small updates survive.

Three settings, three costs (docs/training.md explains them, docs/performance.md has the measured figures):

- **float32 weights, no autocast**: exact; the slowest where the hardware has bf16 units.
- **float32 master weights + bf16 autocast** (`mixed_precision: bf16`; `auto` picks it where the
  machine has bf16 matmul units): the weights, gradients and AdamW state stay fp32, so every
  update lands; the matmuls run in bf16. `logps.py` keeps logsumexp, log-probs, the token KL and
  the per-sequence sums in fp32, and the losses upcast to fp32: DPO takes small differences of
  large sums. fp16 autocast needs loss scaling, which accelerate does on GPUs only.
- **bfloat16 / float16 weights** (`dtype: bfloat16`): the leanest. A plain AdamW step adds
  lr * m / sqrt(v) (about lr) to each weight; at DPO's learning rates (1e-7 .. 1e-6) that is below
  half a bf16 ulp of almost every weight (the ulp of 0.02 is 1.2e-4), so the update rounds away:
  a run "trains" and barely moves. `optimizer: auto` therefore uses optimi's AdamW with Kahan
  summation on low-precision weights: a bf16 compensation buffer per weight keeps what rounding
  dropped and adds it back, so the weights follow the fp32 trajectory to about 1% (measured)
  for 2 more bytes per weight. Plain `adamw` on such weights is allowed but warned about, with the
  share of weights its first step actually changed.

Why optimi's Kahan summation over torchao's bf16 stochastic rounding (both measured on a
2048 x 2048 bf16 weight, 20 AdamW steps at lr 1e-6 against fp32): Kahan kept the update to 0.7%
relative error with 99.99% of the weights moved; stochastic rounding is unbiased only on average,
so after 20 steps its rounding noise was 4.7 times the update itself, with 16% of the weights
moved; it also compiles each step with torch.compile (a C compiler and seconds to minutes of
warm-up on a CPU) and is a private class (`torchao.optim._AdamW`) in torchao 0.18. Kahan costs
2 bytes per weight more (6 vs 4 bytes of optimizer state); both keep m and v in the weights' dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from prefopt.config import ConfigError, TrainConfig

LOW_PRECISION = (torch.bfloat16, torch.float16)
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Environment override of the hardware check: 0 = "no bf16 units" (the test suite sets it, so `auto`
# means fp32 there on every machine), 1 = "has them".
UNITS_ENV = "PREFOPT_BF16_UNITS"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86, aarch64
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_units(device_type: str = "cpu") -> str | None:
    """The bf16 matmul units of this device, in words ('AMX', 'AVX512-BF16', 'CUDA ...'), or None.

    On a CPU, torch reports them through `torch.cpu._is_amx_tile_supported` and
    `_is_avx512_bf16_supported` (private, so /proc/cpuinfo's flags are the fallback); the public
    `torch.backends.cpu.get_cpu_capability()` says only 'AVX512', which CPUs without bf16 units
    report too, and `torch.ops.mkldnn._is_mkldnn_bf16_supported()` is True on any AVX512 CPU
    (oneDNN emulates bf16 there, slower than fp32).
    """
    forced = os.environ.get(UNITS_ENV, "").strip().lower()
    if forced in ("0", "no", "false"):
        return None
    if forced in ("1", "yes", "true"):
        return f"assumed ({UNITS_ENV}={forced})"
    if device_type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            return f"CUDA {torch.cuda.get_device_name()}"
        return None
    cpu = getattr(torch, "cpu", None)
    flags = _cpu_flags()
    amx = getattr(cpu, "_is_amx_tile_supported", None)
    if (amx() if amx else False) or "amx_bf16" in flags:
        return "AMX"
    avx = getattr(cpu, "_is_avx512_bf16_supported", None)
    if (avx() if avx else False) or "avx512_bf16" in flags:
        return "AVX512-BF16"
    if "bf16" in flags:  # aarch64 (Graviton 3, Neoverse V1/V2: BFMMLA)
        return "ARM BF16"
    return None


@dataclass(frozen=True)
class Precision:
    """What a run's weights are kept in and what its matmuls run in."""

    weights: torch.dtype
    autocast: torch.dtype | None  # None: no autocast
    units: str | None  # the bf16 units found (for the log line)

    def describe(self) -> str:
        weights = str(self.weights).removeprefix("torch.")
        if self.autocast is None:
            return f"{weights} weights, no autocast"
        compute = str(self.autocast).removeprefix("torch.")
        return f"{weights} master weights, {compute} autocast" + (f" ({self.units})" if self.units else "")


def choose_autocast(mixed_precision: str, weights: torch.dtype, device_type: str) -> torch.dtype | None:
    """The autocast dtype for `mixed_precision` (no | bf16 | fp16 | auto) with weights of `weights`.

    auto: bf16 where the device has bf16 matmul units and the weights are float32 (master
    weights); otherwise none. Low-precision weights gain nothing from autocast.
    """
    if mixed_precision == "auto":
        if weights == torch.float32 and bf16_units(device_type):
            return torch.bfloat16
        return None
    if mixed_precision == "no":
        return None
    if mixed_precision == "fp16" and device_type == "cpu":
        raise ConfigError(
            "mixed_precision fp16 needs a GPU: fp16 autocast needs loss scaling, which accelerate does only on "
            "accelerators (on a CPU it would silently train in fp32); use --mixed-precision bf16"
        )
    if (
        weights == torch.float16
        and mixed_precision == "bf16"
        or weights == torch.bfloat16
        and mixed_precision == "fp16"
    ):
        raise ConfigError(f"mixed_precision {mixed_precision} on {str(weights)[6:]} weights mixes two 16-bit formats")
    if weights == torch.float16 and mixed_precision == "fp16":
        # fp16 autocast brings the GradScaler, which refuses to unscale fp16 gradients (it would
        # fail at the first optimizer step)
        raise ConfigError(
            "mixed_precision fp16 on float16 weights: loss scaling needs float32 master weights; use "
            "--dtype float32 --mixed-precision fp16, or --dtype float16 --mixed-precision no"
        )
    return _AUTOCAST[mixed_precision]


def resolve_precision(config: TrainConfig, device_type: str) -> Precision:
    from prefopt.models.loading import training_dtype

    weights = training_dtype(config.dtype)
    autocast = choose_autocast(config.mixed_precision, weights, device_type)
    return Precision(weights, autocast, bf16_units(device_type) if autocast == torch.bfloat16 else None)


def precision_record(precision: Precision) -> dict:
    """What each checkpoint keeps of the run's precision (prefopt_state.json), so --resume on
    another machine continues with the same arithmetic."""
    name = lambda dtype: None if dtype is None else str(dtype).removeprefix("torch.")  # noqa: E731
    return {"weights": name(precision.weights), "autocast": name(precision.autocast)}


def resumed_precision(config: TrainConfig, precision: Precision, record: dict | None) -> Precision:
    """The precision a resumed run continues with: the one its checkpoint recorded.

    `mixed_precision: auto` resolves by the machine's bf16 units, so a run begun on a CPU with
    AVX512-BF16/AMX (bf16 autocast) and resumed on one without (fp32), or the other way round,
    would silently change its arithmetic mid-run; the recorded choice wins and a line says so.
    Weights are loaded by `dtype`; a recorded weight dtype this config does not give is an error.
    """
    if not record:
        return precision
    recorded = precision_record(precision)
    if record.get("weights") != recorded["weights"]:
        raise ConfigError(
            f"this run trained with {record.get('weights')} weights; here dtype {config.dtype} gives "
            f"{recorded['weights']}: pass --dtype {record.get('weights')} to resume it"
        )
    if record.get("autocast") == recorded["autocast"]:
        return precision
    autocast = None if record.get("autocast") is None else getattr(torch, record["autocast"])
    print(
        f"prefopt: precision: the run began with {record.get('autocast') or 'no'} autocast and continues "
        f"with it (mixed_precision {config.mixed_precision} would choose {recorded['autocast'] or 'none'} on "
        "this machine)"
    )
    return Precision(precision.weights, autocast, precision.units if autocast is not None else None)


def training_flags(precision: Precision) -> dict:
    """TrainingArguments' bf16/fp16: accelerate wraps the policy's forward in autocast (and, for
    fp16 on a GPU, scales the loss); PreferenceTrainer extends the same autocast to the reference,
    the output head and the loss."""
    return {"bf16": precision.autocast == torch.bfloat16, "fp16": precision.autocast == torch.float16}


def autocast_context(args) -> torch.autocast:
    """The autocast a PreferenceTrainer computes a batch under (disabled when args ask for none)."""
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    return torch.autocast(args.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs `device_type`'s matmuls in right now (None: autocast is off there)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def frozen_weights_in_compute_dtype(model: torch.nn.Module, compute: torch.dtype) -> int:
    """Keep `model`'s frozen Linear weights in the autocast dtype; returns the bytes this saves.

    Under autocast every Linear casts its fp32 weight to bf16 on each call (a frozen weight is not
    in autocast's cache, which holds only weights that require grad), so a frozen reference copy or
    a LoRA base would pay that cast in every forward and every decode step, and keep twice the
    memory of the bf16 copy it computes with. A weight already in bf16 is what autocast would make
    of it, so the matmuls, and every score, are bitwise the same as with the fp32 weight: a policy
    equal to its reference still scores exactly equal.

    Left in their dtype: trained weights (the master weights stay fp32), modules other than a plain
    nn.Linear (embeddings are looked up, not multiplied: the residual stream stays fp32; 4-bit
    layers keep their own compute dtype), a weight shared with such a module (a head tied to the
    embedding), and the output head: TDPO's token KL multiplies it in fp32 with autocast off, and a
    bf16 copy would make the reference's distribution differ from an equal policy's.
    """
    from prefopt.models.logps import output_head

    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    try:
        head = output_head(model)
    except (AttributeError, NotImplementedError):
        head = None
    saved = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear:
            continue
        for param in module.parameters(recurse=False):
            plain = all(type(owner) is torch.nn.Linear and owner is not head for owner in owners[id(param)])
            if plain and not param.requires_grad and param.dtype == torch.float32:
                saved += param.numel() * (param.element_size() - torch.finfo(compute).bits // 8)
                param.data = param.data.to(compute)
    if saved:
        # transformers maps the checkpoint file into memory and the fp32 weights are views of that
        # one mapping; while any of them lives the whole mapping stays, and the pages of the weights
        # just cast stay resident (0.42 GB of SmolLM2-135M's reference copy). The frozen weights left
        # as they are get their own memory, so the mapping goes.
        for param in model.parameters():
            if not param.requires_grad and param.dtype == torch.float32:
                param.data = param.data.clone()
    return saved


# -- low-precision weights -------------------------------------------------------------------


def low_precision_trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad and p.dtype in LOW_PRECISION]


def choose_optimizer(name: str, model) -> str:
    """adamw or adamw_kahan: auto takes Kahan-compensated updates when trained weights are bf16/fp16."""
    if name != "auto":
        return name
    return "adamw_kahan" if low_precision_trainable(model) else "adamw"


def optimizer_cls_and_kwargs(name: str, config: TrainConfig, args) -> tuple | None:
    """For transformers.Trainer(optimizer_cls_and_kwargs=...); None: its own AdamW (adamw_torch)."""
    if name == "adamw":
        return None
    try:
        import optimi
    except ImportError:
        raise ConfigError(
            "bf16/fp16 weights train with Kahan-compensated AdamW from `torch-optimi`: pip install 'prefopt[bf16]' "
            "(or --mixed-precision bf16 with --dtype float32, or --optimizer adamw to accept lost updates)"
        ) from None
    # transformers' AdamW defaults (optimi's own are betas (0.9, 0.99) and eps 1e-6); transformers adds
    # the per-group weight_decay. kahan_sum=None: compensated for bf16/fp16 weights, plain for fp32 ones.
    kwargs = {"lr": config.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    return optimi.AdamW, {**kwargs, "kahan_sum": None}


def effective_weights(param: torch.Tensor, optimizer) -> torch.Tensor:
    """The value the optimizer is tracking for `param`: the weight plus its Kahan compensation (fp32)."""
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    comp = state.get("kahan_comp")
    value = param.detach().float()
    return value + comp.float() if comp is not None else value


def fold_compensation(model, optimizer) -> int:
    """Before saving final/: weights that carry a Kahan compensation become fp32 weight + compensation.

    The compensation holds the sub-ulp progress that bf16 cannot store (at lr 1e-6 and a few hundred
    steps, most of the run's change); rounding it away at the end would undo the fix. The folded
    weights are fp32, so final/ holds what training reached (cast it to bf16 to serve it).
    Returns how many tensors were folded.
    """
    if optimizer is None:
        return 0
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    folded = 0
    for param in model.parameters():
        if param.dtype in LOW_PRECISION and inner.state.get(param, {}).get("kahan_comp") is not None:
            param.data = effective_weights(param, inner)
            folded += 1
    if folded:
        model.config.dtype = torch.float32
    return folded


class DroppedUpdates:
    """TrainerCallback: on bf16/fp16 weights with a plain optimizer, measure at the first step with
    a learning rate > 0 the share of trained weights that changed, and warn when most did not."""

    def __init__(self, warn_below: float = 0.5):
        self.warn_below = warn_below
        self.before: list[torch.Tensor] | None = None
        self.params: list[torch.nn.Parameter] = []
        self.changed: float | None = None  # the measured share, once measured

    def __getattr__(self, name):  # every other callback event: do nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.changed is not None or model is None or optimizer is None:
            return
        if not any(group.get("lr", 0) > 0 for group in optimizer.param_groups):
            return
        self.params = low_precision_trainable(model)
        self.before = [p.detach().clone() for p in self.params]

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.before is None:
            return
        inner = getattr(optimizer, "optimizer", optimizer)
        total = sum(p.numel() for p in self.params)
        moved = sum(
            int((effective_weights(p, inner) != b.float()).sum()) for p, b in zip(self.params, self.before, strict=True)
        )
        self.changed = moved / max(total, 1)
        self.before, self.params = None, []
        if self.changed < self.warn_below:
            lr = max(group.get("lr", 0) for group in inner.param_groups)
            print(
                f"prefopt: warning: only {self.changed:.2%} of the bf16/fp16 weights changed in the first optimizer "
                f"step (lr {lr:.3g}): updates below half a bf16 ulp round away. Use --optimizer auto "
                "(Kahan-compensated AdamW) or --dtype float32 with --mixed-precision bf16"
            )
