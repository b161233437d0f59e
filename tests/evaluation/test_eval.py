"""`prefopt eval`: every number against a hand computation with full logits on two tiny Llamas."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import save_tiny_model

from prefopt import TrainConfig, train
from prefopt.cli.main import main
from prefopt.data import load_examples
from prefopt.data.tokenize import PreferenceTokenizer
from prefopt.evaluation.evaluate import evaluate, format_result, winning
from prefopt.models.inference import load_for_inference
from prefopt.models.rollout import SampleSettings, sample_prompts
from prefopt.rewards import available_rewards, register_reward

SAMPLES = Path(__file__).resolve().parents[2] / "data_samples"
PAIRS = str(SAMPLES / "standard.jsonl")
BETA = 0.2

if "vowel_count" not in available_rewards():

    @register_reward("vowel_count")
    def vowel_count(prompts, completions, **columns):
        """Test reward: the number of vowels in the answer."""
        return [sum(ch in "aeiou" for ch in text) for text in completions]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """(policy, reference): two tiny Llamas with different random weights and one tokenizer."""
    root = tmp_path_factory.mktemp("eval_models")
    return save_tiny_model(root / "policy", seed=1), save_tiny_model(root / "reference", seed=0)


def _scores_by_hand(model, tokenizer, prompt_ids, completion_ids):
    """(summed completion log-prob, per-position log-probs over the vocabulary) with full logits."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logprobs = F.log_softmax(logits, dim=-1)
    n = len(prompt_ids)
    positions = torch.arange(n - 1, n - 1 + len(completion_ids))  # position t predicts token t + 1
    targets = torch.tensor(completion_ids)
    return logprobs[positions, targets].sum().item(), logprobs[positions]


def _expected(policy_dir, reference_dir, limit):
    policy, tokenizer = load_for_inference(policy_dir, dtype="float32", device="cpu")
    reference, _ = load_for_inference(reference_dir, dtype="float32", device="cpu")
    examples = load_examples([PAIRS])[0][:limit]
    items = PreferenceTokenizer(tokenizer, 96).all(examples)
    rows = []
    for item in items:
        row = {}
        for side, completion in (("chosen", item.chosen_ids), ("rejected", item.rejected_ids)):
            pi, pi_dist = _scores_by_hand(policy, tokenizer, item.prompt_ids, completion)
            ref, ref_dist = _scores_by_hand(reference, tokenizer, item.prompt_ids, completion)
            row[side] = (pi, ref, len(completion))
            if side == "chosen":
                # KL(pi || pi_ref) summed over the chosen completion's tokens, full vocabulary
                row["kl"] = (pi_dist.exp() * (pi_dist - ref_dist)).sum().item()
                row["kl_reverse"] = (ref_dist.exp() * (ref_dist - pi_dist)).sum().item()
        rows.append(row)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    gap = [(r["chosen"][0] - r["chosen"][1]) - (r["rejected"][0] - r["rejected"][1]) for r in rows]
    per_token = lambda r, side, k: r[side][k] / r[side][2]  # noqa: E731
    return {
        "pairs": len(rows),
        "reward_accuracy": mean([g > 0 for g in gap]),
        "reward_margin": BETA * mean(gap),
        "reward_chosen": BETA * mean([r["chosen"][0] - r["chosen"][1] for r in rows]),
        "reward_rejected": BETA * mean([r["rejected"][0] - r["rejected"][1] for r in rows]),
        "loss": mean([-math.log(1 / (1 + math.exp(-BETA * g))) for g in gap]),  # DPO, no label smoothing
        "logps_shift_chosen": mean([r["chosen"][0] - r["chosen"][1] for r in rows]),
        "logps_shift_rejected": mean([r["rejected"][0] - r["rejected"][1] for r in rows]),
        "kl": mean([r["kl"] for r in rows]),
        "kl_reverse": mean([r["kl_reverse"] for r in rows]),
        "kl_per_token": sum(r["kl"] for r in rows) / sum(r["chosen"][2] for r in rows),
        "policy_prefers_chosen": mean([per_token(r, "chosen", 0) > per_token(r, "rejected", 0) for r in rows]),
        "reference_prefers_chosen": mean([per_token(r, "chosen", 1) > per_token(r, "rejected", 1) for r in rows]),
        "logp_margin": mean([per_token(r, "chosen", 0) - per_token(r, "rejected", 0) for r in rows]),
        "reference_logp_margin": mean([per_token(r, "chosen", 1) - per_token(r, "rejected", 1) for r in rows]),
    }


