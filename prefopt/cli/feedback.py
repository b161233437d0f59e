"""`prefopt data feedback LOGS`: conversation logs -> KTO or SFT data by the users' reactions. Thin."""

from __future__ import annotations

import argparse
from pathlib import Path

from prefopt.cli._options import add_reward_options, import_reward_modules
from prefopt.errors import PrefoptError


def _classifier(args: argparse.Namespace):
    """The reaction classifier: --judge MODEL, else --reward NAME, else the keyword rule."""
    from prefopt.rewards import get_reward

    import_reward_modules(args)
    if args.reward and len(args.reward) > 1 or args.reward_weights:
        raise PrefoptError("data feedback takes one classifier: one --reward (no --reward-weight)")
    arguments = dict(args.reward_args or [])
    if args.judge:
        if args.reward:
            raise PrefoptError("choose one of --judge and --reward")
        arguments.setdefault("model", args.judge)
        if args.judge_template:
            arguments.setdefault("template_file", args.judge_template)
        return get_reward("reaction_judge", **arguments)
    if args.judge_template:
        raise PrefoptError("--judge-template goes with --judge MODEL")
    return get_reward(args.reward[0] if args.reward else "reaction_keywords", **arguments)


def _cmd_feedback(args: argparse.Namespace) -> int:
    from prefopt.iterative.feedback import feedback_records, kto_weight_advice
    from prefopt.models.rollout import write_jsonl

    if Path(args.output).exists() and not args.overwrite:
        raise PrefoptError(f"{args.output} exists; choose another --output or pass --overwrite")
    classifier = _classifier(args)
    records, report = feedback_records(args.logs, classifier, args.positive_only)
    for note in report.notes:
        print(f"prefopt: {note}")
    print(f"prefopt: reactions labelled by {classifier.name}: {report.summary()}")
    if not records:
        raise PrefoptError(f"nothing written: {report.why_empty(args.positive_only)}")
    write_jsonl(args.output, records, overwrite=args.overwrite)
    if args.positive_only:
        print(f"prefopt: {report.written} SFT examples (the desirable answers; train with --loss sft) -> {args.output}")
    else:
        print(f"prefopt: {report.written} KTO examples -> {args.output}")
        print(f"prefopt: {kto_weight_advice(report.desirable, report.undesirable)}")
    return 0


def add_command(data) -> None:
    """Add `feedback` to the `prefopt data` subcommands."""
    feedback = data.add_parser(
        "feedback",
        help="conversation logs -> KTO data (or SFT data) labelled by the user's reaction to each answer",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    feedback.add_argument("logs", nargs="+", help="conversation logs: messages, ShareGPT, or prompt + completion")
    feedback.add_argument("--output", required=True, help="file (.jsonl) to write")
    feedback.add_argument(
        "--judge", default=None, metavar="MODEL", help="a local causal LM classifies each reaction (reaction_judge)"
    )
    feedback.add_argument(
        "--judge-template",
        default=None,
        metavar="FILE",
        help="the judge's question: text with {conversation} and {reaction}",
    )
    add_reward_options(feedback)
    feedback.add_argument(
        "--positive-only", action="store_true", help="SFT data: only the answers the user was satisfied with"
    )
    feedback.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    feedback.set_defaults(run=_cmd_feedback)
