"""Evidence for the notes' data recipes on SmolLM2-135M-Instruct: refinement pairs, and feedback -> KTO.

    python -m prefopt.bench.data_recipes refine   [--output-dir runs/bench/refine]
    python -m prefopt.bench.data_recipes feedback [--output-dir runs/bench/feedback]

Every step is the `prefopt` command a user would type, run as a subprocess (printed as it runs).

refine: the first `--held-out` prompts of data_samples/arithmetic.jsonl are never trained on
(the split of `prefopt.bench.online`). The model samples N answers to each training prompt,
scored by number_match; the same model then refines the wrong ones (`pairs --refine-with`,
with a template that gives it the known answer, `{answer}`), and the refinements that score
higher make pairs (and SFT data). Three runs from the untrained model: DPO on the refinement
pairs, SFT on the refinements, and, for comparison, DPO on the model's own best-vs-worst pairs
of the same samples. The table: held-out greedy number_match and exact_match before and after,
and an A/B of the two DPO runs on the held-out prompts (`prefopt eval --against`).

feedback: `prefopt data feedback` labels data_samples/feedback_logs.jsonl with the keyword rule
and with the model itself as the judge; each labeller's agreement with the logs' `annotation`
is counted. KTO trains on each labelling (desirable_weight from KTO's rule), and the table
reports, on two held-out sets, how often the model prefers the chosen answer (own mean token
log-prob) and the per-token log-prob margin, before and after, and the implicit-reward accuracy
after: the data_samples/standard.jsonl questions no log asks (the right or polite answer chosen,
the wrong or rude one rejected), and the single-digit sums of arithmetic.jsonl no log asks
(the right sum chosen, a wrong one rejected).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from prefopt.bench.samples import sample_path

REFINE_TEMPLATE = (
    "Here is a question and a draft answer.\n\n[Question]\n{prompt}\n\n[Draft answer]\n{response}\n\n"
    "The correct result is {answer}. Rewrite the draft answer so that it is correct. "
    "Reply with the corrected answer only."
)


def _prefopt(*argv: str) -> str:
    """Run `prefopt ARGV` in a fresh process; its prefopt lines are printed, its output returned."""
    print("$ prefopt " + " ".join(argv), flush=True)
    done = subprocess.run([sys.executable, "-m", "prefopt", *argv], capture_output=True, text=True)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("prefopt:")]
    for line in lines:
        print("  " + line, flush=True)
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"data_recipes: prefopt {argv[0]} failed (exit {done.returncode})")
    return done.stdout


def _train(args, loss: str, data: Path, name: str, *extra: str) -> str:
    folder = Path(args.output_dir) / name
    _prefopt(
        "train", "--loss", loss, "--model", args.model, "--data", str(data), "--output-dir", str(folder),
        "--num-epochs", str(args.epochs), "--batch-size", "4", "--learning-rate", str(args.learning_rate),
        "--lr-scheduler", "constant", "--max-length", "160", "--save-steps", "10000", "--seed", str(args.seed),
        "--overwrite", *extra,
    )  # fmt: skip
    return str(folder / "final")


def _count(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


# -- refinement pairs ------------------------------------------------------------------------------


def refine(args) -> dict:
    from prefopt.bench.online import held_out_rewards
    from prefopt.data.formats import load_prompts

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts_file = sample_path("arithmetic.jsonl")
    lines = [line for line in prompts_file.read_text().splitlines() if line.strip()]
    held_out = load_prompts([str(prompts_file)])[0][: args.held_out]
    train_prompts, held_out_prompts = out / "train_prompts.jsonl", out / "held_out_prompts.jsonl"
    train_prompts.write_text("".join(line + "\n" for line in lines[args.held_out :]))
    held_out_prompts.write_text("".join(line + "\n" for line in lines[: args.held_out]))
    template = out / "refine_template.txt"
    template.write_text(REFINE_TEMPLATE)
    samples, refined, sft, own = (out / n for n in ("samples.jsonl", "refined.jsonl", "sft.jsonl", "own.jsonl"))
    _prefopt(
        "sample", "--prompts", str(train_prompts), "--output", str(samples), "--model", args.model,
        "--num-samples", str(args.num_samples), "--max-new-tokens", "24", "--temperature", "1.0",
        "--seed", str(args.seed), "--reward", "number_match", "--overwrite",
    )  # fmt: skip
    printed = _prefopt(
        "pairs", "--samples", str(samples), "--output", str(refined), "--sft-output", str(sft),
        "--refine-with", args.model, "--refine-template", str(template), "--refine-max-new-tokens", "32",
        "--reward", "number_match", "--threshold", "1", "--overwrite",
    )  # fmt: skip
    _prefopt("pairs", "--samples", str(samples), "--output", str(own), "--overwrite")
    result = {
        "pairs": printed.strip().splitlines()[0],
        "counts": {"refinement pairs": _count(refined), "refinements (SFT)": _count(sft), "own pairs": _count(own)},
        "runs": {"untrained": held_out_rewards(args.model, held_out, 24)},
    }
    for name, loss, data in (("dpo-refined", "dpo", refined), ("sft-refined", "sft", sft), ("dpo-own", "dpo", own)):
        result["runs"][name] = held_out_rewards(_train(args, loss, data, name), held_out, 24)
        print(f"{name}: {json.dumps(result['runs'][name])}", flush=True)
    printed = _prefopt(
        "eval", "--model", str(out / "dpo-refined"), "--against", str(out / "dpo-own"),
        "--prompts", str(held_out_prompts), "--reward", "number_match", "--max-new-tokens", "24", "--json",
    )  # fmt: skip
    generation = json.loads(printed.strip().splitlines()[-1])["generation"]
    keys = ("win_rate", "win_rate_ci95", "sign_test_p", "prompts_won", "prompts_lost", "prompts_tied")
    result["a_b"] = {key: generation[key] for key in keys}
    return result


def refine_table(result: dict, args) -> str:
    base = result["runs"]["untrained"]
    rows = [
        f"held-out greedy answers to {args.held_out} arithmetic prompts; {result['counts']}",
        "| run | training data | number_match | exact_match | example |",
        "|---|---|---|---|---|",
        f"| untrained | - | {base['number_match']:.3f} | {base['exact_match']:.3f} | {base['example']!r} |",
    ]
    data = {"dpo-refined": "refinement pairs", "sft-refined": "refinements (SFT)", "dpo-own": "own pairs"}
    for name, what in data.items():
        run = result["runs"][name]
        rows.append(
            f"| {name} | {result['counts'][what]} {what} | {run['number_match']:.3f} | {run['exact_match']:.3f} "
            f"| {run['example']!r} |"
        )
    ab = result["a_b"]
    low, high = ab["win_rate_ci95"]
    rows.append(
        f"\nA/B, dpo-refined against dpo-own (`prefopt eval --against`): win rate {ab['win_rate']:.3f}, "
        f"95% interval {low:.2f}-{high:.2f}, sign test p = {ab['sign_test_p']:.3g} "
        f"({ab['prompts_won']} prompts won, {ab['prompts_lost']} lost, {ab['prompts_tied']} tied)"
    )
    return "\n".join(rows)


# -- feedback -> KTO -------------------------------------------------------------------------------


def _asked(logs: Path) -> set[str]:
    asked = set()
    for line in logs.read_text().splitlines():
        asked.update(m["content"] for m in json.loads(line)["messages"] if m["role"] == "user")
    return asked


def _held_out_sums(logs: Path, out: Path, seed: int = 0) -> Path:
    """The single-digit sums of arithmetic.jsonl that no log asks, as conversational pairs: the right
    sum ("4 + 6 = 10.", the logs' answer style) chosen, a wrong one (off by -3..5, seeded) rejected."""
    import random

    rng, asked, rows = random.Random(seed), _asked(logs), []
    for line in sample_path("arithmetic.jsonl").read_text().splitlines():
        row = json.loads(line)
        question = row["prompt"][-1]["content"]
        if any(question in message for message in asked):
            continue
        a, b = question.removeprefix("What is ").removesuffix("?").split(" + ")
        right = int(row["answer"])
        wrong = right + rng.choice([-3, -2, -1, 1, 2, 5])
        rows.append(
            {
                "prompt": row["prompt"],
                "chosen": [{"role": "assistant", "content": f"{a} + {b} = {right}."}],
                "rejected": [{"role": "assistant", "content": f"{a} + {b} = {wrong}."}],
            }
        )
    path = out / "held_out_sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _held_out_pairs(logs: Path, out: Path) -> Path:
    """The standard.jsonl questions no log asks, as conversational pairs."""
    asked = _asked(logs)
    rows = []
    for line in sample_path("standard.jsonl").read_text().splitlines():
        row = json.loads(line)
        if not any(row["prompt"] in message for message in asked):
            rows.append(
                {
                    "prompt": [{"role": "user", "content": row["prompt"]}],
                    "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
                    "rejected": [{"role": "assistant", "content": row["rejected"].strip()}],
                }
            )
    path = out / "held_out_pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def agreement(logs: Path, classifier) -> dict:
    """How often `classifier` gives each reacted-to answer of the logs its `annotation`."""
    from collections import Counter

    conversations, reactions, truth = [], [], []
    for line in logs.read_text().splitlines():
        log = json.loads(line)
        messages, k = log["messages"], 0
        for i, message in enumerate(messages):
            if message["role"] == "assistant" and i + 1 < len(messages) and messages[i + 1]["role"] == "user":
                conversations.append(messages[: i + 1])
                reactions.append(messages[i + 1]["content"])
                truth.append(log["annotation"][k])
                k += 1
    names = {1.0: "positive", -1.0: "negative", 0.0: "neither", None: "unclear"}
    predicted = [names[score] for score in classifier(conversations, reactions)]
    pairs = Counter(f"{t}->{p}" for t, p in zip(truth, predicted, strict=True))
    correct = sum(t == p for t, p in zip(truth, predicted, strict=True))
    return {"reactions": len(truth), "accuracy": correct / len(truth), "confusion": dict(sorted(pairs.items()))}


def feedback(args) -> dict:
    from prefopt.evaluation.evaluate import evaluate
    from prefopt.rewards import get_reward

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    logs = sample_path("feedback_logs.jsonl")
    held_out = {"questions": _held_out_pairs(logs, out), "sums": _held_out_sums(logs, out, args.seed)}
    result = {"held_out": {name: _count(path) for name, path in held_out.items()}, "labellers": {}, "runs": {}}
    labellings = {
        "keywords": ("reaction_keywords", []),
        "judge": ("reaction_judge", ["--judge", args.model]),
    }
    for name, (reward, flags) in labellings.items():
        path = out / f"kto-{name}.jsonl"
        printed = _prefopt("data", "feedback", str(logs), "--output", str(path), *flags, "--overwrite")
        extra = {"model": args.model} if reward == "reaction_judge" else {}
        result["labellers"][name] = {
            **agreement(logs, get_reward(reward, **extra)),
            "summary": next(line for line in printed.splitlines() if "labelled by" in line),
        }
        records = [json.loads(line) for line in path.read_text().splitlines()]
        n_d = sum(r["label"] for r in records)
        n_u = len(records) - n_d
        weight = round(7 / 6 * n_u / n_d, 2)  # the middle of KTO's interval [n_U/n_D, 4/3 n_U/n_D]
        final = _train(args, "kto", path, f"kto-{name}", "--loss-arg", f"desirable_weight={weight}")
        result["runs"][name] = {
            "examples": len(records),
            "desirable": n_d,
            "undesirable": n_u,
            "desirable_weight": weight,
        }
        for held, path in held_out.items():
            metrics = evaluate(str(Path(final).parent), data=[str(path)], max_length=160)
            keys = ("reference_prefers_chosen", "policy_prefers_chosen", "reference_logp_margin", "logp_margin")
            result["runs"][name][held] = {k: metrics[k] for k in (*keys, "reward_accuracy")}
        print(f"{name}: {json.dumps(result['runs'][name])}", flush=True)
    return result


def feedback_table(result: dict) -> str:
    held = result["held_out"]
    rows = [
        f"held out: {held['questions']} questions no log asks (capitals, sums, advice; right or polite answer "
        f"chosen) and {held['sums']} single-digit sums (right sum chosen, a wrong one rejected)",
        "| labeller | agrees with the annotation | KTO data: desirable / undesirable (weight) "
        "| questions: prefers chosen, before → after; log-prob margin | sums: prefers chosen; log-prob margin "
        "| sums: implicit-reward accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for name, labeller in result["labellers"].items():
        run = result["runs"][name]
        cells = []
        for part in ("questions", "sums"):
            m = run[part]
            cells.append(
                f"{m['reference_prefers_chosen']:.2f} → {m['policy_prefers_chosen']:.2f}; "
                f"{m['reference_logp_margin']:.3f} → {m['logp_margin']:.3f}"
            )
        rows.append(
            f"| {name} | {labeller['accuracy']:.2f} of {labeller['reactions']} | {run['desirable']} / "
            f"{run['undesirable']} ({run['desirable_weight']}) | {cells[0]} | {cells[1]} "
            f"| {run['sums']['reward_accuracy']:.2f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefopt.bench.data_recipes", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", choices=("refine", "feedback"))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--held-out", type=int, default=48, help="refine: arithmetic prompts never trained on")
    parser.add_argument("--num-samples", type=int, default=4, help="refine: answers sampled per prompt")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="default: runs/bench/RECIPE")
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir or f"runs/bench/{args.recipe}"
    if args.recipe == "refine":
        result = refine(args)
        table = refine_table(result, args)
    else:
        result = feedback(args)
        table = feedback_table(result)
    print(table)
    Path(args.output_dir, "result.json").write_text(json.dumps({"settings": vars(args), **result}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
