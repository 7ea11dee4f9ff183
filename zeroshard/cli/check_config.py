"""`zeroshard check-config`: validate a config and say, key by key, what zeroshard does with it.

Each key of the file gets one line: `used`, `resolved` (an "auto" value and what it becomes),
`no effect` (accepted for DeepSpeed compatibility, changes nothing here, and why) or
`refused` (one line per problem, every problem at once). With `--hf` (automatic when a value
only a Trainer fills is "auto") the config is read as `ZeroShardTrainer` reads it: the lines
say which values the Trainer fills from `TrainingArguments`, and `from Trainer` lines list
the settings the config leaves out. Exit status 0 when usable, 1 when something is refused.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
from types import SimpleNamespace
from typing import Any

from zeroshard.cli.common import CliError

EPILOG = """examples:
  zeroshard check-config configs/zero3.json --world-size 8
  zeroshard check-config configs/zero3_zeropp.json --world-size 16 --local-world-size 8
  zeroshard check-config ds_config.json --world-size 16 --hidden-size 4096
  zeroshard check-config hf_ds_config_zero3.json --hf"""

# Accepted so DeepSpeed configs load unchanged, but nothing in zeroshard reads them.
NO_EFFECT = {
    "zero_optimization.contiguous_gradients":
        "gradients always live in contiguous flat buffers in zeroshard",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save":
        "zeroshard's model.state_dict() at stage 3 always returns full tensors",
    "zero_optimization.load_from_fp32_weights":
        "zeroshard always restores the fp32 master weights saved in its checkpoints",
    "zero_optimization.reduce_scatter": "gradients are always reduce-scattered",
    "zero_optimization.allgather_partitions": "updated partitions are always all-gathered",
}  # fmt: skip
ZEROPP_KEYS = frozenset(f"zero_optimization.{k}" for k in (
    "zero_quantized_weights", "zero_quantized_nontrainable_weights",
    "zero_quantized_gradients", "zero_hpz_partition_size"))  # fmt: skip
_PASSES = 8  # re-validations with the refused keys left out, to find every problem at once


def add_parser(sub: Any, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help="validate a config; list used, resolved and refused keys",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("config", help="zeroshard/DeepSpeed JSON config")
    p.add_argument("--world-size", type=int, default=1, help="for batch-size derivation")
    p.add_argument("--local-world-size", "--nproc-per-node", type=int, metavar="N",
                   help="ranks per node, for ZeRO++'s node rules (default: "
                        "$LOCAL_WORLD_SIZE if set, else the world size: one node, as the "
                        "runtime reads it)")  # fmt: skip
    p.add_argument("--hidden-size", type=int, help='to resolve "auto" bucket sizes')
    p.add_argument("--hf", action="store_true",
                   help="read it as ZeroShardTrainer does (automatic when a Trainer value is "
                        '"auto")')  # fmt: skip
    p.set_defaults(handler=handle)
    return p


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict) and node:
        out = []
        for k, v in node.items():
            out += _leaves(v, f"{prefix}.{k}" if prefix else k)
        return out
    return [(prefix, node)]


def _keys_of(problem: str) -> list[str]:
    """The key paths a problem names, in order (`a.b` in backticks, or a leading `a.b:`)."""
    found = re.findall(r"`([A-Za-z0-9_.\[\]]+)`", problem)
    if not found:
        found = re.findall(r"^([A-Za-z0-9_.]+):", problem)
    return [k.split("[")[0] for k in found]


def _key_of(problem: str, present: Any = None) -> str | None:
    """The key a problem belongs to: the first it names that is in `present` (any if None)."""
    keys = _keys_of(problem)
    if present is not None:
        for k in keys:
            if any(p == k or p.startswith(k + ".") for p in present):
                return k
    return keys[0] if keys else None


def _drop(data: dict, key: str) -> bool:
    """Remove `key` (a dotted path) from `data`; False when it is not there."""
    *parents, leaf = key.split(".")
    node: Any = data
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict) and leaf in node:
        del node[leaf]
        return True
    return False


def find_problems(data: dict, world_size: int,
                  local_world_size: int | None = None) -> tuple[list[str], Any]:  # fmt: skip
    """Every problem the runtime would raise, one string each, and the config that loads
    once the refused keys are left out (None if it never does). pydantic stops before its
    cross-field checks while a field is invalid, so validation is repeated without them.
    `local_world_size` (ranks per node; None: one node) is what ZeRO++'s rules need."""
    from zeroshard.config.honoured import check_zeropp_topology
    from zeroshard.config.schema import ConfigError, load_config
    from zeroshard.prepare import check_supported

    problems: list[str] = []
    current = copy.deepcopy(data)
    cfg = None
    for _ in range(_PASSES):
        try:
            cfg = load_config(current, world_size=world_size)
            break
        except ConfigError as e:
            problems += [p for p in e.problems if p not in problems]
            dropped = [any(_drop(current, k) for k in _keys_of(p)) for p in e.problems]
            if not any(dropped):
                break
    if cfg is not None:
        try:
            check_supported(cfg)
        except ConfigError as e:
            problems += e.problems
        try:  # the very check the runtime makes at construction, on every rank
            check_zeropp_topology(cfg.zero_optimization, world_size,
                                  local_world_size or world_size)  # fmt: skip
        except ConfigError as e:
            problems += e.problems
    return problems, cfg