def test_pair_numbers_equal_a_hand_computation_with_full_logits(two_models):
    policy_dir, reference_dir = two_models
    result = evaluate(
        policy_dir, reference=reference_dir, data=[PAIRS], limit=7, max_length=96, loss="dpo", beta=BETA, batch_size=3
    )
    expected = _expected(policy_dir, reference_dir, limit=7)
    assert result["pairs"] == 7 and result["loss_name"] == "dpo" and result["beta"] == BETA
    for key, value in expected.items():
        # float32 sums of ~30 log-probs of magnitude ~5 against float64: 1e-4 relative is ample
        assert result[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key
    # the two random models really differ, so the test is not comparing zeros
    assert abs(expected["logps_shift_chosen"]) > 1 and expected["kl"] > 0.1


def test_policy_equal_to_reference_gives_zero_shifts_and_kl(two_models):
    _, reference_dir = two_models
    result = evaluate(reference_dir, reference=reference_dir, data=[PAIRS], limit=5, max_length=96)
    for key in ("reward_accuracy", "reward_margin", "logps_shift_chosen", "logps_shift_rejected", "kl", "kl_reverse"):
        assert result[key] == pytest.approx(0.0, abs=1e-5), key
    assert result["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # the measure that is informative before training: the same for both
    assert result["policy_prefers_chosen"] == result["reference_prefers_chosen"]


def test_reference_and_loss_come_from_the_run(tmp_path, tiny_model_dir):
    run = train(
        TrainConfig(
            model=tiny_model_dir,
            data=[PAIRS],
            output_dir=str(tmp_path / "run"),
            loss="dpo",
            loss_args={"beta": 0.3},
            max_steps=2,
            batch_size=2,
            learning_rate=1e-3,
            max_length=96,
            save_steps=100,
        )
    )
    assert (run.output_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # train writes its report
    for model in (run.output_dir, run.final_dir):
        result = evaluate(str(model), data=[PAIRS], limit=4, max_length=96)
        assert result["reference"] == tiny_model_dir
        assert result["model"] == str(run.final_dir)
        assert result["loss_name"] == "dpo" and result["beta"] == 0.3
        assert result["kl"] > 0  # trained at lr 1e-3: the policy moved


def test_sampled_answers_reward_and_win_rate_by_hand(two_models, tmp_path):
    policy_dir, reference_dir = two_models
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Say hi.", "Be kind.", "Why?", "2+2?"]))
    settings = SampleSettings(num_samples=2, max_new_tokens=10, temperature=0.0)
    from prefopt.rewards import get_reward

    result = evaluate(
        policy_dir, reference=reference_dir, prompts=[str(prompts)], reward=get_reward("vowel_count"),
        sample_settings=settings,
    )  # fmt: skip
    generation = result["generation"]
    assert "pairs" not in result  # no --data: no pair numbers
    # by hand: greedy answers of each model, vowels counted, i-th answer against i-th answer
    texts = ["Say hi.", "Be kind.", "Why?", "2+2?"]
    vowels = lambda s: sum(ch in "aeiou" for ch in s)  # noqa: E731
    answers = {}
    for name, folder in (("policy", policy_dir), ("reference", reference_dir)):
        model, tok = load_for_inference(folder, dtype="float32", device="cpu")
        answers[name] = [c for s in sample_prompts(model, tok, texts, settings) for c in s.completions]
    pol, ref = [vowels(a) for a in answers["policy"]], [vowels(a) for a in answers["reference"]]
    assert generation["reward_policy"] == pytest.approx(sum(pol) / len(pol))
    assert generation["reward_reference"] == pytest.approx(sum(ref) / len(ref))
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(pol, ref, strict=True)]
    assert generation["win_rate"] == pytest.approx(sum(wins) / len(wins))
    assert generation["ties"] == wins.count(0.5)
    # the example shown is the first answer the policy won (what training changed), else the first
    shown = wins.index(1.0) if 1.0 in wins else 0
    assert generation["example"]["policy"] == answers["policy"][shown]
    assert generation["example"]["reference"] == answers["reference"][shown]
    assert generation["example"]["policy_won"] == (1.0 in wins)


def test_a_judges_win_rate_needs_no_answer_column(two_models, tmp_path):
    """`prefopt eval --prompts P --reward judge` on prompts with no `answer`: the win rate is the
    judge's comparison of the two models' answers (both orders), the mean rewards are left out."""
    from prefopt.rewards import get_reward

    policy_dir, reference_dir = two_models
    texts = ["Say hi.", "Why?", "2+2?"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
    settings = SampleSettings(num_samples=1, max_new_tokens=6, temperature=0.0)
    judge = get_reward("judge", model=reference_dir)
    result = evaluate(
        policy_dir, reference=reference_dir, prompts=[str(prompts)], reward=judge, sample_settings=settings
    )
    generation = result["generation"]
    answers = {}
    for name, folder in (("policy", policy_dir), ("reference", reference_dir)):
        model, tok = load_for_inference(folder, dtype="float32", device="cpu")
        answers[name] = [s.completions[0] for s in sample_prompts(model, tok, texts, settings)]
    wins = judge.compare(texts, answers["policy"], answers["reference"])
    assert generation["win_rate"] == pytest.approx(sum(wins) / len(wins), abs=1e-6)
    assert generation["reward_policy"] is None and generation["reward_reference"] is None
    report = format_result(result)
    assert "win rate of the policy over the reference" in report and "Traceback" not in report


def test_against_compares_two_models_answers_a_b(two_models, tmp_path, capsys):
    """--against OTHER: the sampled answers are the model's against OTHER's (A/B), the same numbers
    as naming OTHER the reference, while the pair numbers keep the run's reference; the JSON has
    the interval and the prompts won, lost and tied (they sum to the prompts)."""
    from prefopt.rewards import get_reward

    policy_dir, reference_dir = two_models
    other = save_tiny_model(tmp_path / "other", seed=2)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Say hi.", "Be kind.", "Why?", "2+2?"]))
    settings = SampleSettings(num_samples=2, max_new_tokens=8, temperature=0.0)
    common = dict(prompts=[str(prompts)], reward=get_reward("vowel_count"), sample_settings=settings)
    ab = evaluate(policy_dir, reference=reference_dir, against=other, data=[PAIRS], limit=4, **common)
    as_reference = evaluate(policy_dir, reference=other, **common)["generation"]
    keys = ("win_rate", "reward_policy", "reward_reference", "win_rate_ci95", "sign_test_p")
    assert {k: ab["generation"][k] for k in keys} == {k: as_reference[k] for k in keys}
    assert ab["against"] == other and ab["reference"] == reference_dir
    assert ab["pairs"] == 4  # held-out pair numbers still against the reference
    counts = [ab["generation"][k] for k in ("prompts_won", "prompts_lost", "prompts_tied")]
    assert sum(counts) == 4
    assert "win rate of the policy over the --against model" in format_result(ab)
    assert main(["eval", "--model", policy_dir, "--reference", reference_dir, "--against", other, "--data", PAIRS]) == 2
    assert "eval --against compares sampled answers: pass --prompts FILE" in capsys.readouterr().err


def test_winning_counts_ties_as_half_and_skips_unscored():
    assert [winning(2, 1), winning(1, 1), winning(0, 1), winning(None, 1)] == [1.0, 0.5, 0.0, None]


def test_cli_json_prints_one_object(two_models, capsys):
    policy_dir, reference_dir = two_models
    argv = ["eval", "--model", policy_dir, "--reference", reference_dir, "--data", PAIRS, "--limit", "3"]
    assert main([*argv, "--max-length", "96", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("reward_accuracy", "reward_margin", "kl", "loss", "logps_shift_chosen", "policy_prefers_chosen"):
        assert isinstance(result[key], float), key
    assert main([*argv, "--max-length", "96"]) == 0
    assert "sequence KL(pi || pi_ref)" in capsys.readouterr().out


def test_cli_without_a_reference_or_data_says_what_to_pass(two_models, capsys):
    policy_dir, _ = two_models
    assert main(["eval", "--model", policy_dir, "--data", PAIRS]) == 2
    assert "pass --reference" in capsys.readouterr().err
    assert main(["eval", "--model", policy_dir, "--reference", policy_dir]) == 2
    assert "--data FILE" in capsys.readouterr().err
