"""Returning freed memory during a step (prefopt.training.memory): where the hooks go, that they run in
forward and in backward (also under gradient checkpointing), and that training is bit-identical."""

from pathlib import Path

import pytest
import torch
from helpers import tiny_llama
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from prefopt.training import memory
from prefopt.training.memory import TrimMemory, decoder_layers, trim_every_layers

from .test_losses_end_to_end import run


class CountingTrim:
    def __init__(self):
        self.calls = 0

    def __call__(self, pad):
        assert pad == 0
        self.calls += 1
        return 1


def _layers(n: int):
    model = tiny_llama(0).train()
    model.config.num_hidden_layers = n
    model.model.layers.extend(type(model.model.layers[0])(model.config, i) for i in range(2, n))
    return model


def test_decoder_layers_are_found_through_peft():
    model = tiny_llama(0)
    assert [type(m).__name__ for m in decoder_layers(model)] == ["LlamaDecoderLayer"] * 2
    wrapped = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules="all-linear"))
    assert len(decoder_layers(wrapped)) == 2


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_trims_after_forward_and_backward_of_every_fifth_layer(checkpointing):
    """10 layers, every 5th hooked: layers 5 and 10. Forward trims 2 times, backward 2 more (also
    under transformers' checkpointing, whose recompute does not run forward hooks again)."""
    model = _layers(10)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trim = CountingTrim()
    hooks = TrimMemory(decoder_layers(model), trim, every=5)
    ids = torch.randint(1, 200, (2, 7))
    loss = model(input_ids=ids).logits.sum()
    assert trim.calls == 2
    loss.backward()
    assert trim.calls == 4
    hooks.close()
    model(input_ids=ids).logits.sum().backward()
    assert trim.calls == 4  # closed: no more calls


def test_fewer_layers_than_the_interval_still_trims_after_the_last():
    trim = CountingTrim()
    model = tiny_llama(0).train()
    TrimMemory(decoder_layers(model), trim, every=5)
    model(input_ids=torch.randint(1, 200, (1, 5))).logits.sum().backward()
    assert trim.calls == 2


def test_nothing_installed_without_glibc_trim(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert trim_every_layers(tiny_llama(0)) is None
    monkeypatch.undo()
    assert memory._malloc_trim() is not None  # this machine's glibc has it
    assert isinstance(trim_every_layers(tiny_llama(0)), TrimMemory)


@pytest.mark.parametrize("overrides", [{}, {"gradient_checkpointing": True}], ids=["plain", "gc"])
def test_training_with_and_without_trimming_is_bit_identical(tmp_path, tiny_model_dir, overrides):
    weights = {}
    for on in (True, False):
        result = run(tmp_path / str(on), tiny_model_dir, trim_memory=on, **overrides)
        weights[on] = load_file(Path(result.output_dir) / "final" / "model.safetensors")
    assert weights[True].keys() == weights[False].keys()
    for name, tensor in weights[True].items():
        assert torch.equal(tensor, weights[False][name]), name
