"""Benchmark: prefopt's GRPO training step against TRL 1.x's `GRPOTrainer`, same settings, each in its own process.

    python -m prefopt.bench.grpo [--model smollm2-135m-instruct] [--prompts data_samples/arithmetic.jsonl]
        [--steps 5] [--num-generations 8] [--max-new-tokens 16] [--batch-size 2] [--beta 0.04]

Both trainers get the same model weights (the alias is resolved, and converted once, before any
worker starts), prompts file, reward (prefopt's registered reward; TRL calls it through a TRL-style
reward function), G completions per prompt, completion budget, prompts per optimizer step
(prefopt `batch_size` = B prompts; TRL `per_device_train_batch_size` = B x G completions, one
generation per step), beta, epsilon 0.2, loss_type dapo, group-scaled rewards, temperature 1,
top_p 1 and no top-k, learning rate, seed, fp32 on both sides (TRL: `bf16=False`; `--precision default`:
each framework's own default, prefopt `mixed_precision: auto`, TRL's bf16 autocast), gradient
checkpointing off on both (TRL's GRPOConfig turns it on by default; `--gradient-checkpointing`
turns it on for both), no vLLM, a frozen reference copy when beta > 0.

Reported per method: mean (and median) optimizer-step time (a TrainerCallback, the same class in both
workers, from on_step_begin to on_step_end; the first step is excluded as warm-up), peak memory
(CUDA: torch.cuda.max_memory_allocated; CPU: the worker's peak RSS, VmHWM from /proc, which,
unlike ru_maxrss, does not inherit the launching process's high-water mark), the share of the
step spent generating (prefopt: `generation_s` of metrics.jsonl, which covers sampling, decoding
and scoring; TRL: wall time inside its `_generate` and `_calculate_rewards`, the same work), mean
completion length, and prefopt/TRL ratios: speed = TRL step / prefopt step, memory = prefopt peak /
TRL peak (issue #13's targets: >= 2x, <= 0.6x). Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prefopt.bench.samples import sample_path

SPEED_TARGET, MEMORY_TARGET = 2.0, 0.6
METHODS = ("prefopt", "trl")
SEED = 42


class StepTimer:
    """A TrainerCallback (duck-typed, the same for both trainers): wall time of each optimizer step,
    the generation time spent inside it (where `generation` is fed), and the training logs."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.step_times: list[float] = []
        self.generation_times: list[float] = []
        self.logs: list[dict] = []
        self.generation = 0.0  # seconds, added to by the generation wrappers (TRL)
        self._start = 0.0

    def __getattr__(self, name):  # every other callback event: nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.generation = 0.0
        self._start = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(self._now() - self._start)
        self.generation_times.append(self.generation)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append({k: v for k, v in logs.items() if isinstance(v, (int, float))})


def timed(timer: StepTimer, fn):
    """`fn`, adding its wall time to `timer.generation`."""

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timer.generation += time.perf_counter() - started

    return wrapper


def _worker_prefopt(args, timer: StepTimer) -> dict:
    from prefopt.config import TrainConfig
    from prefopt.training.run import train

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            loss="grpo",
            loss_args={"loss_type": "dapo", "epsilon": 0.2},
            beta=args.beta,
            model=args.model,
            data=[args.prompts],
            reward=args.reward,
            num_generations=args.num_generations,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=1.0,
            batch_size=args.batch_size,
            grad_accum=1,
            max_steps=args.steps,
            learning_rate=args.learning_rate,
            lr_scheduler="linear",
            weight_decay=0.0,
            max_grad_norm=1.0,
            dtype="float32",
            # --precision default: prefopt's own (auto: bf16 autocast over fp32 master weights where the
            # CPU or GPU has bf16 units); fp32: no autocast
            mixed_precision="auto" if args.precision == "default" else "no",
            gradient_checkpointing=args.gradient_checkpointing,
            seed=SEED,
            logging_steps=1,
            save_steps=10**9,
            output_dir=out,
            overwrite=True,
        )
        result = train(config, callbacks=[timer], save_final=False)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    by_step = {row["step"]: row for row in rows if "loss" in row}
    steps = sorted(by_step)
    return {
        "generation_s": [by_step[s].get("generation_s", float("nan")) for s in steps],
        "completion_length": [by_step[s].get("completion_length", float("nan")) for s in steps],
        "reward": [by_step[s].get("reward", float("nan")) for s in steps],
        "bf16": bool(result.trainer.args.bf16),
    }


