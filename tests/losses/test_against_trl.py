"""prefopt's losses against TRL's own implementations on the same inputs (to float32 rounding).

TRL 1.x computes its DPO-family and KTO losses inside `DPOTrainer._compute_loss` /
`KTOTrainer._compute_loss`, starting from a model. So each test builds TRL's trainer
around a tiny random Llama (policy) and a differently-initialised one (reference),
lets TRL compute the loss on one of its own batches, then computes the completion
log-probs of the very same batch from the same two models and feeds them to prefopt.

TRL's log-probs and ours come from two float32 forwards (different batch shapes, so different
summation orders): each summed log-prob carries rounding of about eps * sqrt(n) * its size, and
a loss or reward reads them through beta * (policy - reference), a small difference of large sums.
So tolerances are relative to beta * (the sizes of the four log-probs of a pair) plus the value's
own size (helpers.assert_f32_close). The largest error seen is 0.16 of that tolerance (sppo_hard,
whose squared loss is the largest value); DPO's reward margin (0.093, beta 0.5) is checked to
2.7e-4, so a 1% change of beta or any other formula change shows.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from helpers import PAIRS, assert_f32_close, byte_tokenizer, tiny_llama

from prefopt.losses import LossInputs, get_loss

trl = pytest.importorskip("trl")


def completion_logps(model, input_ids, attention_mask, completion_mask):
    """Sum of log p(token) over completion tokens; TRL's batches are right-padded."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    token_logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = completion_mask[:, 1:].float()
    return (token_logps * mask).sum(-1), mask.sum(-1)


@pytest.fixture(scope="module")
def dpo_trainer(tmp_path_factory):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl_dpo")),
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        max_length=64,
        save_strategy="no",
        bf16=False,  # TRL defaults to bf16 autocast, also on the CPU
    )
    trainer = DPOTrainer(
        model=tiny_llama(0),
        ref_model=tiny_llama(1),
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=byte_tokenizer(),
    )
    trainer.model.train()  # TRL files metrics under "train" only in training mode (no dropout here)
    batch = next(iter(trainer.get_train_dataloader()))
    policy = completion_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    reference = completion_logps(
        trainer.ref_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    )
    return trainer, batch, policy, reference


def _paired_inputs(policy, reference) -> LossInputs:
    (logps, lengths), (ref_logps, _) = policy, reference
    pc, pr = logps.chunk(2)
    rc, rr = ref_logps.chunk(2)
    lc, lr = lengths.chunk(2)
    return LossInputs(pc, pr, lc, lr, reference_chosen_logps=rc, reference_rejected_logps=rr)


def operand_size(inputs: LossInputs, paired: bool = True) -> float:
    """The largest sum of |summed log-prob| that one example's value is computed from."""
    chosen = inputs.policy_chosen_logps.abs() + inputs.reference_chosen_logps.abs()
    rejected = inputs.policy_rejected_logps.abs() + inputs.reference_rejected_logps.abs()
    per_example = chosen + rejected if paired else torch.cat([chosen, rejected])
    if inputs.policy_kl_logps is not None:  # KTO's reference point z: a mean over the mismatched pairs
        per_example = per_example + inputs.policy_kl_logps.abs().mean() + inputs.reference_kl_logps.abs().mean()
    return float(per_example.max())


CASES = [
    # (TRL loss_type, prefopt name, TRL attributes, prefopt hyperparameters)
    ("sigmoid", "dpo", {"beta": 0.1}, {"beta": 0.1}),
    ("sigmoid", "dpo", {"beta": 0.5}, {"beta": 0.5}),
    ("ipo", "ipo", {"beta": 0.1}, {"beta": 0.1}),
    ("hinge", "hinge", {"beta": 0.3}, {"beta": 0.3}),
    ("robust", "robust", {"beta": 0.1, "label_smoothing": 0.2}, {"beta": 0.1, "label_smoothing": 0.2}),
    ("nca_pair", "nca_pair", {"beta": 0.1}, {"beta": 0.1}),
    ("bco_pair", "bco_pair", {"beta": 0.1}, {"beta": 0.1, "delta": 0.0}),
    ("apo_zero", "apo_zero", {"beta": 0.1}, {"beta": 0.1}),
    ("apo_down", "apo_down", {"beta": 0.1}, {"beta": 0.1}),
    ("sppo_hard", "sppo_hard", {"beta": 0.1}, {"beta": 0.1}),
    ("exo_pair", "exo_pair", {"beta": 0.1, "label_smoothing": 1e-3}, {"beta": 0.1, "label_smoothing": 1e-3}),
]


