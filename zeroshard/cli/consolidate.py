"""`zeroshard consolidate`: one full-precision model from a sharded checkpoint.

Calls `zeroshard.consolidate(ckpt_dir, out_dir, dtype=..., max_shard_size=..., hf_config=...)`,
which writes safetensors files (sharded at `max_shard_size`) readable without zeroshard, and
`config.json` when the model's Hugging Face config is known (`--hf-config`, or saved by
`ZeroShardTrainer`), so that `from_pretrained(out)` works.
"""

from __future__ import annotations

import argparse
from typing import Any

from zeroshard.cli.common import CliError

EPILOG = """examples:
  zeroshard consolidate checkpoints/step_1000 out/model --dtype bf16 --max-shard-size 5GB
  zeroshard consolidate ckpt out/model --hf-config path/to/hf_model   # + out/config.json"""


def add_parser(sub: Any, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help="write full model weights (safetensors) from a sharded checkpoint",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("checkpoint", help="checkpoint folder written by zeroshard.save_checkpoint")
    p.add_argument("out", help="output folder")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="dtype of the written tensors (default: as saved)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output file (default 5GB)")
    p.add_argument("--hf-config", metavar="PATH",
                   help="the model's Hugging Face config.json (or its folder): written as "
                        "out/config.json (default: the one ZeroShardTrainer saved, if any)")
    p.set_defaults(handler=handle)
    return p


def handle(args: argparse.Namespace) -> int:
    import zeroshard

    consolidate = getattr(zeroshard, "consolidate", None)
    if consolidate is None:
        raise CliError(
            f"this zeroshard ({zeroshard.__version__}) has no zeroshard.consolidate yet: "
            "universal checkpoints are not part of this build"
        )
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        args.dtype or ""
    )
    try:
        result = consolidate(args.checkpoint, args.out, dtype=dtype,
                             max_shard_size=args.max_shard_size,
                             hf_config=args.hf_config)  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    print(f"wrote {args.out}" + (f": {result}" if result else ""))
    return 0
