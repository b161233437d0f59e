"""`make gpu-check`: what one CUDA GPU shows that the CPU suite cannot (issue #19 item 6).

    python -m prefopt.bench.gpu_check --out DIR            # on the GPU machine, < 8 minutes on one H200
    python -m prefopt.bench.gpu_check --quick --out DIR    # the dry run: the same sections, tiny, on the CPU

Sections, each recorded as pass / fail / skip with its seconds and the first line of any error:

1. kernels: the fused linear-head log-probs and TDPO's token KL against full logits, values and
   gradients, in float32 (tolerance 1e-4 relative) and under bf16 autocast (2e-2 relative: bf16
   keeps 8 bits of mantissa, ~4e-3 per rounding, and a log-prob sums a few dozen roundings);
2. train: `train()` on a tiny random Llama for 3 steps each: full fine-tune with a reference copy,
   LoRA (adapter-off reference), QLoRA (when bitsandbytes is there), a cached reference, TDPO2,
   KTO, ORPO, GRPO, PPO, fp32, bf16 autocast (what `auto` picks on the GPU) and fp16 autocast.
   DPO-family runs must log ln 2 at step 1 (policy == reference);
3. sharded: `accelerate launch` with one process of the shipped FSDP2 and ZeRO-3 configs (DPO);
4. timing: `prefopt.bench.dpo --quick` (a DPO step of prefopt against TRL's DPOTrainer, same model
   and pairs) on a random model of SmolLM2-135M's shape, when TRL and datasets are installed.

Everything is written to DIR/gpu-check.json and DIR/gpu-check.md; the exit status is 1 when any
section failed. No model or data is downloaded: the models are random, the data the package's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from prefopt.bench.samples import sample_path
from prefopt.bench.tiny import byte_tokenizer

ROOT = Path(__file__).resolve().parents[2]  # the repository, for recipes/accelerate/


def tiny_llama_dir(folder: Path, hidden: int = 64, layers: int = 2, vocab: int = 259, intermediate: int = 128) -> str:
    """A random Llama with the byte tokenizer, saved to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 4), num_key_value_heads=max(hidden // 192, 2),
        max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


# -- 1. kernels -------------------------------------------------------------------------------


def check_kernels(device: str, autocast: bool) -> str:
    import torch

    from prefopt.data import PairExample, PreferenceCollator, PreferenceTokenizer
    from prefopt.models.logps import completion_states, full_logits_scores, output_head, score_completions

    tok = byte_tokenizer()
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        path = tiny_llama_dir(Path(folder) / "m", hidden=128, vocab=259)
        policy = AutoModelForCausalLM.from_pretrained(path).to(device)
        reference = AutoModelForCausalLM.from_pretrained(path).to(device)
    with torch.no_grad():  # a reference that differs from the policy, so the KL is not 0
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pairs = [
        PairExample("Q: what is 2+2?", " It is 4.", " five", ""),
        PairExample("Tell me a long story about a cat. " * 3, " Once upon a time, a cat." * 3, " No.", ""),
    ]
    batch = PreferenceCollator(tok.pad_token_id)(PreferenceTokenizer(tok, 256).all(pairs)).to(device)
    completion = torch.zeros_like(batch.input_ids).view(-1)
    completion[batch.predict_from + 1] = 1
    completion = completion.view(batch.input_ids.shape)
    dtype = torch.bfloat16 if autocast else torch.float32
    tolerance = 2e-2 if autocast else 1e-4
    head_weight = output_head(policy).weight

    def run(fused: bool):
        policy.zero_grad()
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=autocast):
            if fused:
                states = completion_states(policy, batch)
                with torch.no_grad():
                    ref_states = completion_states(reference, batch)
                logps, _, kl = score_completions(output_head(policy), states, 64, output_head(reference), ref_states)
            else:
                with torch.no_grad():
                    ref_logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[
                        :, :-1
                    ]
                logps, _, kl, _ = full_logits_scores(
                    policy, batch.input_ids, batch.attention_mask, completion, ref_logits
                )
        (logps.sum() + kl.sum()).backward()
        return logps.detach().float(), kl.detach().float(), head_weight.grad.detach().float().clone()

    fused, plain = run(True), run(False)
    worst = []
    for name, a, b in zip(("logps", "kl", "head gradient"), fused, plain, strict=True):
        error = ((a - b).norm() / b.norm().clamp(min=1e-12)).item()
        worst.append(f"{name} {error:.1e}")
        if not error <= tolerance:
            raise AssertionError(f"{name}: fused vs full logits differ by {error:.2e} (tolerance {tolerance})")
    return ", ".join(worst) + f" (relative, tolerance {tolerance})"


