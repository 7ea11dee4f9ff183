"""`zeroshard <subcommand>`: argparse subparsers, one module per subcommand."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from zeroshard.cli import check_config, consolidate, env, estimate, run
from zeroshard.cli.common import CliError, fail

SUBCOMMANDS = {
    "run": run,
    "estimate": estimate,
    "check-config": check_config,
    "consolidate": consolidate,
    "env": env,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zeroshard",
        description="ZeRO-style sharded training: launch, size, check configs, consolidate.",
        epilog="example:\n  zeroshard estimate --params 7e9 --world-size 8 --precision bf16\n"
        "run `zeroshard <subcommand> --help` for each subcommand's options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, module in SUBCOMMANDS.items():
        module.add_parser(sub, name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "run":  # torchrun's options pass through: parsed by run.py itself
        return run.main(parser, argv[1:])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except CliError as e:
        return fail(args.command, str(e))


if __name__ == "__main__":
    sys.exit(main())
