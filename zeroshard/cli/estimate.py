"""`zeroshard estimate`: bytes per rank for stages 0-3 before buying (or booking) the GPUs.

The model is built on the meta device (no weights, no memory): from a parameter count, a
Hugging Face `config.json` or a factory `pkg.mod:callable`. The numbers are zeroshard's own
layout plan (zeroshard/estimate/model_states.py), checked against `memory_report()` by the tests.
"""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

import torch
from torch import nn

from zeroshard.cli.common import CliError, human, parse_bytes, parse_count

EPILOG = """examples:
  zeroshard estimate --params 7e9 --world-size 8 --precision fp16 --optimizer adam
  zeroshard estimate --hf-config path/to/config.json --nodes 2 --gpus-per-node 8 \\
      --precision bf16 --config configs/zero3_bf16.json --device-memory 80GB
  zeroshard estimate --model mypkg.models:build_model --world-size 4 --json
  zeroshard estimate --params 7e9 --world-size 8 --precision bf16 --optimizer adamw8bit

Bytes are decimal (1 GB = 1e9 B). "model states" are what the optimizer holds between steps
(params, grads, fp32 master, optimizer states; communication buffers are 0 between steps);
with offload in the config, a `host` column says how much of it lives in host memory;
stage 3 adds the full parameters gathered at the peak of forward/backward. That peak and the
bytes sent come from running the stage-3 engine on the meta device over an example input:
for --hf-config, 8 token ids; for --model, what --example-input (or a callable named
`example_input` next to the factory) returns for the meta model: a tensor, a tuple of
positional arguments or a dict of keyword arguments. Without one, the engine runs on an input
synthesized from the model's first layer (token ids for an embedding, features for a linear
layer, images for a convolution) and a note says which; when the forward takes none of those,
on every module called once in registration order (low for modules called several times per
forward), and a note says so."""

CATS = ("params", "grads", "master", "optimizer_states", "comm_buffers")


def add_parser(sub: Any, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help="bytes per rank and per step for ZeRO stages 0-3",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--params", help="trainable parameter count (7e9, 7B, 350M)")
    src.add_argument("--hf-config", metavar="PATH",
                     help="a Hugging Face config.json (or its folder); needs transformers")
    src.add_argument("--model", metavar="PKG.MOD:FACTORY",
                     help="a callable returning an nn.Module (built on the meta device)")
    p.add_argument("--example-input", metavar="PKG.MOD:FN",
                   help="with --model: FN(model) returns the forward's input (default: "
                   "`example_input` in the factory's module, if there is one)")
    p.add_argument("--world-size", type=int, help="total ranks")
    p.add_argument("--nodes", type=int, default=1, help="nodes (with --gpus-per-node)")
    p.add_argument("--gpus-per-node", type=int, help="ranks per node")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="default: the config's, else fp32")
    p.add_argument("--optimizer", choices=("adamw", "adam", "sgd", "lion", "adamw8bit"),
                   help="default: the config's, else adamw")
    p.add_argument("--config", help="config for bucket/prefetch/persistence sizes")
    p.add_argument("--stage", type=int, action="append", choices=(0, 1, 2, 3),
                   help="only these stages (repeatable; default 0-3)")
    p.add_argument("--device-memory", help="memory per device, e.g. 80GB: says which stages fit")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=handle)
    return p


def _world(args: argparse.Namespace) -> int:
    if args.world_size is not None and args.gpus_per_node is not None:
        raise CliError("give --world-size or --nodes/--gpus-per-node, not both")
    world = args.world_size if args.world_size is not None else (
        args.nodes * args.gpus_per_node if args.gpus_per_node is not None else None
    )
    if world is None:
        raise CliError("give --world-size N (or --nodes and --gpus-per-node)")
    if world < 1:
        raise CliError(f"the world size must be >= 1, got {world}")
    return world


def _callable(spec: str, what: str) -> Any:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise CliError(f"{what} wants pkg.mod:callable, got {spec!r}")
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise CliError(f"cannot import {spec}: {e}") from None


HF_TOKENS = 8  # the example sequence length for a Hugging Face model (any length traces)


def build_model(args: argparse.Namespace) -> tuple[nn.Module, Any]:
    """The model on the meta device, from whichever source was given, and the input to
    trace its stage-3 schedule on (None if there is none)."""
    from zeroshard.estimate.model_states import Numel

    if args.example_input is not None and args.model is None:
        raise CliError("--example-input goes with --model")
    if args.params is not None:
        return Numel(parse_count(args.params)), None
    if args.hf_config is not None:
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError:
            raise CliError("--hf-config needs transformers (pip install transformers)") from None
        try:
            cfg = AutoConfig.from_pretrained(args.hf_config)
        except (OSError, ValueError) as e:
            raise CliError(f"cannot read Hugging Face config {args.hf_config}: {e}") from None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        tokens = min(HF_TOKENS, getattr(cfg, "max_position_embeddings", None) or HF_TOKENS)
        return model, {"input_ids": torch.zeros(1, tokens, dtype=torch.long, device="meta")}
    factory = _callable(args.model, "--model")
    with torch.device("meta"):
        model = factory()
    if not isinstance(model, nn.Module):
        raise CliError(f"{args.model} returned {type(model).__name__}, not an nn.Module")
    if args.example_input is not None:
        make_input = _callable(args.example_input, "--example-input")
    else:
        make_input = getattr(importlib.import_module(args.model.partition(":")[0]),
                             "example_input", None)  # fmt: skip
    if not callable(make_input):
        return model, None
    try:
        with torch.device("meta"):
            return model, make_input(model)
    except Exception as e:  # noqa: BLE001 - the user's code: one line, not a traceback
        raise CliError(f"the example input ({make_input.__module__}."
                       f"{make_input.__qualname__}) failed: {type(e).__name__}: {e}") from None