@pytest.mark.parametrize("trl_type,name,trl_attrs,hypers", CASES)
def test_dpo_family_matches_trl(dpo_trainer, trl_type, name, trl_attrs, hypers):
    trainer, batch, policy, reference = dpo_trainer
    trainer.loss_types, trainer.loss_weights = [trl_type], [1.0]
    trainer.label_smoothing = 0.0
    for key, value in trl_attrs.items():
        setattr(trainer, key, value)
    trainer._metrics["train"].clear()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
    inputs = _paired_inputs(policy, reference)
    ours = get_loss(name)(inputs, **hypers)
    beta_size = hypers["beta"] * operand_size(inputs)
    assert_f32_close(ours.loss.item(), trl_loss.item(), abs(trl_loss.item()) + beta_size, "loss")
    assert ours.loss.item() != 0.0
    if name == "dpo":  # TRL's reward metrics are the DPO implicit rewards
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert_f32_close(float(ours.metrics[key]), trainer._metrics["train"][key][-1], beta_size, key)


def test_kto_matches_trl(tmp_path):
    from trl.experimental.kto import KTOConfig, KTOTrainer

    rows = [
        {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
        for p in PAIRS
        for side in ("chosen", "rejected")
    ][:5]  # 3 desirable, 2 undesirable: unbalanced on purpose
    args = KTOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=5,
        report_to=[],
        use_cpu=True,
        max_length=64,
        save_strategy="no",
        bf16=False,
        beta=0.2,
        desirable_weight=1.5,
        undesirable_weight=0.7,
    )
    trainer = KTOTrainer(
        model=tiny_llama(0),
        ref_model=tiny_llama(1),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=byte_tokenizer(),
    )
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
    labels = torch.as_tensor(batch["label"], dtype=torch.bool)

    def logps(model, prefix=""):
        return completion_logps(
            model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], batch[f"{prefix}completion_mask"]
        )[0]

    pol, ref = logps(trainer.model), logps(trainer.ref_model)
    inputs = LossInputs(
        policy_chosen_logps=pol[labels],
        policy_rejected_logps=pol[~labels],
        reference_chosen_logps=ref[labels],
        reference_rejected_logps=ref[~labels],
        policy_kl_logps=logps(trainer.model, "KL_"),
        reference_kl_logps=logps(trainer.ref_model, "KL_"),
    )
    ours = get_loss("kto")(inputs, beta=0.2, desirable_weight=1.5, undesirable_weight=0.7)
    # the weights scale the loss's sensitivity to the log-probs, up to 1.5 * beta
    beta_size = 1.5 * 0.2 * operand_size(inputs, paired=False)
    assert_f32_close(ours.loss.item(), trl_loss.item(), abs(trl_loss.item()) + beta_size, "loss")
    kl = trainer._metrics["train"]["kl"][-1]  # mean(policy - reference) over the mismatched pairs
    assert_f32_close(float(ours.metrics["kl"]), kl, operand_size(inputs, paired=False), "kl")


def test_orpo_odds_ratio_matches_trl():
    """TRL's `odds_ratio_loss` takes mean token log-probs; compare the odds-ratio term.

    Our NLL is the mean over response tokens (TRL's spans prompt and response), so
    ours.loss - nll must equal -mean(TRL's beta * log sigma(log_odds)).
    """
    from types import SimpleNamespace

    from trl.experimental.orpo import ORPOTrainer

    lengths_c = torch.tensor([3.0, 7.0, 1.0, 12.0])
    lengths_r = torch.tensor([5.0, 2.0, 4.0, 9.0])
    logps_c = torch.tensor([-2.1, -9.0, -0.05, -30.0])
    logps_r = torch.tensor([-6.0, -1.5, -7.7, -12.0])
    stub = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_rewards, _, trl_ratio, trl_log_odds = ORPOTrainer.odds_ratio_loss(
        stub, logps_c / lengths_c, logps_r / lengths_r
    )
    ours = get_loss("orpo")(LossInputs(logps_c, logps_r, lengths_c, lengths_r), beta=0.25)
    # Same float32 inputs on both sides: rounding relative to the size of the terms, the mean
    # log-probs and their log(1 - exp(mean)) (-3.0 for the mean log-prob -0.05).
    means = torch.cat([logps_c / lengths_c, logps_r / lengths_r])
    size = float(torch.cat([means, torch.log1p(-means.exp())]).abs().max())
    assert_f32_close((ours.loss - ours.metrics["nll"]).item(), -losses.mean().item(), 0.25 * size, "odds term")
    assert_f32_close(float(ours.metrics["log_odds_ratio"]), trl_ratio.item(), size, "log_odds_ratio")
    assert_f32_close(float(ours.metrics["log_odds_chosen"]), trl_log_odds.item(), size, "log_odds_chosen")
    assert_f32_close(float(ours.metrics["rewards/chosen"]), chosen_rewards.mean().item(), 0.25 * size, "rewards")
