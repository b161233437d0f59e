"""LoRA, QLoRA, reference modes and the reference cache."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt.config import ConfigError
from prefopt.data.collate import SequenceBatch

from .test_losses_end_to_end import SAMPLES, run


def first_batch(result) -> SequenceBatch:
    trainer = result.trainer
    return SequenceBatch(**trainer.data_collator(trainer.train_dataset.items[:4]))


def test_lora_trains_only_the_adapter(tmp_path, tiny_model_dir):
    result = run(tmp_path, tiny_model_dir, lora=True, lora_r=4)
    model = result.trainer.model
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, param in model.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param.detach(), base[key]), name
    adapter = load_file(result.final_dir / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    assert result.reference == "adapter"
    assert (result.final_dir / "adapter_config.json").exists() and not (result.final_dir / "model.safetensors").exists()


def test_qlora_runs_on_cpu_with_4bit_base(tmp_path, tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    result = run(tmp_path, tiny_model_dir, lora=True, load_in_4bit=True, max_steps=2)
    model = result.trainer.model
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert result.metrics["loss"] > 0 and torch.isfinite(torch.tensor(result.metrics["loss"]))
    assert (result.final_dir / "adapter_model.safetensors").exists()


def test_4bit_without_lora_is_refused():
    from prefopt import TrainConfig

    with pytest.raises(ConfigError, match="add --lora"):
        TrainConfig(load_in_4bit=True)


def test_every_reference_mode_gives_the_same_reference_logps(tmp_path, tiny_model_dir):
    setups = {
        "copy": dict(reference="copy"),
        "cached": dict(reference="cached"),
        "adapter": dict(reference="adapter", lora=True),
        "cached+lora": dict(reference="cached", lora=True),
    }
    values = {}
    for label, overrides in setups.items():
        result = run(tmp_path / label, tiny_model_dir, max_steps=1, **overrides)
        batch = first_batch(result)
        logps, _, _ = result.trainer.reference(result.trainer.model, batch, keep_states=False)
        values[label] = logps
    for label, logps in values.items():
        assert torch.allclose(logps, values["copy"], atol=1e-5, rtol=1e-5), label


def test_cache_is_reused_and_invalidated_by_data_changes(tmp_path, tiny_model_dir):
    first = run(tmp_path / "a", tiny_model_dir, reference="cached", max_steps=1)
    again = run(tmp_path / "b", tiny_model_dir, reference="cached", max_steps=1)
    assert not first.trainer.reference.reused and again.trainer.reference.reused
    assert again.trainer.reference.path == first.trainer.reference.path
    edited = tmp_path / "edited.jsonl"
    rows = [json.loads(line) for line in (SAMPLES / "standard.jsonl").read_text().splitlines()]
    rows[0]["chosen"] += " Really."
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    changed = run(tmp_path / "c", tiny_model_dir, reference="cached", max_steps=1, data=[str(edited)])
    assert not changed.trainer.reference.reused and changed.trainer.reference.path != first.trainer.reference.path


def test_cached_reference_is_refused_for_token_level_kl(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="reference=cached cannot serve loss 'tdpo2'.*token-level KL"):
        run(tmp_path, tiny_model_dir, loss="tdpo2", reference="cached")


def test_reference_free_loss_loads_no_reference(tmp_path, tiny_model_dir):
    result = run(tmp_path, tiny_model_dir, loss="simpo", max_steps=1)
    assert result.reference == "none" and result.trainer.reference is None


def test_group_by_length_trains_and_keeps_all_examples(tmp_path, tiny_model_dir):
    result = run(tmp_path, tiny_model_dir, group_by_length=True, max_steps=3, batch_size=4)
    sampler = result.trainer._get_train_sampler()
    assert type(sampler).__name__ == "LengthGroupedSampler"
    assert sorted(sampler) == list(range(len(result.trainer.train_dataset)))
    assert result.steps == 3
