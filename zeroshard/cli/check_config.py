"""`zeroshard check-config`: validate a config and say, key by key, what zeroshard does with it.

Each key of the file gets one line: `used`, `resolved` (an "auto" value and what it becomes),
`no effect` (accepted for DeepSpeed compatibility, changes nothing here, and why) or
`refused` (and why). Exit status 0 when the config is usable, 1 when something is refused.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from zeroshard.cli.common import CliError

EPILOG = """examples:
  zeroshard check-config configs/zero3.json --world-size 8
  zeroshard check-config ds_config.json --world-size 16 --hidden-size 4096"""

# Accepted so DeepSpeed configs load unchanged, but nothing in zeroshard reads them.
NO_EFFECT = {
    "zero_optimization.contiguous_gradients":
        "gradients always live in contiguous flat buffers in zeroshard",
    "wall_clock_breakdown": "zeroshard prints no timing breakdown",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save":
        "zeroshard's model.state_dict() at stage 3 always returns full tensors",
    "optimizer.params.adam_w_mode": "AdamW always decouples weight decay",
}  # fmt: skip

_AUTO_RULES = {
    "zero_optimization.reduce_bucket_size": ("hidden_size * hidden_size", lambda h: h * h),
    "zero_optimization.stage3_prefetch_bucket_size":
        ("0.9 * hidden_size * hidden_size", lambda h: int(0.9 * h * h)),
    "zero_optimization.stage3_param_persistence_threshold":
        ("10 * hidden_size", lambda h: 10 * h),
}  # fmt: skip


def add_parser(sub: Any, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help="validate a config; list used, resolved and refused keys",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("config", help="zeroshard/DeepSpeed JSON config")
    p.add_argument("--world-size", type=int, default=1, help="for batch-size derivation")
    p.add_argument("--hidden-size", type=int, help='to resolve "auto" bucket sizes')
    p.set_defaults(handler=handle)
    return p


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict) and node:
        out = []
        for k, v in node.items():
            out += _leaves(v, f"{prefix}.{k}" if prefix else k)
        return out
    return [(prefix, node)]


def _key_of(problem: str) -> str | None:
    m = re.search(r"`([A-Za-z0-9_.\[\]]+)`", problem) or re.match(r"([A-Za-z0-9_.]+):", problem)
    return m.group(1) if m else None


def classify(raw: dict, problems: list[str], cfg: Any, hidden: int | None) -> list[tuple[str, ...]]:
    """(verdict, key, value, why) per leaf key, refused problems without a key at the end."""
    refused: dict[str, list[str]] = {}
    loose: list[str] = []
    for prob in problems:
        key = _key_of(prob)
        (refused.setdefault(key, []) if key else loose).append(prob)
    rows = []
    for key, value in _leaves(raw):
        shown = json.dumps(value)
        hits = [p for k, p in refused.items() if k == key or key.startswith(k + ".")]
        if hits:
            rows.append(("refused", key, shown, "; ".join(p for ps in hits for p in ps)))
        elif key in NO_EFFECT:
            rows.append(("no effect", key, shown, NO_EFFECT[key]))
        elif cfg is not None and _unused_at_stage(key, cfg.zero_optimization.stage):
            why = _unused_at_stage(key, cfg.zero_optimization.stage)
            rows.append(("no effect", key, shown, why))
        elif value == "auto":
            rows.append(("resolved", key, shown, _auto(key, cfg, hidden)))
        else:
            rows.append(("used", key, shown, ""))
    matched = {k for k in refused if any(k == key or key.startswith(k + ".") for key, _ in
                                         _leaves(raw))}  # fmt: skip
    for k, ps in refused.items():
        if k not in matched:
            rows += [("refused", k, "", p) for p in ps]
    rows += [("refused", "-", "", p) for p in loose]
    return rows


def _unused_at_stage(key: str, stage: int) -> str:
    """Why `key` changes nothing at this stage ("" when it does)."""
    if stage < 3 and key.startswith("zero_optimization.stage3_"):
        return f"a stage-3 setting; this config trains at stage {stage}"
    if stage == 3 and key == "zero_optimization.reduce_bucket_size":
        return "stage 3 reduces gradients per unit; units are cut by allgather_bucket_size"
    return ""


def _auto(key: str, cfg: Any, hidden: int | None) -> str:
    if cfg is not None and key in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                   "gradient_accumulation_steps"):  # fmt: skip
        return (f"-> {getattr(cfg, key)} (train_batch_size = micro batch * accumulation steps "
                f"* world size {cfg.world_size})")  # fmt: skip
    if key in _AUTO_RULES:
        rule, fn = _AUTO_RULES[key]
        value = f"-> {fn(hidden)}" if hidden else "at initialize, from the model's hidden size"
        return f"{value} ({rule}, as the Hugging Face integration does)"
    return "resolved by zeroshard"


def handle(args: argparse.Namespace) -> int:
    import os

    from zeroshard.config.schema import ConfigError, load_config
    from zeroshard.prepare import check_supported

    problems: list[str] = []
    cfg = None
    # a regular file is read by load_config itself (duplicate keys, its error texts); a pipe
    # can be read once only
    stream = os.path.exists(args.config) and not os.path.isfile(args.config)
    source: Any = _read_once(args.config) if stream else args.config
    try:
        cfg = load_config(source, world_size=args.world_size)
        check_supported(cfg)
    except ConfigError as e:
        if not _readable_json(args.config) if isinstance(source, str) else False:
            raise CliError(str(e)) from None  # missing file / malformed JSON: nothing to list
        problems = e.problems
    if isinstance(source, str):
        with open(args.config, encoding="utf-8") as f:
            raw = json.load(f)
    else:
        raw = source
    rows = classify(raw, problems, cfg, args.hidden_size)
    width = max(len(r[1]) for r in rows) if rows else 0
    for verdict, key, value, why in rows:
        line = f"{verdict:<9}  {key:<{width}}  {value}"
        print(f"{line}  {why}".rstrip() if why else line.rstrip())
    n_ref = sum(r[0] == "refused" for r in rows)
    status = "usable" if not n_ref else f"NOT usable: {n_ref} refused"
    print(f"{args.config}: {status} (world size {args.world_size})")
    return 1 if n_ref else 0


def _readable_json(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
        return True
    except (OSError, ValueError):
        return False


def _read_once(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise CliError(f"invalid zeroshard config: cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise CliError(f"invalid zeroshard config: malformed JSON in {path}: {e}") from None
