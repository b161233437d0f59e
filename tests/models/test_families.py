"""Any model a user brings (issue #19 item 4): tiny random models of ten families, not only Llama.

The families differ where prefopt's tricks could go wrong: sliding-window attention on some or
all layers (Mistral, Gemma-2, Gemma-3, Phi-3), absolute positions (GPT-2, OPT with its offset of
2), partial rotary (GPT-NeoX), dropout on by default (GPT-2, OPT: 0.1), soft-capped or scaled
logits (Gemma: the fused head does not apply, the model's own logits are scored), and experts
(Qwen3-MoE, whose fused expert weights peft wraps as parameters). For each family:

- the shared-prefix layout's log-probs equal the plain layout's on prompts longer than the
  attention window (80 tokens, so the start-up probe's short pair cannot see it; prompts are about
  150 tokens): prefopt either keeps the layout exact or turns sharing off for the run, and the
  scores are the same either way;
- DPO's first logged loss is ln 2 (policy == reference, dropout off by default), and with dropout
  kept (`disable_dropout=False`) on a model that has it, it is not;
- TDPO2 with LoRA, KTO and GRPO each train a step with finite losses.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from helpers import byte_tokenizer, read_metrics

from prefopt import TrainConfig, train
from prefopt.models.windows import attention_window

WINDOW = 80  # longer than the start-up probe's pair (64 tokens at most), shorter than the data's rows
MAX_LENGTH = 200
COMMON = dict(
    vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=None, eos_token_id=0,
    tie_word_embeddings=False,
)  # fmt: skip
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(COMMON)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(COMMON, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(COMMON, head_dim=16, sliding_window=WINDOW)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(COMMON, head_dim=16, sliding_window=WINDOW)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(COMMON, sliding_window=WINDOW)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(COMMON, sliding_window=WINDOW)),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(vocab_size=259, n_embd=64, n_layer=2, n_head=4, n_positions=512, pad_token_id=0, eos_token_id=0),
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            vocab_size=259,
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=128,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=64,
            pad_token_id=0,
            eos_token_id=0,
            bos_token_id=0,
        ),
    ),  # fmt: skip
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            vocab_size=259,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=512,
            pad_token_id=0,
            eos_token_id=0,
            bos_token_id=0,
            tie_word_embeddings=False,
        ),
    ),  # fmt: skip
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1
        ),
    ),
}
WINDOWED = {"gemma2", "gemma3", "mistral", "phi3"}
WITH_DROPOUT = {"gpt2", "opt"}

FILLER = "Here is some context about the weather, the sea, the mountains and the long road home. " * 2
LONG_PAIRS = [
    {"prompt": FILLER + "What is 2+2?", "chosen": " It is four, as everyone knows.", "rejected": " Five."},
    {"prompt": FILLER + "Say hi.", "chosen": " Hello there, friend!", "rejected": " No."},
]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    folders = {}
    for name, (config_cls, model_cls, values) in FAMILIES.items():
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**values))
        model.save_pretrained(root / name)
        byte_tokenizer().save_pretrained(root / name)
        folders[name] = str(root / name)
    data = root / "long.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in LONG_PAIRS))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p["prompt"], "answer": "4"}) + "\n" for p in LONG_PAIRS))
    return folders, data, prompts


def test_the_window_is_read_from_each_config(family_dirs):
    folders, _, _ = family_dirs
    for name, folder in folders.items():
        config = transformers.AutoConfig.from_pretrained(folder)
        assert attention_window(config) == (WINDOW if name in WINDOWED else None), name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shared_layout_scores_equal_the_plain_layout_on_long_prompts(family, family_dirs, tmp_path, capsys):
    """The scores training uses (the layout prefopt chooses for this model and max_length) against
    two plain sequences per pair, one step of DPO each, read from metrics.jsonl."""
    folders, data, _ = family_dirs
    logs = {}
    for share in (True, False):
        out = train(_config(folders[family], data, tmp_path / f"share-{share}", share_prefix=share))
        logs[share] = [m for m in read_metrics(out.output_dir) if "loss" in m][0]
    for key in ("logps/chosen", "logps/rejected"):
        shared, plain = logs[True][key], logs[False][key]
        assert abs(shared - plain) <= 1e-4 * max(1.0, abs(plain)), (family, key, shared, plain)
    printed = capsys.readouterr().out
    assert ("attention window" in printed) == (family in WINDOWED), printed[-2000:]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dpo_starts_at_ln2_and_other_losses_train(family, family_dirs, tmp_path):
    folders, data, prompts = family_dirs
    folder = folders[family]
    first = _first_loss(train(_config(folder, data, tmp_path / "dpo")))
    assert first == pytest.approx(math.log(2), abs=1e-5), f"{family}: DPO at step 1 is {first}"
    if family in WITH_DROPOUT:  # kept on, the policy's dropout makes the two sides differ
        kept = _first_loss(train(_config(folder, data, tmp_path / "dropout", disable_dropout=False)))
        assert abs(kept - math.log(2)) > 1e-4, f"{family}: dropout kept, yet DPO at step 1 is {kept}"
    for loss, extra in (("tdpo2", {"lora": True}), ("kto", {})):
        result = train(_config(folder, data, tmp_path / loss, loss=loss, **extra))
        assert math.isfinite(_first_loss(result)), (family, loss)
    grpo = TrainConfig(
        loss="grpo", model=folder, data=[str(prompts)], reward="exact_match", num_generations=2,
        max_new_tokens=4, batch_size=2, max_steps=1, logging_steps=1, save_steps=1000,
        output_dir=str(tmp_path / "grpo"), max_length=MAX_LENGTH,
    )  # fmt: skip
    assert math.isfinite(_first_loss(train(grpo)))


def _config(model: str, data, output_dir, **overrides) -> TrainConfig:
    values = dict(
        loss="dpo", model=model, data=[str(data)], output_dir=str(output_dir), max_steps=1, batch_size=2,
        logging_steps=1, learning_rate=1e-3, max_length=MAX_LENGTH, save_steps=1000, overwrite=True,
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def _first_loss(result) -> float:
    return next(m["loss"] for m in read_metrics(result.output_dir) if "loss" in m)
