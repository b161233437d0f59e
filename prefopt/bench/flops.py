"""The distance to the hardware, for the benchmarks: a model's FLOPs per training step and this
machine's measured matmul peak (prefopt.bench.dpo's module docstring states the count)."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs of the benchmark's model."""

    matmul_weights: int  # N: the weights of its matrix multiplies (head included, embedding lookup not)
    layers: int
    attention_width: int  # heads x head dim

    @classmethod
    def of(cls, model_name: str) -> ModelShape:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from prefopt.models.hub import resolve_model

        config = AutoConfig.from_pretrained(resolve_model(model_name))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        weights = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
        text = config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(sum(weights.values()), text.num_hidden_layers, text.num_attention_heads * head_dim)

    def step_flops(self, sequence_lengths: list[int], reference: bool = True) -> float:
        """Model FLOPs of training on these plain sequences: policy forward + backward, and the
        reference's forward when there is one (the module docstring has the count)."""
        passes = 3 + (1 if reference else 0)  # forward = 1, backward = 2 for the policy; + 1 for the reference
        tokens = sum(sequence_lengths)
        attention = sum(2 * self.layers * self.attention_width * length**2 for length in sequence_lengths)
        return passes * (2 * self.matmul_weights * tokens + attention)


def matmul_peak(repeats: int = 3, sizes: tuple[int, ...] | None = None) -> dict[str, float]:
    """This machine's matmul FLOP/s in fp32 and bf16: square products of a few sizes, the best of
    `repeats` runs of each (the peak, not the mean: a shared machine's speed varies with its other
    load by 2x and more, so the benchmark measures again before every row and keeps the best)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = sizes or ((4096, 8192) if device == "cuda" else (1024, 2048))  # a GPU needs larger ones to fill
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for size in sizes:
            a = torch.randn(size, size, device=device, dtype=dtype)
            b = torch.randn(size, size, device=device, dtype=dtype)
            a @ b  # warm-up
            for _ in range(repeats):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(2):
                    a @ b
                if device == "cuda":
                    torch.cuda.synchronize()
                best = max(best, 2 * 2 * size**3 / (time.perf_counter() - start))
        peaks[name] = best
    return peaks


class PeakTracker:
    """The best matmul FLOP/s seen over the whole benchmark, measured again before each row."""

    def __init__(self):
        self.peaks = {"fp32": 0.0, "bf16": 0.0}

    def measure(self) -> None:
        for name, value in matmul_peak().items():
            self.peaks[name] = max(self.peaks[name], value)