def _worker_trl(args, timer: StepTimer) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from prefopt.models.hub import load_tokenizer
    from prefopt.rewards import get_reward

    reward = get_reward(args.reward)

    def reward_func(prompts, completions, **columns):
        """TRL's reward signature; conversational completions are [{"role": "assistant", "content": ...}]."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        wanted = {name: columns[name] for name in reward.spec.columns if name in columns}
        return reward(prompts, texts, **wanted)

    reward_func.__name__ = args.reward
    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as out:
        trainer = GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32),
            reward_funcs=reward_func,
            args=GRPOConfig(
                output_dir=out,
                per_device_train_batch_size=args.batch_size * args.num_generations,  # counted in completions
                gradient_accumulation_steps=1,
                steps_per_generation=1,  # one generation per optimizer step, as prefopt
                num_generations=args.num_generations,
                max_completion_length=args.max_new_tokens,
                temperature=args.temperature,
                top_p=1.0,
                top_k=0,
                beta=args.beta,
                epsilon=0.2,
                loss_type="dapo",
                scale_rewards="group",
                num_iterations=1,
                learning_rate=args.learning_rate,
                lr_scheduler_type="linear",
                weight_decay=0.0,
                max_grad_norm=1.0,
                max_steps=args.steps,
                # --precision default: TRL's own (GRPOConfig: bf16 autocast, even on a CPU); fp32: off
                **({} if args.precision == "default" else {"bf16": False}),
                gradient_checkpointing=args.gradient_checkpointing,  # TRL's default: True
                use_vllm=False,
                use_cpu=not cuda,
                seed=SEED,
                logging_steps=1,
                save_strategy="no",
                report_to=[],
                log_completions=False,
            ),
            train_dataset=Dataset.from_list(rows),
            processing_class=load_tokenizer(args.model),
            callbacks=[timer],
        )
        # Generation as prefopt's generation_s counts it: sampling and decoding, then scoring.
        trainer._generate = timed(timer, trainer._generate)
        trainer._calculate_rewards = timed(timer, trainer._calculate_rewards)
        trainer.train()
    logs = timer.logs
    return {
        "generation_s": list(timer.generation_times),
        "completion_length": [log.get("completions/mean_length", float("nan")) for log in logs],
        "reward": [log.get("reward", float("nan")) for log in logs],
        "trl_version": trl.__version__,
        "trl_bf16": trainer.args.bf16,
        "trl_gradient_checkpointing": trainer.args.gradient_checkpointing,
    }


def run_worker(args) -> dict:
    """One method's measurement, in this process (main() runs each in a fresh one)."""
    import torch

    from prefopt.training.memory import peak_memory

    cuda = torch.cuda.is_available()
    timer = StepTimer(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    extra = (_worker_prefopt if args.worker == "prefopt" else _worker_trl)(args, timer)
    peak, kind = peak_memory(cuda)
    result = {
        "method": args.worker,
        "step_times": timer.step_times,
        "peak_bytes": peak,
        "memory": kind,
        "device": "cuda" if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        **extra,
    }
    return result


def summarise(result: dict) -> dict:
    """Means over the timed steps (all but the first, the warm-up, when there is more than one)."""
    times = result["step_times"]
    skip = 1 if len(times) > 1 else 0
    timed_steps = times[skip:]
    generation = result["generation_s"][skip:]
    lengths = [v for v in result["completion_length"][skip:] if v == v]
    rewards = [v for v in result["reward"] if v == v]
    return {
        "mean_step_s": statistics.fmean(timed_steps),
        "median_step_s": statistics.median(timed_steps),
        "timed_steps": len(timed_steps),
        "peak_gib": result["peak_bytes"] / 2**30,
        "generation_share": sum(generation) / sum(timed_steps) if generation else None,
        "mean_generation_s": statistics.fmean(generation) if generation else None,
        "mean_completion_length": statistics.fmean(lengths) if lengths else None,
        "mean_reward": statistics.fmean(rewards) if rewards else None,
    }


def _settings(args) -> list[str]:
    """The flags every worker gets: the same settings for both methods."""
    out = [
        "--model",
        args.model,
        "--prompts",
        args.prompts,
        "--steps",
        str(args.steps),
        "--num-generations",
        str(args.num_generations),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--batch-size",
        str(args.batch_size),
        "--beta",
        str(args.beta),
        "--reward",
        args.reward,
        "--learning-rate",
        str(args.learning_rate),
        "--temperature",
        str(args.temperature),
    ]
    out += ["--precision", args.precision]
    return out + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])


