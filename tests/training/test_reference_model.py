"""--reference-model: the frozen reference is other weights than the policy's start (iterative DPO's pi_0)."""

import math

import pytest
import torch
from helpers import read_metrics, save_tiny_model
from safetensors.torch import load_file

from prefopt.config import ConfigError, TrainConfig
from prefopt.losses import get_loss_spec
from prefopt.training.run import choose_reference

from .test_losses_end_to_end import run


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("other_model"), seed=1)


def first_loss(result) -> float:
    return next(m["loss"] for m in read_metrics(result.output_dir) if "loss" in m)


def test_the_reference_is_the_named_model_for_copy_and_cached(tmp_path, tiny_model_dir, other_model_dir):
    """Policy = seed 0, reference = seed 1: step 1's DPO loss is no longer ln 2, the reference copy holds
    seed 1's weights, and the cached reference (scored once by seed 1) gives the same step-1 loss."""
    same = run(tmp_path / "same", tiny_model_dir, reference_model=tiny_model_dir, max_steps=1)
    assert first_loss(same) == pytest.approx(math.log(2), abs=1e-4)

    copy = run(tmp_path / "copy", tiny_model_dir, reference_model=other_model_dir, max_steps=1)
    assert abs(first_loss(copy) - math.log(2)) > 1e-2
    other = load_file(f"{other_model_dir}/model.safetensors")
    for key, value in copy.trainer.reference.model.state_dict().items():
        assert torch.equal(value, other[key]), key

    cached = run(tmp_path / "cached", tiny_model_dir, reference_model=other_model_dir, reference="cached", max_steps=1)
    assert cached.reference == "cached"
    assert first_loss(cached) == pytest.approx(first_loss(copy), rel=1e-5)


def test_adapter_reference_cannot_be_another_model(tiny_model_dir, other_model_dir):
    spec = get_loss_spec("dpo")
    config = TrainConfig(model=tiny_model_dir, lora=True, reference_model=other_model_dir)
    assert choose_reference(spec, config) == "copy"  # auto: the adapter-off base is not the named model
    config = TrainConfig(model=tiny_model_dir, lora=True, reference="adapter", reference_model=other_model_dir)
    with pytest.raises(ConfigError, match="reference=adapter"):
        choose_reference(spec, config)
