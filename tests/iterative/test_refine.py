"""`prefopt pairs --refine-with`: refinement pairs by hand (directions, counts), the request, a tiny refiner, bad input."""

import json

import pytest
from helpers import save_tiny_model

from prefopt.cli.main import main
from prefopt.data import load_examples
from prefopt.errors import PrefoptError
from prefopt.iterative.pairs import Scored, read_samples
from prefopt.iterative.refine import PLAIN_CUE, REFINE_TEMPLATE, check_template, refine, refinement_request
from prefopt.rewards import get_reward

MSG = [{"role": "user", "content": "What is 2 + 2?"}]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _refiner(answers: dict):
    """A stand-in refiner: the refinement of each original text, from a table."""
    calls = []

    def generate(samples, originals):
        calls.extend(originals)
        return [answers[text] for text in originals]

    return generate, calls


def _samples():
    return [
        # Q1: "3" is wrong, "4" right; "3" repeats, "" is blank
        Scored("What is 2 + 2?", ["3", "4", "3", " "], [0.0, 1.0, 0.0, 0.0], {"answer": "4"}, "s:1",
               completion_ids=[[51, 0], [52, 0], [51, 0], [32, 0]], prompt_ids=[7, 8]),
        Scored(MSG, ["5", "6"], [0.0, 0.0], {"answer": "4"}, "s:2"),  # no ids: text-only records
    ]  # fmt: skip


def test_refinement_pairs_by_hand():
    """With threshold 1.0 and exact_match: Q1's "3" (reward 0 < 1) is refined once (its repeat is
    counted), "4" (1.0) is good enough, " " is empty; Q2's "5" and "6" are both refined. The refiner
    turns "3" into "4" (exact_match 1.0 > 0.0: kept), "5" into "5" (unchanged) and "6" into "five"
    (0.0, not better than 0.0). So 3 requests, 1 pair: chosen "4", rejected "3" with its sampled ids."""
    generate, calls = _refiner({"3": "4", "5": "5", "6": "five"})
    pairs, sft, report = refine(_samples(), generate, threshold=1.0, reward=get_reward("exact_match"))
    assert calls == ["3", "5", "6"]
    assert pairs == [
        {
            "answer": "4",
            "prompt": "What is 2 + 2?",
            "chosen": "4",
            "rejected": "3",
            "chosen_reward": 1.0,
            "rejected_reward": 0.0,
            "prompt_ids": [7, 8],
            "rejected_ids": [51, 0],
        }
    ]
    assert sft == [{"answer": "4", "prompt": "What is 2 + 2?", "completion": "4", "label": True, "reward": 1.0}]
    assert (report.prompts, report.completions, report.refined, report.written) == (2, 6, 3, 1)
    assert (report.duplicates, report.empty, report.good_enough) == (1, 1, 1)
    assert (report.unchanged, report.not_better, report.empty_refinements, report.unscorable) == (1, 1, 0, 0)
    assert report.summary() == (
        "1 refinement pairs from 2 prompts (6 completions: 1 at or above the threshold, 1 empty, 1 repeated; "
        "3 refined; dropped: 0 empty, 1 unchanged, 1 not better, 0 unscorable)"
    )


def test_without_a_reward_every_changed_refinement_is_kept():
    """No threshold, no reward: every distinct non-empty completion is refined (4 of them); empty and
    unchanged refinements are dropped, the rest kept without reward fields. Messages prompts give
    conversational pairs; two originals refined alike give one SFT example."""
    generate, _ = _refiner({"3": "4", "4": "", "5": "4", "6": "4"})
    pairs, sft, report = refine(_samples(), generate)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("4", "3"),
        ([{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]),
        ([{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "6"}]),
    ]
    assert "chosen_reward" not in pairs[0] and "prompt_ids" not in pairs[1]
    assert len(sft) == 2 and report.empty_refinements == 1 and report.refined == 4


def test_the_request_under_a_chat_template_and_without():
    sample = _samples()[0]
    chat = refinement_request(REFINE_TEMPLATE, sample, "3", chat=True)
    assert chat == [{"role": "user", "content": REFINE_TEMPLATE.format(prompt="What is 2 + 2?", response="3")}]
    plain = refinement_request("Q: {prompt} A: {response} (right: {answer})", sample, "3", chat=False)
    assert plain == "Q: What is 2 + 2? A: 3 (right: 4)" + PLAIN_CUE
    with pytest.raises(PrefoptError, match=r"no field 'gold' in the samples file; available: prompt, response, answer"):
        check_template("{prompt} {response} {gold}", {"answer"})
    with pytest.raises(PrefoptError, match=r"no \{response\} placeholder"):
        check_template("Improve: {prompt}", set())
    with pytest.raises(PrefoptError, match=r"refinement template: .*literal brace"):
        check_template("{response} {", set())


