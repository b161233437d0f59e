"""Evidence for the online losses: does each one learn the arithmetic task, at what cost?

    python -m prefopt.bench.online [--losses grpo,rloo,remax,reinforce_pp,ppo] [--steps 30]
    python -m prefopt.bench.online --losses grpo@1,grpo@2,grpo@4,gspo@2,cispo@2 --steps 40

A loss written NAME@MU trains with --num-iterations MU (each sampled batch serves MU updates);
NAME@MU:fp32 also turns mixed precision off (the sampler-learner mismatch in fp32).

The first `--held-out` prompts of data_samples/arithmetic.jsonl are never trained on. The
untrained model and each loss's final model answer them greedily; the table reports the
held-out mean `number_match` (the right sum is among the answer's numbers) and `exact_match`
(the answer is the bare number) before and after, with the training reward (mean of the first
and last five steps), the step time (mean after the first step), the share of the step spent
sampling, and the peak memory of the process that trained (CPU: peak RSS; CUDA: max allocated).
Every run trains on the other prompts with the same settings, seed and reward (number_match),
each in a fresh process, one after another. The table also gives the run's training seconds and
the sampler-learner mismatch (mean |log pi_learner - log pi_sampler| of the sampled tokens over the
run, and the largest per-step max ratio).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from prefopt.bench.samples import sample_path

LOSSES = ("grpo", "rloo", "remax", "reinforce_pp", "ppo")


def _peak_memory_mb() -> float:
    import torch

    from prefopt.training.memory import peak_memory

    return peak_memory(torch.cuda.is_available())[0] / 2**20


def held_out_rewards(model_path: str, prompts: list, max_new_tokens: int) -> dict:
    """Greedy answers of `model_path` to `prompts`, scored by number_match and exact_match."""
    from prefopt.models.inference import load_for_inference
    from prefopt.models.rollout import SampleSettings, sample_prompts, score_samples
    from prefopt.rewards import get_reward

    model, tokenizer = load_for_inference(model_path)
    settings = SampleSettings(num_samples=1, max_new_tokens=max_new_tokens, temperature=0.0, batch_size=16)
    samples = sample_prompts(model, tokenizer, prompts, settings)
    out = {"example": samples[0].completions[0]}
    for name in ("number_match", "exact_match"):
        scores, _ = score_samples(get_reward(name), prompts, samples)
        values = [s[0] for s in scores if s[0] is not None]
        out[name] = sum(values) / len(values)
    return out


def _split(args) -> tuple[list, Path]:
    """(held-out prompts, a file with the training prompts) from the prompts file."""
    from prefopt.data.formats import load_prompts

    prompts, _ = load_prompts([args.prompts])
    lines = Path(args.prompts).read_text().splitlines()
    train_file = Path(args.output_dir) / "train_prompts.jsonl"
    train_file.parent.mkdir(parents=True, exist_ok=True)
    train_file.write_text("".join(line + "\n" for line in lines[args.held_out :] if line.strip()))
    return prompts[: args.held_out], train_file


def _worker(args) -> dict:
    """One loss trained and evaluated (or, for loss "base", the untrained model evaluated)."""
    held_out, train_file = _split(args)
    if args.worker == "base":
        return {"loss": "base", **held_out_rewards(args.model, held_out, args.max_new_tokens)}
    from prefopt import TrainConfig, train

    loss, _, variant = args.worker.partition("@")
    mu, _, precision = variant.partition(":")
    config = TrainConfig(
        loss=loss,
        num_iterations=int(mu or 1),
        mixed_precision="no" if precision == "fp32" else "auto",
        model=args.model,
        data=[str(train_file)],
        reward="number_match",
        num_generations=args.num_generations,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        value_learning_rate=args.value_learning_rate,  # PPO's value head (the other losses have none)
        lr_scheduler="constant",
        logging_steps=1,
        save_steps=10_000,
        seed=args.seed,
        output_dir=str(Path(args.output_dir) / args.worker.replace("@", "_mu").replace(":", "_")),
        overwrite=True,
    )
    result = train(config)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "reward" in row]
    elapsed = [row["elapsed_s"] for row in rows]
    step_s = (elapsed[-1] - elapsed[0]) / max(len(elapsed) - 1, 1)
    generation = sum(row["generation_s"] for row in rows[1:]) / max(len(rows) - 1, 1)
    peak = _peak_memory_mb()  # training's peak, before the evaluation loads a second copy
    mismatch = [row["mismatch/mean_abs_logp_diff"] for row in rows if "mismatch/mean_abs_logp_diff" in row]
    return {
        "train_s": elapsed[-1],
        "mismatch_mean_abs": sum(mismatch) / len(mismatch) if mismatch else None,
        "mismatch_max_ratio": max((row.get("mismatch/max_ratio", 0.0) for row in rows), default=None),
        "loss": args.worker,
        "train_reward_first": sum(r["reward"] for r in rows[:5]) / len(rows[:5]),
        "train_reward_last": sum(r["reward"] for r in rows[-5:]) / len(rows[-5:]),
        "step_s": step_s,
        "generation_share": generation / step_s if step_s else None,
        "peak_mb": peak,
        **held_out_rewards(str(result.final_dir), held_out, args.max_new_tokens),
    }


def _options(args) -> list[str]:
    names = ("model", "prompts", "held_out", "steps", "num_generations", "max_new_tokens", "batch_size")
    names += ("learning_rate", "value_learning_rate", "seed", "output_dir")
    return [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in names if getattr(args, name) is not None]


def format_table(base: dict, results: list[dict], args) -> str:
    lines = [
        f"held-out greedy reward on {args.held_out} prompts; {args.steps} steps, G={args.num_generations}, "
        f"{args.batch_size} prompts/step, {args.max_new_tokens} new tokens, lr {args.learning_rate}",
        "| loss | number_match before → after | exact_match before → after | train reward first 5 → last 5 steps "
        "| step time | sampling share | training time | mismatch mean abs / max ratio | peak memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| `{r['loss']}` | {base['number_match']:.3f} → {r['number_match']:.3f} "
            f"| {base['exact_match']:.3f} → {r['exact_match']:.3f} "
            f"| {r['train_reward_first']:.3f} → {r['train_reward_last']:.3f} | {r['step_s']:.1f} s "
            f"| {r['generation_share']:.0%} | {r['train_s']:.0f} s "
            f"| {r['mismatch_mean_abs']:.2g} / {r['mismatch_max_ratio']:.3g} | {r['peak_mb']:.0f} MB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefopt.bench.online", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", default=str(sample_path("arithmetic.jsonl")))
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--held-out", type=int, default=48)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--value-learning-rate", type=float, default=None, help="PPO's value head")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs/bench_online")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(_worker(args)), flush=True)
        return 0
    results = []
    for name in ["base", *args.losses.split(",")]:
        command = [sys.executable, "-m", "prefopt.bench.online", *_options(args), f"--worker={name}"]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"bench_online: the {name} worker failed (exit {done.returncode})")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
        print(f"{name}: {json.dumps(results[-1])}", flush=True)
    table = format_table(results[0], results[1:], args)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
