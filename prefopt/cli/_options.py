"""Flags and helpers the `prefopt` subcommands share: TrainConfig's flags, NAME=VALUE arguments,
the reward flags and the sampling settings. Imported by the command modules, never the other way."""

from __future__ import annotations

import argparse
import difflib
import sys


class Parser(argparse.ArgumentParser):
    """argparse with the habits of TRL and transformers users in mind.

    - No silent abbreviations: `--lr 1e-5` is not taken as `--lr-scheduler`.
    - Every flag is accepted with underscores too (`--learning_rate` = `--learning-rate`), as
      YAML keys are.
    - An unknown flag gets one line naming the flag it probably is: prefopt's name for a
      transformers/TRL setting (`--per_device_train_batch_size` -> `--batch-size`), or the closest
      flags of the command.
    Subcommand parsers are made by `add_subparsers`, which builds them of this class too.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        end = args.index("--") if "--" in args else len(args)
        self.typed = {hyphenated(a): a for a in args[:end]}  # to name an unknown flag as the user wrote it
        return super().parse_known_args([hyphenated(a) for a in args[:end]] + args[end:], namespace)

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self.command_parser(parsed)
            command.error(unknown_arguments_message([self.typed.get(e, e) for e in extras], command))
        return parsed

    def command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The (sub)command parser that `parsed` came through: `prefopt data inspect` -> inspect's."""
        parser = self
        while True:
            chosen = None
            for action in parser._actions:  # argparse keeps subcommands only here
                if isinstance(action, argparse._SubParsersAction):
                    chosen = action.choices.get(getattr(parsed, action.dest, None) or "")
            if chosen is None:
                return parser
            parser = chosen


def hyphenated(token: str) -> str:
    """'--learning_rate=1e-5' -> '--learning-rate=1e-5'; values and positionals are left alone."""
    if not token.startswith("--") or token == "--":
        return token
    name, equals, value = token.partition("=")
    return name.replace("_", "-") + equals + value


def unknown_arguments_message(extras: list[str], parser: argparse.ArgumentParser) -> str:
    from prefopt.config import OTHER_NAMES, flag

    flags = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    token = next((t for t in extras if t.startswith("-")), None)
    if token is None:
        return f"unexpected argument '{extras[0]}'"
    name = token.partition("=")[0]
    key = name.lstrip("-").replace("-", "_")
    if key in OTHER_NAMES:
        field, note = OTHER_NAMES[key]
        if flag(field) in flags:
            note = f" ({note})" if note else ""
            return f"unknown flag {name}: prefopt calls it {flag(field)}{note}"
    close = difflib.get_close_matches(name, flags, n=3, cutoff=0.6)
    close += [f for f in flags if key in f[2:].replace("-", "_") and f not in close][: 3 - len(close)]
    hint = (
        f"; did you mean {' or '.join(close)}?" if close else f"; `prefopt {parser.prog.split()[-1]} --help` lists them"
    )
    return f"unknown flag {name}{hint}"


def parse_name_value(text: str) -> tuple[str, object]:
    import yaml

    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got '{text}'")
    return name.strip(), yaml.safe_load(value)  # 0.1 -> float, true -> bool, null -> None


def parse_columns(text: str) -> dict[str, str]:
    """--columns prompt=question,chosen=good -> {"prompt": "question", "chosen": "good"}."""
    columns = {}
    for part in text.split(","):
        ours, sep, theirs = part.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise argparse.ArgumentTypeError(f"expected OURS=THEIRS[,OURS=THEIRS...], got '{text}'")
        columns[ours.strip()] = theirs.strip()
    return columns


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
        if name in ("reward", "reward_weights"):  # repeatable: --reward a --reward b --reward-weight 1 ...
            parser.add_argument(
                "--reward-weight" if name == "reward_weights" else flag,
                dest=name,
                action="append",
                type=float if name == "reward_weights" else str,
                default=argparse.SUPPRESS,
                metavar="W" if name == "reward_weights" else "NAME",
                help=f"{help_text} (repeatable)",
            )
        elif name == "columns":
            parser.add_argument(
                flag, type=parse_columns, default=argparse.SUPPRESS, metavar="OURS=THEIRS,...", help=help_text
            )
        elif kind is dict:  # --loss-arg, --reward-arg
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
    parser.add_argument(
        "--reward",
        action="append",
        required=required,
        help="registered reward name (`prefopt rewards` lists them); repeat it to sum several",
    )
    parser.add_argument(
        "--reward-weight",
        dest="reward_weights",
        action="append",
        type=float,
        default=None,
        metavar="W",
        help="one weight per --reward, in order (default 1 each)",
    )
    parser.add_argument(
        "--reward-arg",
        dest="reward_args",
        action="append",
        type=parse_name_value,
        default=[],
        metavar="NAME=VALUE",
        help="reward argument, e.g. path=DIR; with several rewards REWARD.NAME=VALUE (repeatable)",
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
    from prefopt.rewards import configure_rewards

    import_reward_modules(args)
    return configure_rewards(args.reward, getattr(args, "reward_weights", None), dict(args.reward_args))