def test_cli_with_a_tiny_refiner_writes_pairs_that_train(tmp_path, capsys):
    """A tiny random model refines greedily; every pair's chosen side is its refinement of the
    rejected one (recomputed here through the same generate), the rejected side keeps its ids,
    counts add up, and both output files load as training data."""
    from prefopt.iterative.refine import refiner_generate
    from prefopt.models.inference import load_for_inference
    from prefopt.models.rollout import SampleSettings

    model_dir = save_tiny_model(tmp_path / "refiner", seed=3)
    rows = [
        {"prompt": "Q1", "prompt_ids": [1, 2], "completions": ["ab", "cd"], "completion_ids": [[3, 4], [5, 6]],
         "rewards": [0.0, 1.0]},
        {"prompt": "Q2", "completions": ["x"], "rewards": [0.0]},
    ]  # fmt: skip
    samples = _write(tmp_path / "s.jsonl", rows)
    out, sft = tmp_path / "refined.jsonl", tmp_path / "sft.jsonl"
    argv = ["pairs", "--samples", samples, "--output", str(out), "--refine-with", model_dir, "--sft-output", str(sft)]
    code = main(argv + ["--refine-max-new-tokens", "6", "--threshold", "0.5"])
    model, tokenizer = load_for_inference(model_dir)
    settings = SampleSettings(num_samples=1, max_new_tokens=6, temperature=0.0)
    scored = read_samples(samples)
    refinements = refiner_generate(model, tokenizer, settings)([scored[0], scored[1]], ["ab", "x"])
    expected = [
        (("Q1", "Q2")[s], text.strip(), ("ab", "x")[s])
        for s, text in enumerate(refinements)
        if text.strip() and text.strip() != ("ab", "x")[s]
    ]
    captured = capsys.readouterr()
    if not expected:  # the random refiner ended at once or echoed: nothing to write, one line
        assert code == 2 and "no refinement pairs written: of 2 refinements" in captured.err
        return
    assert code == 0, captured.err
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in written] == expected
    assert [r.get("rejected_ids") for r in written] == [[3, 4] if o == "ab" else None for _, _, o in expected]
    assert (
        f"{len(expected)} refinement pairs from 2 prompts (3 completions: 1 at or above the threshold, 0 empty, "
        "0 repeated; 2 refined;" in captured.out
    )
    examples, report = load_examples(str(out))  # what `prefopt train` reads
    assert report.format == "standard" and [e.chosen for e in examples] == [c for _, c, _ in expected]
    assert [r["label"] for r in map(json.loads, sft.read_text().splitlines())] == [True] * len(expected)


def test_bad_input_is_one_line(tmp_path, capsys):
    samples = _write(tmp_path / "s.jsonl", [{"prompt": "Q", "completions": ["a"]}])
    out = str(tmp_path / "p.jsonl")
    base = ["pairs", "--samples", samples, "--output", out, "--refine-with", str(tmp_path / "none")]
    assert main(base + ["--threshold", "0.5"]) == 2
    assert "no 'rewards': sample with --reward NAME" in capsys.readouterr().err
    assert main(base + ["--refine-template", str(tmp_path / "t.txt")]) == 2
    assert capsys.readouterr().err.strip() == f"prefopt: error: {tmp_path / 't.txt'}: no such template file"
    (tmp_path / "t.txt").write_text("Fix {answer}: {response}")
    assert main(base + ["--refine-template", str(tmp_path / "t.txt")]) == 2
    assert "no field 'answer' in the samples file" in capsys.readouterr().err  # before any model loads
    assert main(base + ["--best-of-n"]) == 2
    assert "choose one of --unpaired, --best-of-n, --against and --refine-with" in capsys.readouterr().err
    assert main(["pairs", "--samples", samples, "--output", out, "--sft-output", out + "2"]) == 2
    assert "--sft-output goes with --refine-with" in capsys.readouterr().err
    generate, _ = _refiner({"a": ""})
    _, _, report = refine(read_samples(samples, need_rewards=False), generate)
    assert report.why_empty() == "of 1 refinements 1 were empty, 0 unchanged, 0 not better and 0 unscorable"
