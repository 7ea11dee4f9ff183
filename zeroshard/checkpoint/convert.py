"""Optimizer states across state codecs on load (`load_checkpoint` calls this).

fp32 AdamW (rule "adamw") and AdamW8bit (rule "adamw8bit") keep the same two moments,
`exp_avg` and `exp_avg_sq`, and take the same step; only how the moments are stored differs.
So a checkpoint of one loads into the other, at any world size and stage. For each parameter
piece this rank loads, the checkpoint's stored form (fp32, or 8-bit with the block size of
the param group that saved it) is compared with the destination's (its param group's codec,
`quant8.codec.group_codec`):

- the same form moves as it is (8-bit codes and absmax included: no requantization);
- fp32 -> 8-bit: read into scratch, then quantized with the destination group's block size.
  An 8-bit piece starts on one of its parameter's blocks, so this is exactly the whole
  parameter's quantization, cut to the piece;
- 8-bit -> fp32: codes and the absmax of the saved blocks the piece touches are read, then
  dequantized (the piece may start anywhere inside a saved block);
- 8-bit -> 8-bit of another block size (or a parameter that crosses `min_8bit_size`):
  dequantized, then quantized with the destination's block size.

Conversions run after every read succeeded, inside the load's undo. Anything else that
differs (SGD momentum into AdamW, AdamW's amsgrad state into AdamW8bit, another codec) is
refused naming the states and both rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from zeroshard.checkpoint import optimizer_view as L
from zeroshard.quant8.codec import CODEC_KEYS, Blockwise8bit, group_codec, stored_block
from zeroshard.quant8.format import dequantize_span, num_blocks, quantize_blockwise

#: Rules whose states convert into each other: the same moments, the same update.
CONVERTIBLE = ("adamw", "adamw8bit")
MOMENTS = ("exp_avg", "exp_avg_sq")
_SIGNED = {"exp_avg": True, "exp_avg_sq": False}  # the dynamic map each moment uses
_STORED = {f"{m}_{part}": m for m in MOMENTS for part in ("codes", "absmax")}
_KNOWN = (None, Blockwise8bit.name)  # fp32 states, blockwise 8-bit states


def logical_names(names: Any) -> list[str]:
    """The states behind stored names: 8-bit codes and absmax count as their moment."""
    return sorted({_STORED.get(n, n) for n in names})


def saved_codec(body: Mapping[str, Any], group: int) -> dict[str, Any] | None:
    """The codec param group `group` of the checkpoint stored its states with (None: fp32):
    the manifest's `state_codec`, with the group's own block_size / min_8bit_size."""
    sc = body.get("state_codec")
    if sc is None or sc.get("name") != Blockwise8bit.name:
        return sc
    groups = body["param_groups"]
    hyper = groups[group] if 0 <= group < len(groups) else {}
    return {**sc, **{k: hyper[k] for k in CODEC_KEYS if k in hyper}}


def dest_codec(opt: Any, group: int) -> dict[str, Any] | None:
    """The codec param group `group` of this run stores its states with (None: fp32)."""
    config = getattr(group_codec(opt.codec, opt.param_groups[group]), "config", None)
    return config() if config is not None else None


def needed(body: Mapping[str, Any], opt: Any) -> bool:
    """True when some state must be converted: another rule or another codec somewhere."""
    if body.get("rule") != opt.rule:
        return True
    return any(saved_codec(body, g) != dest_codec(opt, g) for g in range(len(opt.param_groups)))


def _dest_names(opt: Any) -> list[str]:
    n = len(L.layout(opt).groups)
    return logical_names({k for i in range(n) for k in L.shard_state(opt, i).state_names()})


def problems(body: Mapping[str, Any], opt: Any) -> list[str]:
    """Why the checkpoint's optimizer states cannot load into `opt` (empty: they can, maybe
    converted)."""
    if not needed(body, opt):
        return []
    rule, mine = body["rule"], opt.rule
    theirs, ours = logical_names(body["state_names"]), _dest_names(opt)
    if rule != mine and not {rule, mine} <= set(CONVERTIBLE):
        only = [s for s in theirs if s not in ours] or theirs
        return [f"optimizer rule: checkpoint {rule!r}, this run {mine!r}: the checkpoint's "
                f"state(s) {only} have no counterpart in rule {mine!r} (which keeps {ours}); "
                f"states convert between rules {' and '.join(map(repr, CONVERTIBLE))} only"]
    out = []
    for g in range(min(len(opt.param_groups), len(body["param_groups"]))):
        a, b = saved_codec(body, g), dest_codec(opt, g)
        if a != b and not (_name(a) in _KNOWN and _name(b) in _KNOWN):
            out.append(f"param_groups[{g}] optimizer state codec: checkpoint {a}, this run {b} "
                       "(states convert between fp32 and blockwise8bit states only)")  # fmt: skip
        if rule != mine and body["param_groups"][g].get("maximize"):
            out.append(f"param_groups[{g}].maximize = true in the checkpoint (rule {rule!r}): "
                       f"rule {mine!r} does not maximize")  # fmt: skip
    extra, missing = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    if extra:
        out.append(f"optimizer state(s) {extra} of the checkpoint (rule {rule!r}) have no "
                   f"counterpart in this run (rule {mine!r}, states {ours})")  # fmt: skip
    if missing:
        out.append(f"this run (rule {mine!r}) keeps state(s) {missing} that the checkpoint "
                   f"(rule {rule!r}, states {theirs}) does not have")  # fmt: skip
    return out


def _name(config: Mapping[str, Any] | None) -> str | None:
    return None if config is None else config.get("name")


def restored_groups(body: Mapping[str, Any], opt: Any) -> list[dict[str, Any]]:
    """The saved hyperparameters to restore: all of them under the same rule; across rules
    only those this run's groups have (AdamW's amsgrad stays out of an AdamW8bit group)."""
    if body["rule"] == opt.rule:
        return list(body["param_groups"])
    return [{k: v for k, v in saved.items() if k in mine}
            for saved, mine in zip(body["param_groups"], opt.param_groups)]  # fmt: skip


@dataclass
class Convert:
    """One moment of one piece: read into scratch (`src`), converted into `dst` after all
    reads. `src`: (fp32 values,) or (codes, absmax of the saved blocks the piece touches);
    `dst`: (fp32 values,) or (codes, absmax), the live stored tensors."""

    moment: str
    src: tuple[Tensor, ...]
    src_block: int  # 0: fp32
    first: int  # where the piece starts inside its first saved block
    dst: tuple[Tensor, ...]
    dst_block: int  # 0: fp32

    @torch.no_grad()
    def run(self) -> None:
        signed = _SIGNED[self.moment]
        if self.src_block:
            values = dequantize_span(*self.src, signed, self.src_block, self.first)
        else:
            values = self.src[0]
        if self.dst_block:
            codes, absmax = quantize_blockwise(values, signed, self.dst_block)
            self.dst[0].copy_(codes)
            self.dst[1].copy_(absmax)
        else:
            self.dst[0].copy_(values)


class Planner:
    """Plans the state reads of each piece this rank loads, converting where forms differ."""

    def __init__(self, body: Mapping[str, Any], opt: Any) -> None:
        self.body = body
        # the group that saved each parameter (manifests before per-group codecs: this run's)
        self.saved_group = {p["name"]: p["group"] for p in body["params"]
                            if p.get("group") is not None}  # fmt: skip
        self.opt = opt

    def piece(self, index: Any, name: str, group: int, numel: int, start: int,
              dst: dict[str, tuple[Tensor, int]]) -> tuple[list[Any], list[Convert]]:  # fmt: skip
        """(reads, conversions) filling `dst` (this run's stored tensors of the piece of
        parameter `name` (`numel` elements) that starts at element `start`, as (1-D view,
        elements per entry)) from the checkpoint."""
        codec = saved_codec(self.body, self.saved_group.get(name, group))
        src_block = stored_block(codec, numel)
        dst_block = next((per for k, (_, per) in dst.items() if k.endswith("_absmax")), 0)
        reads: list[Any] = []
        if src_block == dst_block:  # the same stored form: moved as it is
            for sname, (t, per) in sorted(dst.items()):
                reads += index.reads("master", f"state.{sname}", name, start, t, per)
            return reads, []
        n = next(t.numel() for k, (t, per) in dst.items() if per == 1)
        converts = []
        for m in MOMENTS:
            if src_block:
                codes = torch.empty(n, dtype=torch.uint8)
                lo = start // src_block
                absmax = torch.empty(num_blocks(start + n, src_block) - lo, dtype=torch.float32)
                reads += index.reads("master", f"state.{m}_codes", name, start, codes)
                reads += index.reads("master", f"state.{m}_absmax", name, start, absmax,
                                     src_block)  # fmt: skip
                src: tuple[Tensor, ...] = (codes, absmax)
            else:
                values = torch.empty(n, dtype=torch.float32)
                reads += index.reads("master", f"state.{m}", name, start, values)
                src = (values,)
            out = (dst[f"{m}_codes"][0], dst[f"{m}_absmax"][0]) if dst_block else (dst[m][0],)
            converts.append(Convert(m, src, src_block, start % src_block if src_block else 0,
                                    out, dst_block))  # fmt: skip
        return reads, converts