# -- 2. train() matrix ------------------------------------------------------------------------

TRAIN_CASES = {
    "dpo full, reference copy": dict(loss="dpo", reference="copy"),
    "dpo LoRA, adapter-off reference": dict(loss="dpo", lora=True),
    "dpo QLoRA (4-bit base)": dict(loss="dpo", lora=True, load_in_4bit=True),
    "dpo cached reference": dict(loss="dpo", reference="cached"),
    "dpo fp32": dict(loss="dpo", mixed_precision="no"),
    "dpo fp16 autocast": dict(loss="dpo", mixed_precision="fp16"),
    "tdpo2": dict(loss="tdpo2"),
    "kto (paired data)": dict(loss="kto"),
    "orpo": dict(loss="orpo"),
    "grpo": dict(loss="grpo", online=True),
    "ppo": dict(loss="ppo", online=True),
}
STARTS_AT_LN2 = {"dpo", "tdpo2"}


def check_train(case: str, model_dir: str, workdir: Path) -> str:
    from prefopt import TrainConfig, train

    values = dict(TRAIN_CASES[case])
    if values.get("load_in_4bit") and importlib.util.find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes is not installed")
    online = values.pop("online", False)
    data = sample_path("arithmetic.jsonl" if online else "conversational.jsonl")
    extra = dict(reward="exact_match", num_generations=2, max_new_tokens=8) if online else {}
    config = TrainConfig(
        model=model_dir, data=[str(data)], output_dir=str(workdir / case.replace(" ", "_").replace(",", "")),
        max_steps=3, batch_size=2, max_length=128, logging_steps=1, save_steps=1000, learning_rate=1e-4,
        overwrite=True, **extra, **values,
    )  # fmt: skip
    result = train(config)
    logs = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in logs if "loss" in entry]
    if len(losses) != 3 or not all(math.isfinite(x) for x in losses):
        raise AssertionError(f"losses {losses}")
    if values["loss"] in STARTS_AT_LN2 and abs(losses[0] - math.log(2)) > 1e-4:
        raise AssertionError(f"step 1 loss {losses[0]:.6f}, not ln 2")
    return f"losses {', '.join(f'{x:.4f}' for x in losses)}"


# -- 3. sharded engines with one process -------------------------------------------------------


def check_sharded(recipe: str, model_dir: str, workdir: Path, device: str) -> str:
    if recipe.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        raise Skip("deepspeed is not installed")
    if recipe == "fsdp2" and not device.startswith("cuda"):
        raise Skip("accelerate enables FSDP only on accelerators")
    import yaml

    values = yaml.safe_load((ROOT / "recipes" / "accelerate" / f"{recipe}.yaml").read_text())
    values.update(num_processes=1, use_cpu=not device.startswith("cuda"))
    config = workdir / f"{recipe}.yaml"
    config.write_text(yaml.safe_dump(values))
    out = workdir / f"sharded-{recipe}"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "prefopt", "train",
        "--model", model_dir, "--data", str(sample_path("conversational.jsonl")), "--output-dir", str(out),
        "--max-steps", "3", "--batch-size", "2", "--max-length", "128", "--logging-steps", "1",
        "--learning-rate", "1e-4", "--save-steps", "1000",
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=420)
    if proc.returncode != 0:
        raise AssertionError((proc.stderr.strip().splitlines() or ["(no stderr)"])[-1])
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in logs if "loss" in entry]
    if abs(losses[0] - math.log(2)) > 1e-4:
        raise AssertionError(f"step 1 loss {losses[0]:.6f}, not ln 2")
    return f"losses {', '.join(f'{x:.4f}' for x in losses)}"


# -- 4. a DPO step against TRL -----------------------------------------------------------------


