"""`zeroshard env`: what this machine gives zeroshard (paste it into bug reports)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from typing import Any

EPILOG = """example:
  zeroshard env
  zeroshard env --json"""


def add_parser(sub: Any, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help="versions, backends, devices, whether the Triton kernels will be used",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=handle)
    return p


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import zeroshard
    from zeroshard.update import apply as update

    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "zeroshard": zeroshard.__version__,
        "zeroshard_path": os.path.dirname(zeroshard.__file__),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "backends": {
            "gloo": dist.is_available() and dist.is_gloo_available(),
            "nccl": dist.is_available() and dist.is_nccl_available(),
            "mpi": dist.is_available() and dist.is_mpi_available(),
        },
        "cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda else [],
        "cpus": os.cpu_count(),
        # the optimizer's own dispatch (kernel "auto") on this machine's first device
        "update_kernel": update.resolve_backend("auto", device),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    return info


def handle(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(value) or "none"
        print(f"{key:<{width}}  {value}")
    if info["update_kernel"] != "triton":
        why = "no CUDA device" if not info["devices"] else "triton is not importable"
        print(f"{'':<{width}}  (Triton kernels unused: {why}; the torch kernels run)")
    sys.stdout.flush()
    return 0
