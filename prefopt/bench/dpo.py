"""`make bench`: prefopt vs TRL's DPOTrainer, same model, data and settings, each in its own process.

    python -m prefopt.bench.dpo [--steps 6] [--quick] [--rows GROUP,...] [--out runs/bench/results.md]

Row groups (--rows; default: all): compare (each framework on its own default precision, then both
in fp32, at 256: issue #20), checkpointing, losses, packing, lengths, precision (issue #15: TRL's
own default, bf16 autocast; prefopt fp32, mixed bf16 and bf16 weights with Kahan-compensated AdamW,
each at 20 steps at least, with the loss after the last step against the fp32 run's: target within 2%).

Setup (issue #5): SmolLM2-135M-Instruct, full fine-tune, online reference (a frozen copy), 4 pairs
per step, HH-RLHF harmless test pairs from ../shared/data when present (else
data_samples/hh_style.jsonl). For a length L, the benchmark uses the longest pairs whose prompt
plus longer completion fit in L tokens, so no framework truncates anything and both see exactly
the same tokens; each worker runs one epoch over steps x 4 pairs with the same seed. Two more
rows use a seeded random sample of pairs that fit 256 (mixed lengths), with and without packing.
"Default" is what a user gets without a precision flag: prefopt's `mixed_precision: auto` (bf16
autocast over fp32 master weights where the CPU or GPU has bf16 units, else fp32), TRL's
DPOConfig (bf16 autocast, on a CPU too).

Reported: median step time (first step excluded: warm-up), tokens/s (all tokens of the pairs
over the summed step times), peak RSS of the worker process (VmHWM), ratios to TRL, and the
distance to the hardware: achieved TFLOP/s and its share of this machine's measured matmul peak
in the precision the row computes in (square matmuls of 1024 and 2048, the best seen over the
whole benchmark, measured again before each row). A step's model FLOPs
are counted as a plain trainer computes the pairs, the same count for every framework (prefix
sharing computes the prompt once, so prefopt does less than it is credited with): for each pair the
two sequences prompt+chosen and prompt+rejected, 6 N per token for the policy's forward and
backward and 2 N for the reference's forward (N: the weights of the model's matrix multiplies,
the output head included, the embedding lookup not), plus causal attention, 2 L d S^2 per sequence
of length S forward (QK^T and AV over half the square; L layers, d = heads x head dim), x3 with
backward for the policy, x1 for the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from prefopt.bench.flops import ModelShape, PeakTracker
from prefopt.bench.samples import sample_path

ROOT = Path(__file__).resolve().parents[2]  # the repository (bench/ is two below)
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
# The GPU check times a random model of this shape where the packaged one is not installed.
MODEL = os.environ.get("PREFOPT_BENCH_MODEL", "smollm2-135m-instruct")
PAIRS_PER_STEP = 4
# Besides DPO (compared with TRL), the other required losses are timed on their own.
OTHER_LOSSES = ("dpop", "tdpo1", "tdpo2", "orpo", "kto")


class StepTimer:
    """A TrainerCallback (duck-typed, works for both trainers) that times optimizer steps."""

    def __init__(self):
        self.times: list[float] = []
        self.losses: list[float] = []  # the training loss of each logged step
        self._start = None

    def __getattr__(self, name):  # every other callback event: do nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def _peak_rss_gb() -> float:
    from prefopt.training.memory import peak_memory

    return peak_memory(cuda=False)[0] / 1024**3


def _worker_prefopt(args) -> dict:
    from prefopt.config import TrainConfig
    from prefopt.training.run import train

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            loss=args.loss,
            model=MODEL,
            data=[args.data],
            output_dir=out,
            overwrite=True,
            max_steps=args.steps,
            batch_size=PAIRS_PER_STEP,
            max_length=args.max_length,
            learning_rate=1e-6,
            logging_steps=1,
            save_steps=10**9,
            reference=args.reference,
            dtype=args.dtype,
            mixed_precision=args.mixed_precision,
            seed=42,
            gradient_checkpointing=args.gradient_checkpointing,
            chunk_size=args.chunk_size,
            share_prefix=not args.no_share_prefix,
            pack=not args.no_pack,
            trim_memory=not args.no_trim_memory,
        )
        result = train(config, callbacks=[timer], save_final=False)
    bf16 = bool(result.trainer.args.bf16)
    return {"step_times": timer.times, "peak_rss_gb": _peak_rss_gb(), "losses": timer.losses, "bf16": bf16}


def _worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from prefopt.models.hub import load_tokenizer, resolve_model

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    timer = StepTimer()
    # --trl-default: TRL's own precision default (DPOConfig: bf16 autocast, also on a CPU); else fp32
    precision = {} if args.trl_default else {"bf16": False}
    with tempfile.TemporaryDirectory() as out:
        trainer = DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32),
            ref_model=None,  # TRL makes the frozen copy itself
            args=DPOConfig(
                output_dir=out,
                per_device_train_batch_size=PAIRS_PER_STEP,
                max_steps=args.steps,
                max_length=args.max_length,
                learning_rate=1e-6,
                beta=0.1,
                logging_steps=1,
                save_strategy="no",
                report_to=[],
                **precision,
                use_cpu=not torch.cuda.is_available(),
                seed=42,
                gradient_checkpointing=args.gradient_checkpointing,
            ),
            train_dataset=Dataset.from_list(rows),
            processing_class=load_tokenizer(MODEL),
            callbacks=[timer],
        )
        trainer.train()
    return {"step_times": timer.times, "peak_rss_gb": _peak_rss_gb(), "losses": timer.losses, "bf16": trainer.args.bf16}


def _select_pairs(max_length: int, count: int, tokenizer, longest: bool = True) -> tuple[list[dict], int, list[int]]:
    """`count` standard pairs that fit `max_length` untruncated (the longest ones, or a seeded random
    sample: lengths as they come), their token total and the lengths of their plain sequences
    (prompt+chosen, prompt+rejected), for the FLOP count."""
    from prefopt.data import PreferenceTokenizer, load_examples

    source = HH if HH.exists() else sample_path("hh_style.jsonl")
    examples, _ = load_examples(source)
    tokenizing = PreferenceTokenizer(tokenizer, max_length=10**6)
    sized = []
    for i, example in enumerate(examples):
        pair = tokenizing.pair(example, i)
        total = len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))
        if total <= max_length:
            prompt = len(pair.prompt_ids)
            sequences = [prompt + len(pair.chosen_ids), prompt + len(pair.rejected_ids)]
            sized.append((total, sum(sequences), example, sequences))
    if longest:
        sized.sort(key=lambda s: -s[0])
    else:
        random.Random(0).shuffle(sized)
    chosen = sized[:count]
    if len(chosen) < count:
        raise SystemExit(f"only {len(chosen)} pairs fit max_length {max_length}; need {count}")
    rows = [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for _, _, e, _ in chosen]
    return rows, sum(tokens for _, tokens, _, _ in chosen), [length for *_, lengths in chosen for length in lengths]


def _run_worker(
    kind: str,
    data: Path,
    steps: int,
    max_length: int,
    loss: str = "dpo",
    reference: str = "copy",
    gradient_checkpointing: bool = False,
    pack: bool = True,
    extra: tuple[str, ...] = (),
) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as result_file:
        result_path = result_file.name
    command = [
        sys.executable,
        "-m",
        "prefopt.bench.dpo",
        "--worker",
        kind,
        "--data",
        str(data),
        "--steps",
        str(steps),
        "--max-length",
        str(max_length),
        "--loss",
        loss,
        "--reference",
        reference,
        "--result",
        result_path,
    ]
    if gradient_checkpointing:
        command.append("--gradient-checkpointing")
    if not pack:
        command.append("--no-pack")
    command.extend(extra)
    started = time.time()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-4000:]}")
    result = json.loads(Path(result_path).read_text())
    os.unlink(result_path)
    result["wall_s"] = round(time.time() - started, 1)
    return result


def _summarise(result: dict, total_tokens: int, flops: float | None = None, compute: str = "fp32") -> dict:
    """A worker's figures; `flops`: the model FLOPs of all its steps (None: not counted for this row),
    `compute`: the precision its matmuls ran in (which peak it is measured against)."""
    times = result["step_times"]
    return {
        "median_step_s": statistics.median(times[1:] if len(times) > 1 else times),
        "tokens_per_s": total_tokens / sum(times),
        "peak_rss_gb": result["peak_rss_gb"],
        "last_loss": (result.get("losses") or [None])[-1],
        "flops_per_s": flops / sum(times) if flops else None,
        "compute": compute,
    }


ROW_GROUPS = ("compare", "checkpointing", "losses", "packing", "lengths", "precision")
# Issue #20's targets: each framework's default path (prefopt: bf16 autocast where there are bf16 units),
# on a CPU with AMX; both in fp32; and the loss after 20 steps of mixed bf16 against the fp32 run's.
SPEED_TARGET, MEMORY_TARGET, LOSS_TOLERANCE = 4.0, 0.45, 0.02
FP32_SPEED_TARGET, FP32_MEMORY_TARGET = 2.0, 0.45


@dataclass
class Pairs:
    """One data file of the benchmark: its path, token total and plain sequence lengths."""

    path: Path
    tokens: int
    lengths: list[int]


def _compute(result: dict, extra: tuple[str, ...]) -> str:
    """The precision a worker's matmuls ran in: bf16 under bf16 autocast or on bf16 weights."""
    return "bf16" if result.get("bf16") or "bfloat16" in extra else "fp32"


