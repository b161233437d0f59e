"""The `prefopt` command line: parses, calls the library, prints. No logic of its own."""

from __future__ import annotations

import argparse
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefopt", description="Offline preference optimization for causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    losses = commands.add_parser("losses", help="list registered losses, their hyperparameters and needs")
    losses.add_argument("--loss-module", action="append", default=[], help="import this module first (custom losses)")
    losses.set_defaults(run=_cmd_losses)

    for register in _EXTRA_COMMANDS:
        register(commands)
    return parser


_EXTRA_COMMANDS: list = []


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for module in getattr(args, "loss_module", None) or []:
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
