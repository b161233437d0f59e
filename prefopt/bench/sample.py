"""Benchmark: `prefopt sample` (prompt prefilled once, KV cache shared by its N samples) against plain
`model.generate(num_return_sequences=N)`, on the same prompts, model and seed, each in a fresh process.

    python -m prefopt.bench.sample [--model smollm2-135m-instruct] [--num-samples 8] [--prompts 16]

Reports completion tokens per second and peak memory (CUDA: max allocated; CPU: the process's peak
RSS) per method. Both methods draw the same tokens (same seed, same per-step distributions).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from prefopt.bench.samples import sample_path


def _worker(args) -> dict:
    import torch

    from prefopt.data.formats import load_prompts
    from prefopt.data.tokenize import PreferenceTokenizer
    from prefopt.models.inference import load_for_inference
    from prefopt.models.rollout import SampleSettings, generation_config, left_pad

    model, tok = load_for_inference(args.model, dtype=args.dtype)
    prompts, _ = load_prompts(args.data)
    prompts = prompts[: args.prompts]
    settings = SampleSettings(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens, seed=args.seed)
    config = generation_config(model, tok, settings)
    config.min_new_tokens = args.max_new_tokens  # equal work for both: no early stop at EOS
    tokenizing = PreferenceTokenizer(tok, max_length=2)
    rows = [tokenizing.prompt_ids(p.prompt)[0] for p in prompts]
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    from prefopt.models.rollout import generate_batch

    def run_all() -> int:
        tokens = 0
        for b, start in enumerate(range(0, len(rows), args.batch_size)):
            torch.manual_seed(args.seed + b)
            ids, mask = left_pad(rows[start : start + args.batch_size], tok.pad_token_id, device)
            if args.method == "shared":
                new = generate_batch(model, ids, mask, args.num_samples, config, shared_prefill=True)
            else:
                with torch.no_grad():
                    new = model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        generation_config=config,
                        num_return_sequences=args.num_samples,
                    )[:, ids.shape[1] :]
            tokens += new.numel()
        return tokens

    run_all() if args.warmup else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    tokens = run_all()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    from prefopt.training.memory import peak_memory

    peak = peak_memory(cuda)[0]
    prompt_tokens = sum(map(len, rows))
    return {
        "method": args.method,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_mib": peak / 2**20,
        "prompt_tokens": prompt_tokens,
        "device": str(device),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=str(sample_path("arithmetic.jsonl")))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--method", choices=("shared", "plain"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.method:
        print(json.dumps(_worker(args)))
        return 0
    results = {}
    for method in ("plain", "shared"):
        command = [sys.executable, "-m", "prefopt.bench.sample", "--method", method, *(argv or sys.argv[1:])]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
    plain, shared = results["plain"], results["shared"]
    print(
        f"{args.prompts} prompts x N={args.num_samples}, {args.max_new_tokens} new tokens each, "
        f"{plain['prompt_tokens']} prompt tokens, on {plain['device']}"
    )
    print("| method | completion tokens/s | peak memory (MiB) |\n|---|---|---|")
    print(
        f"| plain generate(num_return_sequences={args.num_samples}) | {plain['tokens_per_s']:.0f} | {plain['peak_mib']:.0f} |"
    )
    print(f"| prefopt sample (shared prefill) | {shared['tokens_per_s']:.0f} | {shared['peak_mib']:.0f} |")
    print(f"speed-up: {shared['tokens_per_s'] / plain['tokens_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
