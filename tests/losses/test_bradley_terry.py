"""`bradley_terry`: a reward model trained on pairs; values, TRL's own loss code, needs, end to end.

The loss: loss = mean_i[-log sigma(r_c - r_r - margin)] + coef * mean_i[(r_c + r_r)^2], the
scores r one scalar per sequence from a sequence classifier (num_labels=1), read at its last real
token. The end-to-end tests train it on a tiny random Llama and read the run's final/ back with the
`reward_model` reward.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import byte_tokenizer, save_tiny_model, tiny_llama

from prefopt import TrainConfig, train
from prefopt.losses import LossError, LossInputs, get_loss, get_loss_spec, register_loss

# Three pairs: the first ranked right, the second wrong, the third a tie.
R_C = [2.0, 0.5, -1.0]
R_R = [1.0, 1.5, -1.0]


def scores(requires_grad: bool = False) -> LossInputs:
    chosen = torch.tensor(R_C, dtype=torch.float64, requires_grad=requires_grad)
    rejected = torch.tensor(R_R, dtype=torch.float64, requires_grad=requires_grad)
    return LossInputs(chosen_scores=chosen, rejected_scores=rejected)


def softplus(x: float) -> float:  # -log sigma(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def test_values_by_hand():
    """d = r_c - r_r = (1, -1, 0).

    plain:         mean(log(1+e^-1), log(1+e^1), log 2) = (0.31326 + 1.31326 + 0.69315) / 3 = 0.77322
    margin 1:      d - 1 = (0, -2, -1): mean(log 2, log(1+e^2), log(1+e)) = (0.69315 + 2.12693 + 1.31326) / 3 = 1.37778
    centering .01: s = r_c + r_r = (3, 2, -2), mean(s^2) = 17/3; 0.77322 + 0.01 * 17/3 = 0.82989
    both:          1.37778 + 0.05667 = 1.43445
    metrics:       accuracy 1/3 (the tie counts as wrong), margin mean 0, chosen mean 0.5, rejected mean 0.5
    """
    loss = get_loss("bradley_terry")
    plain = (softplus(-1) + softplus(1) + math.log(2)) / 3
    with_margin = (math.log(2) + softplus(2) + softplus(1)) / 3
    center = 0.01 * (9 + 4 + 4) / 3
    assert plain == pytest.approx(0.7732235185, abs=1e-10)
    assert with_margin == pytest.approx(1.3777789597, abs=1e-10)
    cases = [({}, plain), ({"margin": 1.0}, with_margin), ({"center_rewards_coefficient": 0.01}, plain + center)]
    cases += [({"margin": 1.0, "center_rewards_coefficient": 0.01}, with_margin + center)]
    cases += [
        ({"center_rewards_coefficient": 0.0}, plain),
        ({"margin": -1.0}, (softplus(-2) + math.log(2) + softplus(-1)) / 3),
    ]
    for hyper, expected in cases:
        out = loss(scores(), **hyper)
        assert out.loss.dtype == torch.float64
        assert out.loss.item() == pytest.approx(expected, abs=1e-12), hyper
    metrics = {k: float(v) for k, v in loss(scores()).metrics.items()}
    assert metrics == {
        "rewards/chosen": 0.5,
        "rewards/rejected": 0.5,
        "rewards/margins": 0.0,
        "rewards/accuracies": pytest.approx(1 / 3),
    }


def test_gradients_by_hand():
    """d loss / d r_c,i = [-sigma(-(d_i - m)) + 2 coef s_i] / n; d loss / d r_r,i = [+sigma(-(d_i - m)) + 2 coef s_i] / n.

    margin 1, coef 0.01, n = 3: d - m = (0, -2, -1), sigma(-(d - m)) = (0.5, 0.88080, 0.73106),
    2 coef s = (0.06, 0.04, -0.04):
    r_c: (-0.5 + 0.06, -0.88080 + 0.04, -0.73106 - 0.04) / 3 = (-0.14667, -0.28027, -0.25702)
    r_r: ( 0.5 + 0.06,  0.88080 + 0.04,  0.73106 - 0.04) / 3 = ( 0.18667,  0.30693,  0.23035)
    """
    inputs = scores(requires_grad=True)
    get_loss("bradley_terry")(inputs, margin=1.0, center_rewards_coefficient=0.01).loss.backward()
    sig = [1 / (1 + math.exp(x)) for x in (0.0, -2.0, -1.0)]  # sigma(-(d - m))
    two_cs = [0.06, 0.04, -0.04]
    expected_c = [(-p + c) / 3 for p, c in zip(sig, two_cs, strict=True)]
    expected_r = [(p + c) / 3 for p, c in zip(sig, two_cs, strict=True)]
    assert expected_c == pytest.approx([-0.14667, -0.28027, -0.25702], abs=1e-5)
    assert inputs.chosen_scores.grad.tolist() == pytest.approx(expected_c, abs=1e-12)
    assert inputs.rejected_scores.grad.tolist() == pytest.approx(expected_r, abs=1e-12)
    fn = get_loss("bradley_terry")

    def f(c, r):
        return fn(LossInputs(chosen_scores=c, rejected_scores=r), margin=0.3, center_rewards_coefficient=0.05).loss

    g = torch.Generator().manual_seed(0)
    args = tuple(torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("margin,coef", [(0.0, None), (0.7, None), (0.0, 0.01), (-0.4, 0.5)])
def test_matches_trl_reward_trainer_compute_loss(margin, coef):
    """TRL 1.x's `RewardTrainer.compute_loss` itself, run on given scores: its `self` and model are
    stand-ins (the model returns the scores as logits, chosen rows first, as TRL's collator builds
    them). A constant margin is TRL's per-example `margin` column with every entry equal."""
    from trl import RewardTrainer

    g = torch.Generator().manual_seed(1)
    chosen, rejected = (
        torch.randn(6, generator=g, dtype=torch.float64) * 3,
        torch.randn(6, generator=g, dtype=torch.float64),
    )
    chosen[0] = rejected[0]  # a tie
    identity = lambda x: x  # noqa: E731  (one process: gathers are identities)
    fake_self = SimpleNamespace(
        model=SimpleNamespace(training=False),
        args=SimpleNamespace(center_rewards_coefficient=coef),
        accelerator=SimpleNamespace(gather=identity, gather_for_metrics=identity),
        _metrics={"train": {}, "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    logits = torch.cat([chosen, rejected])[:, None]
    inputs = {"input_ids": torch.zeros(12, 3, dtype=torch.long), "attention_mask": torch.ones(12, 3, dtype=torch.long)}
    if margin:
        inputs["margin"] = torch.full((6,), margin, dtype=torch.float64)
    trl_loss = RewardTrainer.compute_loss(fake_self, lambda **kw: SimpleNamespace(logits=logits), inputs)
    ours = get_loss("bradley_terry")(
        LossInputs(chosen_scores=chosen, rejected_scores=rejected), margin=margin, center_rewards_coefficient=coef
    )
    assert ours.loss.item() == pytest.approx(trl_loss.item(), abs=1e-12)
    trl_metrics = fake_self._metrics["eval"]
    assert float(ours.metrics["rewards/accuracies"]) == pytest.approx(trl_metrics["accuracy"][0], abs=1e-12)
    assert float(ours.metrics["rewards/margins"]) == pytest.approx(trl_metrics["margin"][0], abs=1e-12)


def test_declared_needs_and_checks():
    spec = get_loss_spec("bradley_terry")
    assert spec.needs == ["sequence_scores"] and not spec.needs_reference and spec.paired
    assert spec.hyperparameters == {"margin": 0.0, "center_rewards_coefficient": None}
    with pytest.raises(LossError, match="'bradley_terry' needs chosen_scores"):
        get_loss("bradley_terry")(LossInputs(torch.zeros(2), torch.zeros(2)))
    with pytest.raises(LossError, match="center_rewards_coefficient must be a number >= 0"):
        get_loss("bradley_terry")(scores(), center_rewards_coefficient=-0.1)
    with pytest.raises(LossError, match="margin must be a finite number"):
        get_loss("bradley_terry")(scores(), margin=float("nan"))
    with pytest.raises(LossError, match="is paired.*3 chosen and 2 rejected"):
        get_loss("bradley_terry")(LossInputs(chosen_scores=torch.zeros(3), rejected_scores=torch.zeros(2)))
    with pytest.raises(TypeError, match="cannot be combined with needs_reference; pass needs_reference=False"):
        register_loss("test_rm_with_reference", needs_sequence_scores=True)(lambda inputs: None)
    # half-precision scores are computed in float32, as every loss's inputs
    half = LossInputs(chosen_scores=torch.tensor(R_C).bfloat16(), rejected_scores=torch.tensor(R_R).bfloat16())
    assert get_loss("bradley_terry")(half).loss.dtype == torch.float32


def test_pooling_reads_the_last_real_token_when_pad_is_eos():
    """pad == eos (the byte tokenizer's <|endoftext|>, id 0) and every sequence ends with it. Our score
    is the classifier's output at that closing EOS: equal to scoring the unpadded row alone. The
    model's own pooling (last token that is not pad_token_id) lands one token earlier instead."""
    from transformers import LlamaForSequenceClassification

    from prefopt.data import PairExample, PreferenceCollator, PreferenceTokenizer
    from prefopt.training.trainer import sequence_scores

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = tiny_llama(0).config
    config.num_labels = 1
    model = LlamaForSequenceClassification(config).eval()
    tokenizing = PreferenceTokenizer(tokenizer, 64)
    pairs = [
        PairExample("Say a number.", " 42", " no thanks, I will not", ""),
        PairExample("Hi?", " Hello there!", " x", ""),
    ]
    batch = PreferenceCollator(tokenizer.pad_token_id)([tokenizing.pair(p, i) for i, p in enumerate(pairs)])
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 0
    with torch.no_grad():
        ours = sequence_scores(model, batch)
        lengths = batch.attention_mask.sum(1)
        assert all(batch.input_ids[i, n - 1] == 0 for i, n in enumerate(lengths.tolist()))  # each row ends with EOS
        model.config.pad_token_id = None  # one unpadded row: the model pools at its last position
        alone = torch.cat([model(input_ids=batch.input_ids[i : i + 1, :n]).logits[:, 0] for i, n in enumerate(lengths)])
        model.config.pad_token_id = 0
        transformers_pooling = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
    torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-5)
    assert (ours - transformers_pooling).abs().min() > 1e-4  # the trap: it skipped the EOS


# -- end to end ---------------------------------------------------------------------------------


def digit_pairs(n: int, seed: int) -> list[dict]:
    """Chosen answers are digits, rejected ones letters, of the same length."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        size = rng.randint(3, 8)
        pairs.append(
            {
                "prompt": rng.choice(["Answer:", "Reply with something.", "Q: go", "Write a code."]),
                "chosen": " " + "".join(rng.choice("0123456789") for _ in range(size)),
                "rejected": " " + "".join(rng.choice("abcdefghij") for _ in range(size)),
            }
        )
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def reward_model_accuracy(path, pairs) -> tuple[float, float]:
    """(share of pairs the reward_model reward ranks right, its mean score of the chosen answers)."""
    from prefopt.rewards import get_reward

    reward = get_reward("reward_model", path=str(path), dtype="float32")
    prompts = [p["prompt"] for p in pairs]
    chosen = reward(prompts, [p["chosen"] for p in pairs])
    rejected = reward(prompts, [p["rejected"] for p in pairs])
    wins = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    return wins / len(pairs), sum(chosen) / len(chosen)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def bt_config(tmp_path, model, train_file, eval_file, **overrides) -> TrainConfig:
    config = dict(
        model=model,
        data=[train_file],
        eval_data=[eval_file],
        output_dir=str(tmp_path / "run"),
        loss="bradley_terry",
        batch_size=8,
        num_epochs=2,
        learning_rate=3e-3,
        logging_steps=1,
        max_length=64,
        save_steps=1000,
        seed=0,
    )
    return TrainConfig(**{**config, **overrides})


def test_trained_reward_model_ranks_held_out_pairs_and_loads_as_a_reward(tmp_path, tiny_model, monkeypatch):
    from prefopt.models.loading import load_policy

    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    train_pairs, held_out = digit_pairs(64, seed=0), digit_pairs(32, seed=1)
    train_file = write_jsonl(tmp_path / "train.jsonl", train_pairs)
    eval_file = write_jsonl(tmp_path / "eval.jsonl", held_out)
    config = bt_config(tmp_path, tiny_model, train_file, eval_file)

    # The model the run starts from (same seed: the same new score head), saved as a reward model.
    from transformers import set_seed

    set_seed(config.seed)
    start, tokenizer = load_policy(config, sequence_classifier=True)
    start.save_pretrained(tmp_path / "start")
    tokenizer.save_pretrained(tmp_path / "start")
    before, before_chosen = reward_model_accuracy(tmp_path / "start", held_out)

    result = train(config)
    saved = json.loads((result.final_dir / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"] and len(saved["id2label"]) == 1
    assert saved["pad_token_id"] == tokenizer.pad_token_id == tokenizer.eos_token_id
    after, after_chosen = reward_model_accuracy(result.final_dir, held_out)

    logs = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    train_logs = [m for m in logs if "loss" in m and "rewards/accuracies" in m]
    first, last = train_logs[:1], train_logs[-2:]  # step 1 is scored with the starting weights
    accuracy = lambda ms: sum(m["rewards/accuracies"] for m in ms) / len(ms)  # noqa: E731
    print(
        f"held-out accuracy (reward_model reward) {before:.3f} -> {after:.3f}; train accuracy "
        f"{accuracy(first):.3f} (step 1) -> {accuracy(last):.3f} (last 2 of {len(train_logs)} steps); "
        f"loss {train_logs[0]['loss']:.4f} -> {train_logs[-1]['loss']:.4f}"
    )
    assert after > before and after >= 0.8
    assert accuracy(last) > accuracy(first) and train_logs[-1]["loss"] < train_logs[0]["loss"] / 2
    # The trainer's pooling and the reward's agree: same held-out numbers before and after training.
    assert result.eval_before["eval_before_rewards/accuracies"] == pytest.approx(before, abs=1e-6)
    assert result.eval_before["eval_before_rewards/chosen"] == pytest.approx(before_chosen, abs=1e-4)
    assert result.eval_after["eval_rewards/accuracies"] == pytest.approx(after, abs=1e-6)
    assert result.eval_after["eval_rewards/chosen"] == pytest.approx(after_chosen, abs=1e-4)


def test_lora_trains_the_score_head_and_its_adapter_loads_as_a_reward(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    pairs = digit_pairs(16, seed=2)
    train_file = write_jsonl(tmp_path / "train.jsonl", pairs)
    eval_file = write_jsonl(tmp_path / "eval.jsonl", pairs[:8])
    config = bt_config(tmp_path, tiny_model, train_file, eval_file, lora=True, max_steps=3, num_epochs=1)
    result = train(config)
    trainable = [name for name, p in result.trainer.model.named_parameters() if p.requires_grad]
    assert any(".score.modules_to_save." in name for name in trainable), trainable
    adapter = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    accuracy, chosen = reward_model_accuracy(result.final_dir, pairs[:8])
    assert result.eval_after["eval_rewards/accuracies"] == pytest.approx(accuracy, abs=1e-6)
    assert result.eval_after["eval_rewards/chosen"] == pytest.approx(chosen, abs=1e-4)
    assert result.eval_after["eval_rewards/chosen"] != pytest.approx(result.eval_before["eval_before_rewards/chosen"])