def _unused(key: str, cfg: Any) -> str:
    """Why `key` changes nothing in this config ("" when it does), as the runtime reads it."""
    stage = cfg.zero_optimization.stage
    if key in NO_EFFECT:
        return NO_EFFECT[key]
    if stage < 3 and key.startswith("zero_optimization.stage3_"):
        return f"a stage-3 setting; this config trains at stage {stage}"
    if stage < 3 and key in ZEROPP_KEYS:  # only off values get here: on is refused
        return f"ZeRO++ is a stage-3 option (off here); this config trains at stage {stage}"
    if stage == 0 and key == "zero_optimization.allgather_bucket_size":
        return "stage 0 shards nothing, so there is nothing to all-gather"
    if stage == 3 and key == "zero_optimization.allgather_bucket_size":
        return ("stage 3 bounds its gathers with stage3_prefetch_bucket_size and "
                "stage3_max_live_parameters; units are cut by reduce_bucket_size")
    if key.startswith(("zero_optimization.offload_optimizer.",
                       "zero_optimization.offload_param.")):  # fmt: skip
        return 'offload `device` "none" means no offload (what zeroshard does)'
    if key == "steps_per_print" and not cfg.wall_clock_breakdown:
        return ("the library prints only the wall_clock_breakdown line (off here) this often; "
                "scripts may read it (the demo prints its loss line)")
    for section in ("fp16", "bf16", "bfloat16"):
        if key.startswith(section + ".") and key != f"{section}.enabled":
            if not getattr(cfg, "bf16" if section == "bfloat16" else section).enabled:
                return f"{section} is not enabled"
    return ""


def _auto(key: str, cfg: Any, hidden: int | None) -> str:
    from zeroshard.config.honoured import BATCH_AUTOS, HIDDEN_SIZE_AUTOS

    if cfg is not None and key in BATCH_AUTOS:
        return (f"-> {getattr(cfg, key)} (train_batch_size = micro batch * accumulation steps "
                f"* world size {cfg.world_size})")  # fmt: skip
    rule, fn = HIDDEN_SIZE_AUTOS[key]
    value = f"-> {fn(hidden)}" if hidden else "at initialize, from the model's hidden size"
    return f"{value} ({rule}, as the Hugging Face integration does)"


def classify(raw: dict, problems: list[str], cfg: Any, hidden: int | None,
             trainer: dict[str, str]) -> list[tuple[str, ...]]:  # fmt: skip
    """(verdict, key, value, why) per leaf key; one `refused` row per problem; `trainer`
    maps the keys the Trainer fills to the argument they come from."""
    from zeroshard.integrations.hf_config import TEMPLATE_NOOPS

    leaves = dict(_leaves(raw))
    by_key: dict[str, list[str]] = {}
    for prob in problems:
        by_key.setdefault(_key_of(prob, leaves) or "-", []).append(prob)
    rows = []
    keys = set()
    for key, value in leaves.items():
        keys.add(key)
        shown = json.dumps(value)
        section = key.split(".")[0]
        hits = [p for k, ps in by_key.items() if k == key or key.startswith(k + ".") for p in ps]
        if hits:
            rows += [("refused", key, shown, p) for p in hits]
        elif trainer and section in ("fp16", "bf16") and key != f"{section}.enabled" and \
                leaves.get(f"{section}.enabled") == "auto":  # fmt: skip
            rows.append(("used", key, shown, f"when TrainingArguments.{section} is true"))
        elif key in trainer and value == "auto":
            rows.append(("resolved", key, shown, f"filled by the Trainer from {trainer[key]}"))
        elif key in trainer:
            rows.append(("used", key, shown, f"must equal {trainer[key]} under a Trainer"))
        elif trainer and key.split(".")[-1] in TEMPLATE_NOOPS:
            rows.append(("no effect", key, shown, "ZeroShardTrainer drops this DeepSpeed knob"))
        elif cfg is not None and _unused(key, cfg):
            rows.append(("no effect", key, shown, _unused(key, cfg)))
        elif value == "auto":
            rows.append(("resolved", key, shown, _auto(key, cfg, hidden)))
        else:
            rows.append(("used", key, shown, ""))
    for k, ps in by_key.items():
        if not any(k == key or key.startswith(k + ".") for key in keys):
            rows += [("refused", k, "", p) for p in ps]
    rows += [("from Trainer", k, "", f"left out of the config: {src}")
             for k, src in sorted(trainer.items()) if k not in keys]  # fmt: skip
    return rows


# TrainingArguments' defaults: placeholders so that the rest of an HF config can be checked
_HF_DEFAULTS = dict(
    per_device_train_batch_size=8, gradient_accumulation_steps=1, max_grad_norm=1.0,
    learning_rate=5e-5, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
    warmup_steps=0, warmup_ratio=0.0, fp16=False, bf16=False, optim="adamw_torch",
)  # fmt: skip


