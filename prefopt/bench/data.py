"""`python -m prefopt.bench.data`: data at real size, prefopt vs TRL's DPOTrainer on the same files.

Pairs are made from the HH-RLHF harmless test split (../shared/data, 2,312 pairs; a distinct tag per
copy, so no pair is a duplicate of another) at each size. Each framework trains one DPO step of a
tiny random Llama with SmolLM2's tokenizer (so the time is the data's, not the model's), each run in
a fresh process: a first run with an empty cache, then a second run with the cache the first left
(prefopt's data cache; TRL's: the `datasets` cache of `load_dataset` and of its tokenization map).

Reported per run: seconds from the process's start to the first training step, and the peak RSS
of the run's main process (VmHWM). The fastest of three runs on 64 pairs with a warm cache measures each framework's
fixed start-up (imports, model load); a run's time less that is its data time (reading, validating,
tokenizing, or reading the cache), the part the sizes change. prefopt tokenizes with `--data-workers` processes (default: the
cores); TRL with its default (`dataset_num_proc` None: one process). Both on their defaults.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
SIZES = (10_000, 100_000, 1_000_000)
MAX_LENGTH = 256


def make_pairs(path: Path, count: int) -> Path:
    """`count` HH-RLHF pairs (implicit-prompt transcripts), copy k of the split tagged "[k] "."""
    base = [json.loads(line) for line in gzip.open(HH, "rt")]
    with open(path, "w") as out:
        for i in range(count):
            copy, row = divmod(i, len(base))
            pair = base[row]
            tag = f"[{copy}] "
            out.write(json.dumps({"chosen": tag + pair["chosen"], "rejected": tag + pair["rejected"]}) + "\n")
    return path


def make_model(folder: Path) -> Path:
    """A tiny random Llama (2 layers, width 64) with SmolLM2-135M-Instruct's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefopt.models.hub import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _peak_rss_gb() -> float:
    from prefopt.training.memory import peak_memory

    return peak_memory(cuda=False)[0] / 1024**3


class _FirstStep:
    """A transformers callback: the time the first step begins."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if outer.at is None:
                    outer.at = time.time()

        self.at = None
        self.callback = Callback()


def _worker_prefopt(args) -> dict:
    from prefopt import TrainConfig, train

    first = _FirstStep()
    with tempfile.TemporaryDirectory() as out:
        train(
            TrainConfig(
                loss="dpo",
                model=args.model,
                data=[args.data],
                output_dir=out,
                max_steps=1,
                batch_size=4,
                max_length=MAX_LENGTH,
                save_steps=1000,
            ),
            callbacks=[first.callback],
            save_final=False,
        )
    return {"first_step_at": first.at, "peak_rss_gb": _peak_rss_gb()}


def _worker_trl(args) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    first = _FirstStep()
    with tempfile.TemporaryDirectory() as out:
        DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32),
            args=DPOConfig(
                output_dir=out,
                per_device_train_batch_size=4,
                max_steps=1,
                max_length=MAX_LENGTH,
                save_strategy="no",
                report_to=[],
                use_cpu=not torch.cuda.is_available(),
            ),
            train_dataset=load_dataset("json", data_files=args.data, split="train"),
            processing_class=AutoTokenizer.from_pretrained(args.model),
            callbacks=[first.callback],
        ).train()
    return {"first_step_at": first.at, "peak_rss_gb": _peak_rss_gb()}


def _run(kind: str, model: Path, data: Path, cache: Path) -> dict:
    """One run in a fresh process; its caches (prefopt's, datasets') under `cache`."""
    env = {
        **os.environ,
        "PREFOPT_CACHE": str(cache / "prefopt"),
        "HF_DATASETS_CACHE": str(cache / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "PREFOPT_BF16_UNITS": "0",  # fp32 for both: the step is not what is measured
    }
    started = time.time()
    command = [sys.executable, "-m", "prefopt.bench.data", "--worker", kind, "--model", str(model), "--data", str(data)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"seconds": result["first_step_at"] - started, "peak_rss_gb": result["peak_rss_gb"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--frameworks", nargs="+", default=["prefopt", "trl"], choices=["prefopt", "trl"])
    parser.add_argument("--workdir", default=None, help="where the data files and caches go (default: a temp dir)")
    parser.add_argument("--out", default="runs/bench/data.json")
    parser.add_argument("--worker", choices=["prefopt", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = (_worker_prefopt if args.worker == "prefopt" else _worker_trl)(args)
        print(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        model = make_model(work / "model")
        startup = {}
        small = make_pairs(work / "pairs-64.jsonl", 64)
        for kind in args.frameworks:
            _run(kind, model, small, work / f"cache-{kind}-64")
            # the least of three warm runs: this machine's speed varies between runs
            startup[kind] = min(_run(kind, model, small, work / f"cache-{kind}-64")["seconds"] for _ in range(3))
            print(f"{kind:8s} start-up (64 pairs, warm cache): {startup[kind]:.1f} s", flush=True)
        rows = []
        for size in args.sizes:
            data = make_pairs(work / f"pairs-{size}.jsonl", size)
            for kind in args.frameworks:
                cache = work / f"cache-{kind}-{size}"
                first, second = _run(kind, model, data, cache), _run(kind, model, data, cache)
                for run in (first, second):
                    run["data_seconds"] = max(0.0, run["seconds"] - startup[kind])
                rows.append({"framework": kind, "pairs": size, "first": first, "second": second})
                print(
                    f"{kind:8s} {size:>9,} pairs: first run {first['seconds']:7.1f} s (data {first['data_seconds']:.1f}) "
                    f"{first['peak_rss_gb']:.2f} GB, second {second['seconds']:6.1f} s (data "
                    f"{second['data_seconds']:.1f}) {second['peak_rss_gb']:.2f} GB",
                    flush=True,
                )
            data.unlink()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"startup_seconds": startup, "rows": rows}, indent=1) + "\n")
    print(format_table(rows))
    return 0


def format_table(rows: list[dict]) -> str:
    """Markdown: each size's runs, times as total (data: total less the start-up), second/first of the data time."""
    lines = [
        "| pairs | framework | first run: s to step 1 (data) | peak RSS (GB) | second run: s (data) | peak RSS (GB) "
        "| second / first, data time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, s = r["first"], r["second"]
        ratio = f"{s['data_seconds'] / f['data_seconds']:.0%}" if f["data_seconds"] > 0 else "-"
        lines.append(
            f"| {r['pairs']:,} | {r['framework']} | {f['seconds']:.1f} ({f['data_seconds']:.1f}) | {f['peak_rss_gb']:.2f} "
            f"| {s['seconds']:.1f} ({s['data_seconds']:.1f}) | {s['peak_rss_gb']:.2f} | {ratio} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
