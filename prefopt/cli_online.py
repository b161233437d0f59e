"""The online-side commands (DESIGN §6): `prefopt rewards`, `sample`, `pairs`. Thin: parse, call, print."""

from __future__ import annotations

import argparse


def _parse_arg(text: str) -> tuple[str, object]:
    from prefopt.cli import _parse_loss_arg

    return _parse_loss_arg(text)


def _import_reward_modules(args: argparse.Namespace) -> None:
    from prefopt.rewards import import_reward_module

    for module in getattr(args, "reward_module", None) or []:
        import_reward_module(module)


def _cmd_rewards(args: argparse.Namespace) -> int:
    from prefopt.rewards import available_rewards, get_reward_spec

    _import_reward_modules(args)
    for name in available_rewards():
        spec = get_reward_spec(name)
        columns = ", ".join(spec.columns) or "-"
        print(f"{name}\n  {spec.description}\n  arguments: {spec.describe_arguments()}\n  columns: {columns}")
    return 0


def _add_reward_options(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--reward", required=required, help="registered reward name (`prefopt rewards` lists them)")
    parser.add_argument(
        "--reward-arg",
        dest="reward_args",
        action="append",
        type=_parse_arg,
        default=[],
        metavar="NAME=VALUE",
        help="reward argument, e.g. path=DIR (repeatable)",
    )
    parser.add_argument(
        "--reward-module", action="append", default=[], help="import this .py file or module first (custom rewards)"
    )


def add_commands(commands) -> None:
    """Add the online-side subcommands to `prefopt`'s subparsers."""
    rewards = commands.add_parser("rewards", help="list registered rewards, their arguments and columns")
    rewards.add_argument("--reward-module", action="append", default=[], help="import this module first")
    rewards.set_defaults(run=_cmd_rewards)
