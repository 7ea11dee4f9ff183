"""`model.state_dict()` / `load_state_dict()` on a stage-3 model: full tensors, never shards.

Between uses a stage-3 parameter is an empty placeholder; a plain `state_dict()` would save
those (or shards) without a word. A hook on every module with parameters gathers that
module's units while its entries are written, so the dict holds full tensors (one unit's
worth of extra memory at a time). Every rank must call it (it is collective). With
`rank0_only=True` ranks other than 0 get an empty dict (FSDP's FULL_STATE_DICT convention);
`full_state_dict(model, rank0_only=...)` is the explicit consolidation call.

Loading gathers each module's units before torch copies the full tensors in; once the whole
dict is in, every rank writes its chunks back into its shards (and the fp32 master of a
bf16/fp16 run follows) and the full tensors are freed. Loading therefore holds the full model
for a moment; saving holds one module's parameters at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from zeroshard.stage3 import registry

if TYPE_CHECKING:
    from zeroshard.stage3.engine import Stage3Engine


def install_state_dict_hooks(model: nn.Module, engine: Stage3Engine, rank0_only: bool) -> None:
    engine.state_dict_rank0_only = rank0_only
    for module in model.modules():
        units = engine.module_units.get(module)
        if not units:
            continue
        module._register_state_dict_hook(_make_save_hook(engine, module))
        module._register_load_state_dict_pre_hook(_make_load_pre_hook(engine, module))
        module.register_load_state_dict_post_hook(_make_load_post_hook(engine, module))


def _make_save_hook(engine: Stage3Engine, module: nn.Module):
    def hook(mod: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any):
        units = engine.module_units[module]
        keep = not engine.state_dict_rank0_only or engine.comm.rank == 0
        for u in units:
            u.gather(exact=True)  # never qwZ's quantized copy
            u.wait()
        try:
            for name, p in module.named_parameters(recurse=False):
                key = prefix + name
                if key not in state_dict:
                    continue
                if keep:
                    state_dict[key] = p.detach().clone()
                else:
                    del state_dict[key]
        finally:
            for u in units:
                u.release_if_unused()
        if not keep:  # rank0_only: this rank keeps no buffers either
            for name, _ in module.named_buffers(recurse=False):
                state_dict.pop(prefix + name, None)
        return None

    return hook


def _make_load_pre_hook(engine: Stage3Engine, module: nn.Module):
    def hook(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for u in engine.module_units[module]:
            u.gather(exact=True)  # params the state dict lacks are written back as they were
            u.wait()
            u.acquire()

    return hook


def _make_load_post_hook(engine: Stage3Engine, module: nn.Module):
    def hook(mod: nn.Module, incompatible_keys: Any) -> None:
        for u in engine.module_units[module]:
            u.write_back()
            u.notify_rewritten()
            u.drop_use()
            u.release_if_unused()

    return hook


def full_state_dict(model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Consolidated full-tensor state dict of a stage-3 model (collective: call on every
    rank). With `rank0_only`, ranks other than 0 get `{}`."""
    engine = registry.engine_of(model)
    if engine is None:
        return model.state_dict()
    before = engine.state_dict_rank0_only
    engine.state_dict_rank0_only = rank0_only
    try:
        sd = model.state_dict()
    finally:
        engine.state_dict_rank0_only = before
    if rank0_only and engine.comm.rank != 0:
        return {}
    return tie_aliases(model, sd)


def tie_aliases(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A parameter reachable under several names (tied embeddings) is gathered under each;
    make every alias the first name's tensor, so writers (save_pretrained, safetensors,
    torch.save) see one shared tensor and store it once, as for an unsharded model."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(p), name)
        if owner != name and owner in sd and name in sd:
            sd[name] = sd[owner]
    return sd
