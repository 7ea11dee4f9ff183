"""What every subcommand shares: one-line errors and byte sizes written like `80GB`."""

from __future__ import annotations

import re
import sys

# decimal units, as GPU memory and the ZeRO paper are quoted; binary ones spelled GiB
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


class CliError(Exception):
    """A user error: printed as one line on stderr, exit status 2, no traceback."""


def fail(command: str, message: str) -> int:
    one_line = " | ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"zeroshard {command}: error: {one_line}", file=sys.stderr)
    return 2


def parse_bytes(text: str) -> int:
    """`80GB`, `80 GB`, `1.5TiB`, `500000` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise CliError(
            f"cannot read {text!r} as a size; write e.g. 80GB, 80GiB or 5e9 (units: B, KB, MB, "
            "GB, TB, KiB, MiB, GiB, TiB)"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def parse_count(text: str) -> int:
    """`7e9`, `7B`, `350M`, `7000000000` -> an element count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBtT]?)\s*", str(text))
    if not m:
        raise CliError(f"cannot read {text!r} as a parameter count; write e.g. 7e9, 7B or 350M")
    scale = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def human(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} B"
