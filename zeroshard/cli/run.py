"""`zeroshard run`: validate the config, then launch through `torch.distributed.run`.

The config is checked (with the launch's world size) before any process starts, so a typo
costs one line on stderr instead of N tracebacks. It reaches the script as the absolute path
in `ZEROSHARD_CONFIG`, which `zeroshard.initialize(model)` reads when given no config.
torchrun's own options (`--nnodes`, `--node-rank`, `--rdzv-endpoint`, `--rdzv-backend`,
`--standalone`, `--master-port`, ...) pass through unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from zeroshard.cli.common import CliError, fail

CONFIG_ENV = "ZEROSHARD_CONFIG"

EPILOG = """example:
  zeroshard run --nproc 2 --config configs/zero2.json train.py --epochs 3
  zeroshard run --nnodes 2 --node-rank 0 --rdzv-endpoint host0:29500 --nproc 8 \\
      --config configs/zero3.json train.py

The script calls `zeroshard.initialize(model)` without a config: it reads the path from
ZEROSHARD_CONFIG. Every torchrun option before the script is passed to torchrun."""


def add_parser(sub: Any, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help="launch a training script with torchrun and a validated config",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--config", required=True, help="zeroshard/DeepSpeed JSON config")
    p.add_argument("--nproc", "--nproc-per-node", dest="nproc", metavar="N",
                   help="processes per node (torchrun's --nproc-per-node)")  # fmt: skip
    p.add_argument("script", help="the training script (or module with -m)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.add_argument_group(
        "torchrun options", "--nnodes, --node-rank, --rdzv-endpoint, --rdzv-backend, --rdzv-id, "
        "--standalone, --master-addr, --master-port, --max-restarts, ... (see torchrun --help)",
    )  # fmt: skip
    return p


def _torchrun_options() -> dict[str, int]:
    """torchrun's option strings -> how many values each takes (0 or 1)."""
    from torch.distributed.run import get_args_parser

    out: dict[str, int] = {}
    for action in get_args_parser()._actions:
        for opt in action.option_strings:
            out[opt] = 0 if action.nargs == 0 else 1
    return out


def split_argv(argv: list[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """(our options, torchrun's option tokens, [script, *script args])."""
    ours = {"--config": "config", "--nproc": "nproc", "--nproc-per-node": "nproc",
            "--nproc_per_node": "nproc"}  # fmt: skip
    theirs = _torchrun_options()
    mine: dict[str, str] = {}
    passed: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("-") or token == "-":
            return mine, passed, argv[i:]
        name, eq, value = token.partition("=")
        if name in ("-h", "--help"):
            raise SystemExit("help")
        takes = 1 if name in ours else theirs.get(name)
        if takes is None:
            raise CliError(f"unknown option {name!r} before the script (see zeroshard run --help)")
        if takes and not eq:
            if i + 1 >= len(argv):
                raise CliError(f"option {name} needs a value")
            value = argv[i + 1]
            i += 1
        if name in ours:
            mine[ours[name]] = value
        else:
            passed += [name, value] if takes else [name]
        i += 1
    return mine, passed, []


def _int_or(text: str | None, default: int) -> int:
    """torchrun's --nnodes may be a range (`1:4`): validate for the largest."""
    if text is None:
        return default
    last = str(text).split(":")[-1]
    return int(last) if last.isdigit() else default


def world_size(nproc: str | None, torchrun_args: list[str]) -> int:
    return ranks(nproc, torchrun_args)[0]


def ranks(nproc: str | None, torchrun_args: list[str]) -> tuple[int, int]:
    """(world size, ranks per node) of the torchrun command line."""
    if nproc in (None, "auto", "cpu", "gpu", "xpu"):
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        per_node = gpus if nproc != "cpu" and gpus else (os.cpu_count() or 1)
        per_node = per_node if nproc is not None else 1
    else:
        per_node = _int_or(nproc, 0)
        if per_node < 1:
            raise CliError(f"--nproc must be a positive number, got {nproc!r}")
    nnodes = None
    for j, tok in enumerate(torchrun_args):
        if tok == "--nnodes" and j + 1 < len(torchrun_args):
            nnodes = torchrun_args[j + 1]
    return per_node * _int_or(nnodes, 1), per_node


def main(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    run_parser = parser._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    try:
        mine, passed, rest = split_argv(argv)
    except SystemExit:
        run_parser.print_help()
        return 0
    except CliError as e:
        return fail("run", str(e))
    if "config" not in mine:
        return fail("run", "--config CFG is required (a zeroshard/DeepSpeed JSON config)")
    if not rest:
        return fail("run", "no training script given (zeroshard run --config CFG script.py)")
    from zeroshard.cli.check_config import config_problems, readable_json
    from zeroshard.config.schema import ConfigError, load_config

    path = os.path.abspath(mine["config"])
    try:
        world, per_node = ranks(mine.get("nproc"), passed)
        if not readable_json(path):
            load_config(path)  # a missing file or malformed JSON: in load_config's words
        problems = config_problems(path, world, per_node)  # hpZ needs to fit in a node
    except (ConfigError, CliError) as e:
        return fail("run", str(e))
    if problems:  # every problem, one line each, as check-config lists them
        if len(problems) == 1:
            return fail("run", f"invalid zeroshard config in {path}: {problems[0]}")
        print(f"zeroshard run: error: invalid zeroshard config in {path} "
              f"({len(problems)} problems):", file=sys.stderr)  # fmt: skip
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    os.environ[CONFIG_ENV] = path
    torchrun_argv = (["--nproc-per-node", mine["nproc"]] if "nproc" in mine else []) + passed
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(torchrun_argv + rest)
    except ChildFailedError as e:  # torchrun has printed the failing ranks' output already
        rank, failure = e.get_first_failure()
        fail("run", f"training failed: rank {rank} exited with code {failure.exitcode} "
                    "(its output is above)")  # fmt: skip
        return 1
    return 0