def _fp32_adamw(args: argparse.Namespace, model: nn.Module, world: int, memory: int | None,
                example: Any) -> list[Any]:  # fmt: skip
    """The estimate with fp32 AdamW states when the run uses 8-bit ones, else []."""
    from zeroshard.estimate.model_states import estimate, zero_config

    rule = args.optimizer or zero_config(args.config, stage=0, world_size=world,
                                         precision=args.precision).optimizer_spec()[0]
    if rule != "adamw8bit":
        return []
    return estimate(
        model, world_size=world, config=args.config, precision=args.precision,
        optimizer="adamw", stages=tuple(sorted(set(args.stage or (0, 1, 2, 3)))),
        device_memory=memory, example_input=example,
    )  # fmt: skip


def handle(args: argparse.Namespace) -> int:
    from zeroshard.config.schema import ConfigError
    from zeroshard.estimate.model_states import as_dict, estimate

    world = _world(args)
    memory = parse_bytes(args.device_memory) if args.device_memory else None
    model, example = build_model(args)
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    try:
        ests = estimate(
            model, world_size=world, config=args.config, precision=args.precision,
            optimizer=args.optimizer, stages=tuple(sorted(set(args.stage or (0, 1, 2, 3)))),
            device_memory=memory, example_input=example, local_world_size=args.gpus_per_node,
        )  # fmt: skip
        # 8-bit states: the same run with fp32 AdamW states, to show what they save
        base = _fp32_adamw(args, model, world, memory, example)
    except ConfigError as e:
        raise CliError(str(e)) from None
    if args.json:
        for e in ests + base:
            e.per_rank = []  # the worst rank is in `bytes`
        body = {"world_size": world, "trainable_params": numel, "device_memory": memory,
                "stages": as_dict(ests)}  # fmt: skip
        if base:
            body["fp32_adamw_stages"] = as_dict(base)
        print(json.dumps(body, indent=2))
        return 0
    print(f"{numel:,} trainable parameters on {world} rank(s); bytes per rank (worst rank):")
    offload = any(e.bytes["host"] for e in ests)  # then the device and host columns differ
    totals = ["device total", "host"] if offload else ["total"]
    nodes = args.gpus_per_node is not None and args.gpus_per_node < world  # several nodes
    head = ["stage", *CATS, "gathered peak", *totals, "sent/step",
            *(["inter-node/step"] if nodes else [])]  # fmt: skip
    if memory is not None:
        head.append(f"fits {human(memory)}")
    rows = [head]
    for e in ests:
        host = [human(e.bytes["host"])] if offload else []
        row = [str(e.stage), *(human(e.bytes[c]) for c in CATS), human(e.gathered_peak),
               human(e.peak_total), *host, human(e.comm_bytes),
               *([human(e.comm_inter_node)] if nodes else [])]  # fmt: skip
        if memory is not None:
            row.append("yes" if e.fits else "no")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    for e, b in zip(ests, base):
        saved = b.peak_total - e.peak_total
        print(f"stage {e.stage}: 8-bit states {human(e.bytes['optimizer_states'])} vs fp32 "
              f"AdamW {human(b.bytes['optimizer_states'])}; total {human(e.peak_total)} vs "
              f"{human(b.peak_total)} ({human(saved)} less per rank)")
    for e in ests:
        if e.hpz_secondary:
            print(f"stage {e.stage}: hpZ's secondary shards take {human(e.hpz_secondary)} from "
                  "forward to the update (in the total)")
    if nodes:
        print(f"inter-node/step: what a rank sends to the other nodes' ranks ({args.gpus_per_node} "
              "ranks per node); ZeRO++ keys in --config (zero_quantized_weights, "
              "zero_quantized_gradients, zero_hpz_partition_size) cut it at stage 3")
    if offload:
        print("offload: each category counts device and host bytes; `device total` is what "
              "stays on the device (with the gathered peak), `host` what moved to host memory")
    if args.params is not None and any(e.stage == 3 for e in ests):
        print("stage 3 gathered peak needs the model's layers: use --hf-config or --model")
    else:
        note = _schedule_note(next((e.schedule for e in ests if e.stage == 3), None))
        if note:
            print(note)
    return 0


def _schedule_note(schedule: str | None) -> str | None:
    """What to tell the user about how stage 3's schedule was found (None: their input)."""
    from zeroshard.estimate.stage3 import REGISTRATION, SYNTHESIZED, TRACED

    if schedule is None or schedule == TRACED:
        return None
    if schedule.startswith(SYNTHESIZED):
        return (f"note: no example input: stage 3 gathered peak and sent/step traced on "
                f"{schedule.removeprefix(SYNTHESIZED)}; give --example-input if the forward "
                f"takes something else")  # fmt: skip
    return (f"note: stage 3 gathered peak and sent/step from the engine run on module "
            f"registration order ({schedule.removeprefix(REGISTRATION)}); they run low if a "
            f"module runs several times per forward")  # fmt: skip
