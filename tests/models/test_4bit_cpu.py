"""4-bit (QLoRA) layers on CPU behave the same whatever the CPU's instruction set.

bitsandbytes has two CPU paths for a `Linear4bit` forward. On a CPU with AVX512-BF16 it repacks the
weight into a bfloat16 kernel's layout in the first eval-mode, no-grad forward
(`support_avx512bf16_for_cpu`); elsewhere it dequantises and multiplies. These tests force each path
so that every machine runs both, whichever one its CPU would pick.
"""

import copy
import logging
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import TINY_HIDDEN, TINY_INTERMEDIATE, save_tiny_model, tiny_llama

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import (  # noqa: E402
    _convert_weight_packed_for_cpu,
    _convert_weight_packed_for_cpu_inverse,
    has_avx512bf16,
)

from prefopt import TrainConfig  # noqa: E402
from prefopt.models.loading import load_policy  # noqa: E402

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 8, 61], [12, 7, 200, 31, 44, 9, 100, 2]])


def linear4bit_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def load_4bit(model_dir, **overrides):
    config = dict(model=model_dir, lora=True, load_in_4bit=True, lora_r=4, lora_dropout=0.0)
    config.update(overrides)
    model, _ = load_policy(TrainConfig(**config))
    return model


def adapter_grads(model) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=IDS, labels=IDS).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_tiny_llama_shapes_fit_every_bitsandbytes_cpu_path():
    # The packed layout takes in_features in whole quantisation blocks (64) and out_features in
    # blocks of 32 rows; the output head is never quantised.
    linears = {n: m for n, m in tiny_llama().named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert len(linears) == 14
    for name, layer in linears.items():
        assert layer.in_features % 64 == 0 and layer.out_features % 32 == 0, name
    assert (TINY_HIDDEN, TINY_INTERMEDIATE) == (64, 128)


def test_packed_layout_accepts_every_tiny_4bit_layer(tiny_model_dir):
    """The packing bitsandbytes does on AVX512-BF16 CPUs, forced here on any CPU: it is plain torch."""
    layers = linear4bit_layers(load_4bit(tiny_model_dir))
    assert len(layers) == 14
    for layer in layers:
        weight, state = layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state)
        out_features, in_features = state.shape
        packed, packed_state = _convert_weight_packed_for_cpu(weight, state)
        assert packed_state.packing_format_for_cpu
        assert packed.shape == (out_features, in_features // 2)
        # One bfloat16 scale per (64-wide block, output row), the kernel's layout.
        assert packed_state.absmax.shape == (in_features // 64, out_features)
        # The 4-bit codes come back bit for bit (saving a packed model goes through this inverse;
        # the double-quantised scales are re-quantised from bfloat16, so they only come back close).
        restored, _ = _convert_weight_packed_for_cpu_inverse(packed, packed_state)
        assert torch.equal(restored, layer.weight.data)


@pytest.mark.skipif(not has_avx512bf16(), reason="the packed kernel itself needs an AVX512-BF16 CPU")
def test_forced_packed_forward_matches_the_dequantising_forward(tiny_model_dir):
    model = load_4bit(tiny_model_dir).eval()
    with torch.no_grad():
        unpacked = model(input_ids=IDS).logits
        for layer in linear4bit_layers(model):
            layer.support_avx512bf16_for_cpu = True
        packed = model(input_ids=IDS).logits
    assert all(layer.weight.quant_state.packing_format_for_cpu for layer in linear4bit_layers(model))
    # The packed kernel computes in bfloat16 (8 significant bits, eps 2^-8) and its errors
    # accumulate over 2 layers; a wrong layout gives logits of the wrong magnitude altogether.
    scale = unpacked.abs().max()
    assert (packed - unpacked).abs().max() < 0.05 * scale


def test_prefopt_keeps_4bit_layers_unpacked_so_gradients_survive_an_evaluation(tiny_model_dir):
    """The dequantising path, forced off the packed one on any CPU.

    The packed kernel has no autograd formula and bitsandbytes never unpacks again; on an
    AVX512-BF16 CPU, every training step after the first evaluation backpropagated zero
    through the 4-bit base, and the first layers' adapters got zero gradients (measured: layer 0's
    lora_B gradients went from 1e-3 to 0).
    """
    model = load_4bit(tiny_model_dir)
    layers = linear4bit_layers(model)
    assert len(layers) == 14 and not any(layer.support_avx512bf16_for_cpu for layer in layers)
    before = adapter_grads(model)
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    with warnings.catch_warnings(record=True) as caught:  # torch's (truncated) line on the console
        warnings.simplefilter("always")
        after = adapter_grads(model)
    assert not [w for w in caught if "autograd kernel was not registered" in str(w.message)]
    first = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    assert before[first].abs().max() > 1e-5
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_4bit_layers_the_packed_layout_cannot_take_evaluate(tmp_path):
    # hidden 48 is not a whole number of 64-wide quantisation blocks; k/v have 24 rows, not 32s.
    model_dir = save_tiny_model(tmp_path / "odd", hidden_size=48, intermediate_size=96)
    model = load_4bit(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert logits.shape == (2, 8, 259) and torch.isfinite(logits).all()

    # What it guards against: the packing itself, on any CPU, refuses these shapes (the error the
    # evaluation raised on AVX512-BF16 CPUs, and an assertion for the rows).
    gate = model.base_model.model.model.layers[0].mlp.gate_proj.base_layer  # 48 -> 96
    with pytest.raises(RuntimeError, match=r"shape '\[96, 0\]' is invalid"):
        _convert_weight_packed_for_cpu(gate.weight.data.clone(), copy.deepcopy(gate.weight.quant_state))
    k_proj = model.base_model.model.model.layers[0].self_attn.k_proj.base_layer  # 48 -> 24
    with pytest.raises(AssertionError, match="N must be divisible"):
        _convert_weight_packed_for_cpu(k_proj.weight.data.clone(), copy.deepcopy(k_proj.weight.quant_state))


def test_loading_a_lora_model_raises_no_deprecation_warning(tiny_model_dir):
    """peft reads transformers' deprecated `is_gradient_checkpointing`; prefopt.models.loading silences exactly that."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_4bit(tiny_model_dir)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_importing_prefopt_drops_only_the_bitsandbytes_kernels_note():
    """transformers' Trainer imports peft, which imports bitsandbytes: on AVX512-BF16 CPUs that logged
    "Failed to load CPU gemm_4bit_forward from kernels-community" on every run."""
    code = "import prefopt.training.trainer, sys; assert 'bitsandbytes' in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "gemm_4bit_forward" not in result.stderr + result.stdout

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")

    def passes(message: str) -> bool:
        return logger.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, message, (), None))

    assert not passes("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
    assert passes("any other bitsandbytes warning")


def test_under_mixed_bf16_4bit_layers_compute_in_bf16_and_start_at_ln2(tmp_path, tiny_model_dir):
    """QLoRA under bf16 autocast: each 4-bit layer dequantises straight into bf16 (where the matmul
    runs anyway), the adapters stay fp32 master weights, and the adapter-off reference is the
    policy at step 1 (DPO loss ln 2)."""
    import math

    from helpers import SAMPLES, read_metrics

    from prefopt import train

    config = TrainConfig(
        model=tiny_model_dir,
        data=[str(SAMPLES / "standard.jsonl")],
        output_dir=str(tmp_path / "run"),
        lora=True,
        load_in_4bit=True,
        lora_r=4,
        mixed_precision="bf16",
        max_steps=2,
        batch_size=2,
        max_length=64,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=1000,
    )
    result = train(config)
    layers = linear4bit_layers(result.trainer.model)
    assert layers and all(layer.compute_dtype == torch.bfloat16 for layer in layers)
    assert all(p.dtype == torch.float32 for p in result.trainer.model.parameters() if p.requires_grad)
    losses = [m["loss"] for m in read_metrics(result.output_dir) if "loss" in m]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and math.isfinite(losses[1])
    plain = linear4bit_layers(load_4bit(tiny_model_dir))  # without autocast: the weights' own dtype, as before
    assert plain and all(layer.compute_dtype == torch.float32 for layer in plain)