def _row(
    kind: str, pairs: Pairs, steps: int, max_length: int, shape: ModelShape | None, peak: PeakTracker | None, **options
) -> dict:
    """Run one worker and summarise it; the FLOP count applies to DPO with an online reference."""
    if peak is not None:
        peak.measure()
    result = _run_worker(kind, pairs.path, steps, max_length, **options)
    counted = shape is not None and options.get("loss", "dpo") == "dpo" and options.get("reference", "copy") == "copy"
    flops = shape.step_flops(pairs.lengths) if counted else None
    return _summarise(result, pairs.tokens, flops, _compute(result, options.get("extra", ())))


def _precision_rows(pairs: Pairs, steps: int, shape: ModelShape | None, peak: PeakTracker) -> tuple[list, list[str]]:
    """Issue #15's rows, measured side by side on the same pairs and steps, and the lines that check
    the loss target. TRL runs with its own default (bf16 autocast, on a CPU too); prefopt runs fp32,
    mixed bf16 (fp32 master weights, bf16 autocast) and bf16 weights with Kahan-compensated AdamW.
    "The loss after 20 steps" is the last step's loss: the same batch in every run."""

    def prefopt(*extra: str) -> dict:
        return _row("prefopt", pairs, steps, 256, shape, peak, extra=extra)

    trl = _row("trl", pairs, steps, 256, shape, peak, extra=("--trl-default",))
    fp32 = prefopt("--mixed-precision", "no")
    mixed = prefopt("--mixed-precision", "bf16")
    low = prefopt("--dtype", "bfloat16", "--mixed-precision", "no")
    rows = [
        ("TRL DPOTrainer, its default (bf16 autocast)", 256, trl, "precision"),
        ("prefopt dpo, fp32", 256, fp32, "precision"),
        ("prefopt dpo, mixed bf16 (fp32 master weights)", 256, mixed, "precision"),
        ("prefopt dpo, bf16 weights + Kahan AdamW", 256, low, "precision"),
    ]
    notes = [f"precision rows: {steps} steps; ratios against TRL's default"]
    for name, row in (("mixed bf16", mixed), ("bf16 weights + Kahan", low)):
        ratio = row["last_loss"] / fp32["last_loss"]
        within = abs(ratio - 1) <= LOSS_TOLERANCE
        notes.append(
            f"{name}: loss after {steps} steps {row['last_loss']:.5f} vs fp32 {fp32['last_loss']:.5f}: "
            f"{ratio:.4f}x (target: within {LOSS_TOLERANCE:.0%}: {'ok' if within else 'MISSED'})"
        )
    return rows, notes


