"""`prefopt eval` and `prefopt report`: what a run did. Thin: parse, call the library, print."""

from __future__ import annotations

import argparse
import json

from prefopt.cli._options import add_reward_options, make_reward, sample_settings


def _cmd_eval(args: argparse.Namespace) -> int:
    from prefopt.evaluation.evaluate import evaluate, format_result

    reward = make_reward(args)  # loaded before the models, so a bad reward fails in seconds
    settings = sample_settings(args)
    result = evaluate(
        args.model,
        reference=args.reference,
        data=args.data,
        prompts=args.prompts,
        reward=reward,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        batch_size=args.batch_size,
        loss=args.loss,
        beta=args.beta,
        limit=args.limit,
        sample_settings=settings,
        dtype=args.dtype,
        against=args.against,
    )
    print(json.dumps(result) if args.json else format_result(result))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from prefopt.training.report import plot_runs

    path = plot_runs(args.runs, args.output)
    print(f"prefopt: report of {len(args.runs)} run(s) -> {path}")
    return 0


def add_commands(commands) -> None:
    ev = commands.add_parser(
        "eval",
        help="compare a trained model with its reference on held-out pairs and/or sampled answers",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ev.add_argument("--model", required=True, help="a run folder, its final/, or a model folder")
    ev.add_argument("--reference", default=None, help="reference model (default: the model the run started from)")
    ev.add_argument(
        "--against", default=None, help="A/B: compare the sampled answers with this model's (a folder or a run)"
    )
    ev.add_argument("--data", nargs="+", default=None, help="held-out preference pairs")
    ev.add_argument("--prompts", nargs="+", default=None, help="held-out prompts to answer (needs --reward)")
    add_reward_options(ev)
    ev.add_argument("--max-length", type=int, default=1024, help="token budget of prompt + completion")
    ev.add_argument("--max-prompt-length", type=int, default=None, help="token budget of the prompt")
    ev.add_argument("--loss", default=None, help="loss to report (default: the run's)")
    ev.add_argument(
        "--beta", type=float, default=None, help="beta of the implicit reward and the loss (default: the run's)"
    )
    ev.add_argument("--limit", type=int, default=None, help="use only the first N pairs / prompts")
    ev.add_argument("--batch-size", type=int, default=8, help="pairs (or prompts) per forward pass")
    ev.add_argument("--num-samples", type=int, default=1, help="answers per prompt and model")
    ev.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit")
    ev.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ev.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    ev.add_argument("--seed", type=int, default=0, help="sampling seed")
    ev.add_argument("--dtype", default="float32", help="auto, float32, bfloat16 or float16")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(run=_cmd_eval)

    report = commands.add_parser("report", help="plot one or more runs' metrics into one PNG")
    report.add_argument("runs", nargs="+", help="run folders (with metrics.jsonl), overlaid, labelled by loss")
    report.add_argument("--output", default="report.png", help="the PNG to write")
    report.set_defaults(run=_cmd_report)
