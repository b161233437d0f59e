"""One DPO step: prefopt's loss, reward metrics and gradients equal TRL DPOTrainer's (to float32 rounding).

Same tiny policy (seed 0) and a different reference (seed 1), same four standard-format
pairs; with the byte tokenizer both libraries produce the same token sequences.

Both are float32 forwards and backwards with different batch layouts, so they agree up to rounding
relative to the size of what is compared (helpers.assert_f32_close): the log-probs' sizes for
log-probs, beta times them for rewards and the loss, each gradient tensor's norm.
"""

import pytest
import torch
from datasets import Dataset
from helpers import PAIRS, assert_f32_close, assert_f32_grad_close, byte_tokenizer, tiny_llama
from transformers import TrainingArguments

from prefopt.data import PairExample, PreferenceCollator, PreferenceTokenizer
from prefopt.data.collate import SequenceBatch
from prefopt.losses import get_loss
from prefopt.training.reference import ModelReference
from prefopt.training.trainer import DictCollator, ListDataset, PreferenceTrainer

trl = pytest.importorskip("trl")


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_first_dpo_step_matches_trl(tmp_path):
    from trl import DPOConfig, DPOTrainer

    tok = byte_tokenizer()
    # TRL
    trl_trainer = DPOTrainer(
        model=tiny_llama(0),
        ref_model=tiny_llama(1),
        processing_class=tok,
        args=DPOConfig(
            output_dir=str(tmp_path / "trl"),
            per_device_train_batch_size=4,
            report_to=[],
            use_cpu=True,
            max_length=64,
            beta=0.1,
            save_strategy="no",
            bf16=False,
        ),
        train_dataset=Dataset.from_list(PAIRS),
    )
    trl_trainer.model.train()
    trl_batch = trl_trainer.data_collator([trl_trainer.train_dataset[i] for i in range(4)])
    trl_loss = trl_trainer.compute_loss(trl_trainer.model, trl_batch)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trl_trainer._metrics["train"].items()}

    # prefopt
    items = PreferenceTokenizer(tok, 64).all([PairExample(p["prompt"], p["chosen"], p["rejected"], "") for p in PAIRS])
    policy = tiny_llama(0).train()
    ours = PreferenceTrainer(
        model=policy,
        args=TrainingArguments(output_dir=str(tmp_path / "ours"), use_cpu=True, report_to="none"),
        train_dataset=ListDataset(items),
        data_collator=DictCollator(PreferenceCollator(tok.pad_token_id)),
        loss_fn=get_loss("dpo"),
        loss_args={"beta": 0.1},
        reference=ModelReference(tiny_llama(1)),
    )
    batch = SequenceBatch(**ours.data_collator(items))
    assert torch.equal(batch.input_ids[:, : trl_batch["input_ids"].shape[1]], trl_batch["input_ids"])
    loss, metrics = ours.batch_loss(policy, batch)
    loss.backward()

    # Rewards and the loss are means over pairs of beta * (policy - reference) summed log-probs, so
    # their rounding is beta times that of the sums: mean |logp| chosen and rejected, policy and
    # reference (about equal in size).
    logps_size = 2 * (abs(metrics["logps/chosen"]) + abs(metrics["logps/rejected"]))
    assert_f32_close(loss.item(), trl_loss.item(), loss.item() + 0.1 * logps_size, "loss")
    assert loss.item() != pytest.approx(0.6931, abs=1e-3)  # different reference: not the trivial value
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert_f32_close(metrics[key], trl_metrics[key], 0.1 * logps_size, key)
    for key in ("logps/chosen", "logps/rejected"):
        assert_f32_close(metrics[key], trl_metrics[key], None, key)
    theirs = grads(trl_trainer.model)
    mine = grads(policy)
    assert set(mine) == set(theirs)
    for name, grad in mine.items():
        assert_f32_grad_close(grad, theirs[name], name)
