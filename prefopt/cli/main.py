"""The `prefopt` command line: parses, calls the library, prints. No logic of its own."""

from __future__ import annotations

import argparse
import sys

from prefopt import __version__
from prefopt.cli import eval as evaluation_commands
from prefopt.cli import feedback as feedback_command
from prefopt.cli import online as online_commands
from prefopt.cli._options import Parser, add_train_options
from prefopt.data.formats import FORMATS
from prefopt.errors import PrefoptError


def _cmd_losses(args: argparse.Namespace) -> int:
    from prefopt.losses import available_losses, get_loss_spec

    for name in available_losses():
        spec = get_loss_spec(name)
        hypers = ", ".join(f"{k}={v!r}" for k, v in spec.hyperparameters.items()) or "-"
        needs = ", ".join(spec.needs) or "policy log-probs only"
        kind = "paired" if spec.paired else "unpaired"
        print(f"{name}\n  {spec.description}\n  hyperparameters: {hypers}\n  needs: {needs} ({kind})")
    return 0


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    import json

    from prefopt.data.inspection import format_report, inspect_data
    from prefopt.models.hub import load_tokenizer

    result = inspect_data(
        args.files, lambda: load_tokenizer(args.model), args.max_length, args.max_prompt_length, args.format
    )
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from prefopt.config import build_config, load_yaml
    from prefopt.training.run import train

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "run", "config")}
    for name in ("loss_args", "reward_args"):
        if name in overrides:
            overrides[name] = dict(overrides[name])
    try:
        result = train(build_config(load_yaml(args.config) if args.config else {}, overrides))
    except BaseException:
        _leave_process_group(wait_for_others=False)  # a failed peer might never reach a barrier
        raise
    _leave_process_group(wait_for_others=True)
    return 130 if result.interrupted else 0


def _leave_process_group(wait_for_others: bool) -> None:
    """Under torchrun / accelerate launch, close the process group before the interpreter exits.

    Left open, gloo's worker threads are torn down during interpreter shutdown, which sometimes
    aborts a process ("terminate called without an active exception") after a successful run.
    After a successful run the processes first wait for each other, so none tears its group down
    while the main process is still writing final/. The CLI owns its process, so it closes the
    group; `train()` in a notebook leaves that to the caller.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="prefopt", description="Offline preference optimization for causal LMs.")
    parser.add_argument("--version", action="version", version=f"prefopt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    losses = commands.add_parser("losses", help="list registered losses, their hyperparameters and needs")
    losses.add_argument("--loss-module", action="append", default=[], help="import this module first (custom losses)")
    losses.set_defaults(run=_cmd_losses)

    train = commands.add_parser(
        "train", help="train a model on preference data", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_train_options(train)
    train.set_defaults(run=_cmd_train)

    data = commands.add_parser("data", help="look at preference data, make data from conversation logs").add_subparsers(
        dest="data_command", required=True
    )
    inspect = data.add_parser("inspect", help="format, counts, token lengths, truncation at a max length")
    inspect.add_argument("files", nargs="+", help=".jsonl/.json/.parquet/.csv files or save_to_disk folders")
    inspect.add_argument("--model", default="smollm2-135m-instruct", help="tokenizer: a model folder or alias")
    inspect.add_argument("--max-length", type=int, default=1024, help="token budget of prompt + completion")
    inspect.add_argument("--max-prompt-length", type=int, default=None, help="token budget of the prompt")
    inspect.add_argument("--format", default=None, choices=FORMATS, help="skip auto-detection")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(run=_cmd_data_inspect)
    feedback_command.add_command(data)  # conversation logs -> KTO / SFT data
    online_commands.add_commands(commands)  # rewards, sample, pairs, iterate (DESIGN §6)
    evaluation_commands.add_commands(commands)  # eval, report
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for module in getattr(args, "loss_module", None) or []:  # before any loss name is looked up
            from prefopt.plugins import import_loss_module

            import_loss_module(module)
        return args.run(args)
    except PrefoptError as error:
        print(f"prefopt: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prefopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
