"""Flags and helpers the `prefopt` subcommands share: TrainConfig's flags, NAME=VALUE arguments,
the reward flags and the sampling settings. Imported by the command modules, never the other way."""

from __future__ import annotations

import argparse


def parse_name_value(text: str) -> tuple[str, object]:
    import yaml

    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got '{text}'")
    return name.strip(), yaml.safe_load(value)  # 0.1 -> float, true -> bool, null -> None


def add_train_options(parser: argparse.ArgumentParser, skip: tuple = ()) -> None:
    """One flag per TrainConfig field (hyphenated); only flags given on the command line override.

    `skip`: fields a command defines flags for itself (iterate's sampling and reward settings)."""
    from prefopt.config import FIELDS, field_type
    from prefopt.config import flag as flag_of

    parser.add_argument("--config", help="YAML recipe; its keys are TrainConfig fields")
    for name, spec in FIELDS.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        kind = field_type(name)
        help_text = spec.metadata.get("help", "")
        if kind is dict:  # --loss-arg, --reward-arg
            parser.add_argument(
                flag_of(name),
                dest=name,
                action="append",
                type=parse_name_value,
                default=argparse.SUPPRESS,
                metavar="NAME=VALUE",
                help=f"{name.split('_')[0]} {'hyperparameter' if name == 'loss_args' else 'argument'} (repeatable)",
            )
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif kind is list:
            parser.add_argument(flag, nargs="+", default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)


def import_reward_modules(args: argparse.Namespace) -> None:
    from prefopt.rewards import import_reward_module

    for module in getattr(args, "reward_module", None) or []:
        import_reward_module(module)


def add_reward_options(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--reward", required=required, help="registered reward name (`prefopt rewards` lists them)")
    parser.add_argument(
        "--reward-arg",
        dest="reward_args",
        action="append",
        type=parse_name_value,
        default=[],
        metavar="NAME=VALUE",
        help="reward argument, e.g. path=DIR (repeatable)",
    )
    parser.add_argument(
        "--reward-module", action="append", default=[], help="import this .py file or module first (custom rewards)"
    )


def sample_settings(args: argparse.Namespace):
    """SampleSettings from the sampling flags `sample` and `eval` share (`top_k` and
    `--no-shared-prefill` only `sample` has: off and shared when a command lacks them)."""
    from prefopt.models.rollout import SampleSettings

    return SampleSettings(
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=getattr(args, "top_k", 0),
        seed=args.seed,
        batch_size=args.batch_size,
        max_prompt_length=args.max_prompt_length,
        shared_prefill=not getattr(args, "no_shared_prefill", False),
    )


def make_reward(args: argparse.Namespace):
    """The configured reward (loaded before any sampling, so a bad one fails in seconds), or None."""
    import_reward_modules(args)
    if not args.reward:
        return None
    from prefopt.rewards import get_reward

    return get_reward(args.reward, **dict(args.reward_args))