def _target_line(what: str, ours: dict, theirs: dict, speed_target: float, memory_target: float, note: str = "") -> str:
    speed, memory = theirs["median_step_s"] / ours["median_step_s"], ours["peak_rss_gb"] / theirs["peak_rss_gb"]
    verdict = "ok" if speed >= speed_target and memory <= memory_target else "MISSED"
    return (
        f"{what}: {speed:.2f}x the step speed (target >= {speed_target}x), {memory:.2f}x the peak RSS "
        f"(target <= {memory_target}x): {verdict}{note}"
    )


def _format_table(rows_out: list, peaks: dict[str, float] | None, header: str, notes: list[str]) -> str:
    lines = [
        header,
        "",
        "| run | max_length | median step (s) | tokens/s | peak RSS (GB) | step speed vs TRL | RSS vs TRL "
        "| TFLOP/s | share of peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    trl_rows = {group: r for name, _, r, group in rows_out if name.startswith("TRL DPOTrainer") and group != "-"}
    for name, length, r, group in rows_out:
        trl = trl_rows.get(group)
        comparable = trl is not None and length == 256 and "mixed-length" not in name
        speed = f"{trl['median_step_s'] / r['median_step_s']:.2f}x" if comparable else "-"
        rss = f"{r['peak_rss_gb'] / trl['peak_rss_gb']:.2f}x" if comparable else "-"
        achieved = r.get("flops_per_s")
        tflops = f"{achieved / 1e12:.3f}" if achieved else "-"
        share = f"{achieved / peaks[r['compute']]:.1%} of {r['compute']}" if achieved and peaks else "-"
        lines.append(
            f"| {name} | {length} | {r['median_step_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_rss_gb']:.2f} | {speed} | {rss} | {tflops} | {share} |"
        )
    return "\n".join([*lines, *([""] + notes if notes else [])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="only the prefopt-vs-TRL comparison at 256")
    parser.add_argument(
        "--rows", default=None, help=f"comma-separated row groups to run: {', '.join(ROW_GROUPS)} (default: all)"
    )
    parser.add_argument("--no-trl", action="store_true", help="skip TRL (prefopt rows only)")
    parser.add_argument("--out", default="runs/bench/results.md")
    parser.add_argument("--worker", choices=["prefopt", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--loss", default="dpo", help=argparse.SUPPRESS)
    parser.add_argument("--reference", default="copy", help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--no-share-prefix", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-pack", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-trim-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--mixed-precision", default="no", help=argparse.SUPPRESS)
    parser.add_argument("--trl-default", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    groups = set(ROW_GROUPS) if args.rows is None else {g.strip() for g in args.rows.split(",") if g.strip()}
    if args.quick:
        groups = {"compare"}
    if groups - set(ROW_GROUPS):
        parser.error(
            f"--rows: unknown group(s) {', '.join(sorted(groups - set(ROW_GROUPS)))}; known: {', '.join(ROW_GROUPS)}"
        )

    if args.worker:
        result = (_worker_prefopt if args.worker == "prefopt" else _worker_trl)(args)
        Path(args.result).write_text(json.dumps(result))
        return 0

    from prefopt.models.hub import load_tokenizer
    from prefopt.models.precision import bf16_units

    tokenizer = load_tokenizer(MODEL)  # converts the packaged GGUF once, outside any timing
    shape = ModelShape.of(MODEL)
    peak = PeakTracker()
    workdir = Path(tempfile.mkdtemp(prefix="prefopt-bench-"))
    # (name, max_length, summary, the TRL row it is compared with: default | fp32 | precision | -)
    rows_out = []

    def data_for(length: int, longest: bool = True, steps: int | None = None) -> Pairs:
        rows, tokens, lengths = _select_pairs(length, (steps or args.steps) * PAIRS_PER_STEP, tokenizer, longest)
        path = workdir / f"pairs-{length}{'' if longest else '-random'}-{steps or args.steps}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return Pairs(path, tokens, lengths)

    def row(kind: str, pairs: Pairs, length: int = 256, **options) -> dict:
        return _row(kind, pairs, args.steps, length, shape, peak, **options)

    data256 = data_for(256)
    notes: list[str] = []
    units = bf16_units("cuda" if _cuda() else "cpu")
    if "compare" in groups:
        default = row("prefopt", data256, extra=("--mixed-precision", "auto"))
        rows_out.append(("prefopt dpo, its default (mixed_precision auto)", 256, default, "default"))
        if not args.no_trl:
            trl_default = row("trl", data256, extra=("--trl-default",))
            rows_out.append(("TRL DPOTrainer, its default (bf16 autocast)", 256, trl_default, "default"))
        ours = row("prefopt", data256)
        rows_out.append(("prefopt dpo, fp32", 256, ours, "fp32"))
        if not args.no_trl:
            theirs = row("trl", data256)
            rows_out.append(("TRL DPOTrainer, fp32", 256, theirs, "fp32"))
            where = f" (bf16 units: {units})" if units else " (no bf16 units here: prefopt's default is fp32)"
            notes.append(
                _target_line("default vs TRL's default", default, trl_default, SPEED_TARGET, MEMORY_TARGET, where)
            )
            notes.append(_target_line("fp32 vs TRL fp32", ours, theirs, FP32_SPEED_TARGET, FP32_MEMORY_TARGET))
    if "checkpointing" in groups:
        if not args.no_trl:  # the same memory setting on both sides, for the record
            rows_out.append(
                (
                    "TRL DPOTrainer, fp32, gradient checkpointing",
                    256,
                    row("trl", data256, gradient_checkpointing=True),
                    "fp32",
                )
            )
        rows_out.append(
            (
                "prefopt dpo, fp32, gradient checkpointing",
                256,
                row("prefopt", data256, gradient_checkpointing=True),
                "fp32",
            )
        )
    if "losses" in groups:
        for loss in OTHER_LOSSES:
            rows_out.append(
                (f"prefopt {loss}, fp32", 256, row("prefopt", data256, loss=loss, reference="auto"), "fp32")
            )
    if "packing" in groups:
        # Pairs of mixed lengths (a random sample) are where packing removes padding.
        mixed = data_for(256, longest=False)
        for pack in (True, False):
            name = f"prefopt dpo, fp32, mixed-length pairs, packing {'on' if pack else 'off'}"
            rows_out.append((name, 256, row("prefopt", mixed, pack=pack), "-"))
    if "lengths" in groups:
        for length in (512, 1024):
            rows_out.append(("prefopt dpo, fp32", length, row("prefopt", data_for(length), length), "-"))
    if "precision" in groups:
        precision_steps = max(args.steps, 20)
        precision_rows, precision_notes = _precision_rows(
            data_for(256, steps=precision_steps), precision_steps, shape, peak
        )
        rows_out.extend(precision_rows)
        notes.extend(precision_notes)

    peak.measure()
    peaks = peak.peaks
    device = torch_device_name()
    header = (
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores{device}; bf16 units: {units or 'none found'}; "
        f"matmul peak {peaks['fp32'] / 1e12:.2f} TFLOP/s fp32, {peaks['bf16'] / 1e12:.2f} TFLOP/s bf16; "
        f"{args.steps} steps x {PAIRS_PER_STEP} pairs; data: {'HH-RLHF harmless test' if HH.exists() else 'hh_style sample'}"
    )
    table = _format_table(rows_out, peaks, header, notes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(table)
    print(f"\n(written to {out})")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def torch_device_name() -> str:
    """', GPU <name>' when the benchmark runs on a GPU, else ''."""
    import torch

    return f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""


if __name__ == "__main__":
    raise SystemExit(main())
