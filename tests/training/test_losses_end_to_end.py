"""Every registered loss trains end to end on a tiny random Llama (CPU)."""

import math
from pathlib import Path

import pytest
import torch
from helpers import SAMPLES, read_metrics
from safetensors.torch import load_file

from prefopt import TrainConfig, train
from prefopt.losses import LossInputs, available_losses, get_loss, get_loss_spec

# Losses of the DPO family: at policy == reference their value is -log sigma(0) = ln 2.
LN2_LOSSES = {"dpo", "dpop", "tdpo1", "tdpo2", "robust"}


def value_at_policy_equals_reference(name: str) -> float | None:
    """A reference-based paired loss at step 1 sees all log-ratios = 0 (and KL = 0): a constant."""
    spec = get_loss_spec(name)
    if not spec.needs_reference or not spec.paired:
        return None
    z = torch.zeros(2)
    inputs = LossInputs(z - 5, z - 7, z + 3, z + 4, z - 5, z - 7, chosen_kl=z, rejected_kl=z)
    return get_loss(name)(inputs).loss.item()


def run(tmp_path, model_dir, callbacks=None, **overrides):
    config = dict(
        model=model_dir,
        data=[str(SAMPLES / "standard.jsonl")],
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        batch_size=2,
        logging_steps=1,
        learning_rate=1e-3,
        max_length=96,
        save_steps=100,
    )
    config.update(overrides)
    return train(TrainConfig(**config), callbacks=callbacks)


# Policy-gradient losses train on prompts with a reward (tests/online/test_train_online.py::test_each_loss_trains);
# reward-model losses train a classifier (tests/losses/test_bradley_terry.py).
LM_LOSSES = [
    n for n in available_losses() if not get_loss_spec(n).needs_rollouts and not get_loss_spec(n).needs_sequence_scores
]


@pytest.mark.parametrize("name", LM_LOSSES)
def test_every_loss_trains(name, tmp_path, tiny_model_dir):
    spec = get_loss_spec(name)
    result = run(tmp_path, tiny_model_dir, loss=name)
    logs = [m for m in read_metrics(result.output_dir) if "loss" in m]
    assert [m["step"] for m in logs] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in logs)
    for key in ("elapsed_s", "tokens_per_s", "learning_rate", "grad_norm", "logps/chosen"):
        assert key in logs[0], key
    first = value_at_policy_equals_reference(name)
    if first is not None:
        assert logs[0]["loss"] == pytest.approx(first, abs=1e-3)
    if name in LN2_LOSSES:
        assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    # policy parameters changed ...
    before = load_file(Path(tiny_model_dir) / "model.safetensors")
    after = load_file(result.final_dir / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    # ... the reference's did not
    reference = result.trainer.reference
    if spec.needs_reference:
        assert result.reference == "copy"
        for key, value in reference.model.state_dict().items():
            assert torch.equal(value, before[key]), key
    else:
        assert reference is None and result.reference == "none"


def test_kto_on_unpaired_data(tmp_path, tiny_model_dir):
    result = run(tmp_path, tiny_model_dir, loss="kto", data=[str(SAMPLES / "unpaired.jsonl")], batch_size=4)
    logs = [m for m in read_metrics(result.output_dir) if "loss" in m]
    assert logs[0]["loss"] == pytest.approx(0.5, abs=1e-4)  # 1 - sigma(0) on both sides, z = 0
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert all(math.isfinite(m["loss"]) for m in logs)


def test_paired_loss_refuses_unpaired_data(tmp_path, tiny_model_dir):
    from prefopt.errors import PrefoptError

    with pytest.raises(PrefoptError, match="loss 'dpo' needs paired data"):
        run(tmp_path, tiny_model_dir, loss="dpo", data=[str(SAMPLES / "unpaired.jsonl")])