def _launch(method: str, args) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        result_path = Path(folder) / "result.json"
        command = [sys.executable, "-m", "prefopt.bench.grpo", "--worker", method, "--result", str(result_path)]
        started = time.perf_counter()
        proc = subprocess.run([*command, *_settings(args)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{method} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads(result_path.read_text())
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def report(args, results: dict) -> dict:
    """The JSON document: settings, each method's raw measurements and summary, and the ratios."""
    summaries = {m: summarise(r) for m, r in results.items()}
    ratios = None
    if "prefopt" in summaries and "trl" in summaries:
        ours, theirs = summaries["prefopt"], summaries["trl"]
        ratios = {
            "speed": theirs["mean_step_s"] / ours["mean_step_s"],
            "memory": ours["peak_gib"] / theirs["peak_gib"],
            "speed_target": SPEED_TARGET,
            "memory_target": MEMORY_TARGET,
        }
        ratios["speed_met"] = ratios["speed"] >= SPEED_TARGET
        ratios["memory_met"] = ratios["memory"] <= MEMORY_TARGET
    return {
        "settings": {
            "model": args.model,
            "prompts": args.prompts,
            "steps": args.steps,
            "num_generations": args.num_generations,
            "max_new_tokens": args.max_new_tokens,
            "prompts_per_step": args.batch_size,
            "completions_per_step": args.batch_size * args.num_generations,
            "beta": args.beta,
            "reward": args.reward,
            "learning_rate": args.learning_rate,
            "temperature": args.temperature,
            "gradient_checkpointing": args.gradient_checkpointing,
            "precision": "fp32" if args.precision == "fp32" else "each framework's default precision",
        },
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "results": results,
        "summary": summaries,
        "ratios": ratios,
    }


def table(doc: dict) -> str:
    s = doc["settings"]
    first = next(iter(doc["results"].values()))
    lines = [
        f"GRPO step, {s['prompts_per_step']} prompts x G={s['num_generations']} = {s['completions_per_step']} "
        f"completions of <= {s['max_new_tokens']} tokens, beta {s['beta']}, reward {s['reward']}, {s['precision']}, "
        f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}; {s['steps']} steps (first "
        f"excluded); {first['device']}, {doc['machine']['cpu_count']} CPU cores, {first['torch_threads']} torch threads",
        "",
        "| method | mean step (s) | median step (s) | generation share | mean completion tokens | peak memory (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for method, summary in doc["summary"].items():
        result = doc["results"][method]
        name = f"TRL {result['trl_version']} GRPOTrainer" if method == "trl" else "prefopt grpo"
        share = "-" if summary["generation_share"] is None else f"{summary['generation_share']:.0%}"
        length = "-" if summary["mean_completion_length"] is None else f"{summary['mean_completion_length']:.1f}"
        lines.append(
            f"| {name} | {summary['mean_step_s']:.2f} | {summary['median_step_s']:.2f} | {share} | {length} | {summary['peak_gib']:.2f} |"
        )
    lines.append(f"\nmemory: {first['memory']}")
    r = doc["ratios"]
    if r:
        lines.append(
            f"prefopt vs TRL: {r['speed']:.2f}x step speed (target >= {r['speed_target']}x: "
            f"{'met' if r['speed_met'] else 'MISSED'}), {r['memory']:.2f}x peak memory (target <= "
            f"{r['memory_target']}x: {'met' if r['memory_met'] else 'MISSED'})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="local model folder or the SmolLM2 alias")
    parser.add_argument("--prompts", default=str(sample_path("arithmetic.jsonl")), help="prompt-only JSONL (+ answer)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per method (the first is warm-up)")
    parser.add_argument("--num-generations", type=int, default=8, help="G: completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="completion budget (TRL max_completion_length)")
    parser.add_argument("--batch-size", type=int, default=2, help="prompts per optimizer step (TRL: x G completions)")
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--reward", default="number_match", help="a registered prefopt reward")
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on for both trainers")
    parser.add_argument(
        "--precision",
        choices=["fp32", "default"],
        default="fp32",
        help="fp32 on both sides, or each framework's default (prefopt: auto; TRL: bf16 autocast)",
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: prefopt,trl")
    parser.add_argument("--out", default="runs/bench/grpo.json", help="where the JSON goes")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.num_generations < 2 or args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("need --steps >= 1, --num-generations >= 2, --batch-size >= 1, --max-new-tokens >= 1")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS):
        parser.error(f"--methods: choose from {', '.join(METHODS)}")

    if args.worker:
        Path(args.result).write_text(json.dumps(run_worker(args)))
        return 0

    from prefopt.models.hub import resolve_model

    args.model = resolve_model(args.model)  # converts the packaged GGUF once, before and outside any worker
    results = {method: _launch(method, args) for method in methods}
    doc = report(args, results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))
    print(f"\n(JSON written to {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