def check_timing(workdir: Path, quick: bool) -> str:
    missing = [name for name in ("trl", "datasets") if importlib.util.find_spec(name) is None]
    if missing:
        raise Skip(f"{' and '.join(missing)} not installed")
    shape = (
        dict(hidden=64, layers=2, vocab=259) if quick else dict(hidden=576, layers=30, vocab=49152, intermediate=1536)
    )
    model_dir = tiny_llama_dir(workdir / "smollm2-shaped", **shape)
    out = workdir / "bench.md"
    env = {**os.environ, "PREFOPT_BENCH_MODEL": model_dir}
    command = [
        sys.executable,
        "-m",
        "prefopt.bench.dpo",
        "--quick",
        "--steps",
        "2" if quick else "6",
        "--out",
        str(out),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=420, env=env)
    if proc.returncode != 0:
        raise AssertionError((proc.stderr.strip().splitlines() or ["(no stderr)"])[-1])
    return out.read_text().strip()


# -- the run -----------------------------------------------------------------------------------


class Skip(Exception):
    pass


def record(results: list, section: str, name: str, check, *args) -> None:
    started = time.time()
    try:
        detail, status = check(*args), "pass"
    except Skip as reason:
        detail, status = str(reason), "skip"
    except Exception as error:  # a failed check is a finding, not the end of the check
        detail, status = (
            f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}",
            "fail",
        )
        traceback.print_exc()
    results.append(
        {
            "section": section,
            "name": name,
            "status": status,
            "seconds": round(time.time() - started, 1),
            "detail": detail,
        }
    )
    print(
        f"gpu-check: {status:4} {section}: {name} ({results[-1]['seconds']} s) {detail.splitlines()[0] if detail else ''}"
    )


def environment(device: str) -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("accelerate", "peft", "trl", "deepspeed", "bitsandbytes", "datasets"):
        spec = importlib.util.find_spec(name)
        info[name] = importlib.metadata.version(name) if spec else None
    info["device"] = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu"
    return info


def write_report(out: Path, env: dict, results: list) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.json").write_text(json.dumps({"environment": env, "results": results}, indent=2))
    lines = ["# prefopt GPU check", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in env.items()]
    lines += ["", "| section | check | status | seconds | detail |", "|---|---|---|---|---|"]
    for r in results:
        detail = r["detail"].splitlines()[0] if r["section"] != "timing" else "see below"
        lines.append(f"| {r['section']} | {r['name']} | {r['status']} | {r['seconds']} | {detail} |")
    lines += ["", *(r["detail"] for r in results if r["section"] == "timing" and r["status"] == "pass")]
    (out / "gpu-check.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefopt.bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu-check", help="folder for gpu-check.json and gpu-check.md")
    parser.add_argument("--quick", action="store_true", help="the dry run: tiny models, on the CPU if no GPU")
    parser.add_argument("--only", default=None, help="comma-separated sections: kernels,train,sharded,timing")
    args = parser.parse_args(argv)
    import torch

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        parser.error("no CUDA GPU here: pass --quick for the dry run on the CPU")
    sections = set((args.only or "kernels,train,sharded,timing").split(","))
    out = Path(args.out)
    results: list = []
    env = environment(device)
    print(f"gpu-check: {json.dumps(env)}")
    with tempfile.TemporaryDirectory(prefix="prefopt-gpu-check-") as tmp:
        workdir = Path(tmp)
        model_dir = tiny_llama_dir(workdir / "tiny")
        if "kernels" in sections:
            record(results, "kernels", "fused vs full logits, float32", check_kernels, device, False)
            bf16 = device == "cpu" or torch.cuda.is_bf16_supported()
            if bf16:
                record(results, "kernels", "fused vs full logits, bf16 autocast", check_kernels, device, True)
        if "train" in sections:
            cases = ["dpo full, reference copy", "tdpo2", "grpo"] if args.quick else list(TRAIN_CASES)
            for case in cases:
                record(results, "train", case, check_train, case, model_dir, workdir)
        if "sharded" in sections:
            for recipe in ("fsdp2", "zero3"):
                record(results, "sharded", f"{recipe}, one process", check_sharded, recipe, model_dir, workdir, device)
        if "timing" in sections:
            record(results, "timing", "DPO step, prefopt vs TRL", check_timing, workdir, args.quick)
    write_report(out, env, results)
    failed = [r for r in results if r["status"] == "fail"]
    print(
        f"gpu-check: {len(results) - len(failed)} of {len(results)} passed or skipped; report in {out / 'gpu-check.md'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