def _trainer_view(raw: dict, world_size: int) -> tuple[dict, dict[str, str]]:
    """The config as ZeroShardTrainer hands it to zeroshard (Trainer values filled with
    TrainingArguments' defaults), and key -> the argument each Trainer value comes from."""
    from zeroshard.config.honoured import TRAINER_AUTOS
    from zeroshard.integrations.hf_config import HfAutoConfig

    hf = HfAutoConfig(raw, fill_missing=True)
    hf.preview(SimpleNamespace(world_size=world_size, **_HF_DEFAULTS), num_training_steps=1000)
    data = hf.for_zeroshard()
    if "config" not in (hf.sources.get("train_micro_batch_size_per_gpu"),
                        hf.sources.get("gradient_accumulation_steps")):  # fmt: skip
        # a given train_batch_size is checked against the real TrainingArguments, not
        # against the placeholders above
        data.pop("train_batch_size", None)

    def source(key: str, src: str) -> str:
        if key not in TRAINER_AUTOS:
            return src
        name = TRAINER_AUTOS[key][0]
        return f"TrainingArguments.{name}" if name[0].isalpha() else f"{name}, as HF sets it"

    return data, {k: source(k, src) for k, src in hf.sources.items()}


def _wants_trainer(raw: dict) -> bool:
    from zeroshard.config.honoured import TRAINER_AUTOS

    leaves = dict(_leaves(raw))
    return any(leaves.get(k) == "auto" for k in TRAINER_AUTOS if k not in
               ("train_batch_size", "train_micro_batch_size_per_gpu",
                "gradient_accumulation_steps"))  # fmt: skip


def config_problems(path: str, world_size: int, local_world_size: int | None = None) -> list[str]:
    """Every problem of the config file at `path` for `world_size` ranks (`local_world_size`
    per node; None: one node), as check-config finds them (read as ZeroShardTrainer reads it
    when a Trainer value is "auto")."""
    raw = _read_once(path)
    if not isinstance(raw, dict):
        return [f"the top level must be a JSON object, got {type(raw).__name__}"]
    data = _trainer_view(raw, world_size)[0] if _wants_trainer(raw) else raw
    return find_problems(data, world_size, local_world_size)[0]


def node_size(given: int | None, world_size: int) -> int:
    """Ranks per node: `given`, else torchrun's LOCAL_WORLD_SIZE, else the whole world (one
    node), as the runtime reads it."""
    env = os.environ.get("LOCAL_WORLD_SIZE")
    where = "--local-world-size" if given is not None else "LOCAL_WORLD_SIZE"
    value: Any = given if given is not None else (env or world_size)
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise CliError(f"{where} must be a positive number of ranks per node, got {value!r}")
    return n


def handle(args: argparse.Namespace) -> int:
    from zeroshard.config.schema import ConfigError, load_config

    # a regular file is read by load_config itself (duplicate keys, its error texts); a pipe
    # can be read once only
    if os.path.exists(args.config) and not os.path.isfile(args.config):
        raw = _read_once(args.config)
    else:
        try:
            load_config(args.config, world_size=1)
        except ConfigError as e:
            if not readable_json(args.config):
                raise CliError(str(e)) from None  # missing file / malformed JSON: nothing to list
        raw = _read_once(args.config)
    if not isinstance(raw, dict):
        raise CliError(f"invalid zeroshard config: the top level of {args.config} must be a "
                       "JSON object")  # fmt: skip
    hf = args.hf or _wants_trainer(raw)
    data, trainer = _trainer_view(raw, args.world_size) if hf else (raw, {})
    local = node_size(args.local_world_size, args.world_size)
    problems, cfg = find_problems(data, args.world_size, local)
    rows = classify(raw, problems, cfg, args.hidden_size, trainer)
    width = max(len(r[1]) for r in rows) if rows else 0
    for verdict, key, value, why in rows:
        line = f"{verdict:<12}  {key:<{width}}  {value}"
        print(f"{line}  {why}".rstrip() if why else line.rstrip())
    n_ref = sum(r[0] == "refused" for r in rows)
    if n_ref:
        status = f"NOT usable: {n_ref} problem{'s' if n_ref > 1 else ''}"
    elif hf:
        n = sum(r[0] == "from Trainer" or r[3].startswith("filled by the Trainer") for r in rows)
        status = (f"usable with ZeroShardTrainer, which fills {n} values from "
                  "TrainingArguments")  # fmt: skip
    else:
        status = "usable"
    nodes = f", {local} per node" if local < args.world_size else ""
    print(f"{args.config}: {status} (world size {args.world_size}{nodes})")
    return 1 if n_ref else 0


def readable_json(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
        return True
    except (OSError, ValueError):
        return False


def _read_once(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise CliError(f"invalid zeroshard config: cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise CliError(f"invalid zeroshard config: malformed JSON in {path}: {e}") from None
