"""What `estimate/stage3.py` runs the stage-3 engine on when it was given no example input.

The engine itself always runs (on the meta device, as in the traced path); only its input,
or failing that the call order, is made up here. No prefetch, reuse or coalescing rule is
restated: a copy of the engine's rules drifted from them (it missed coalesced gathers and
the reuse of a block called several times, 2.4x low on such a model).

1. `input_candidates`: the inputs the model's forward is tried on, made from its first
   input layer in registration order (token ids for an `nn.Embedding`, features for an
   `nn.Linear`, images for a convolution, a sequence for an RNN). The first one the forward
   accepts is traced like a given example input. Which parameters a forward uses, and in
   which order, does not depend on the batch or sequence length, so the model's own forward
   is what the engine sees: modules called several times, parameters used outside their
   owner, activation checkpointing, all exact.
2. `RegistrationOrder`, when no candidate runs (several required arguments, an input layer of
   another kind, a forward that cannot run on meta): a stand-in module tree with the model's
   parameters under the same module paths, whose forward calls every module once in
   registration order, each using its own parameters. The engine's hooks run on it as on
   the model; only the call order is assumed, so a module called several times per forward,
   or a parameter used outside its owner, makes the peak come out low.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

SEQ = 8  # steps of a synthesized sequence: any length gathers the same parameters
SIDES = (32, 224, 28)  # image sides tried for a convolutional first layer (CIFAR, ImageNet, MNIST)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def takes_one_input(model: nn.Module) -> bool:
    """Whether `model(x)` can be called: at most one required argument, a positional one."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C forward: try it
        return True
    required = [p for p in params if p.default is p.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]  # fmt: skip
    positional = any(p.kind in _POSITIONAL or p.kind is p.VAR_POSITIONAL for p in params)
    return positional and len(required) <= 1 and all(p.kind in _POSITIONAL for p in required)


def _layer_inputs(m: nn.Module) -> tuple[str, list[Tensor]] | None:
    """(kind, inputs) that layer `m` takes as the model's first layer, or None."""
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return "token ids", [torch.zeros(1, SEQ, dtype=torch.long),
                             torch.zeros(1, 1, dtype=torch.long)]  # fmt: skip
    if isinstance(m, nn.Linear):
        return "features", [torch.zeros(1, m.in_features), torch.zeros(1, SEQ, m.in_features)]
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        dims = len(m.kernel_size)
        return "images", [torch.zeros(1, m.in_channels, *(s,) * dims) for s in SIDES]
    if isinstance(m, nn.RNNBase):
        shape = (1, SEQ, m.input_size) if m.batch_first else (SEQ, 1, m.input_size)
        return "sequence", [torch.zeros(shape)]
    return None


def input_candidates(model: nn.Module) -> list[tuple[str, Tensor]]:
    """(label, input) pairs to try, best guess first: from the first layer of each known kind
    (embedding, linear, convolution, RNN) in registration order. Empty when the forward
    wants more than one argument."""
    if not takes_one_input(model):
        return []
    out: list[tuple[str, Tensor]] = []
    kinds: set[str] = set()
    for m in model.modules():
        found = _layer_inputs(m)
        if found is None or found[0] in kinds:
            continue
        kinds.add(found[0])
        out += [(f"{found[0]} of shape {tuple(x.shape)} for {type(m).__name__}", x)
                for x in found[1]]  # fmt: skip
    return out


class RegistrationOrder(nn.Module):
    """A stand-in for `module`: its parameters under the same names and its children as
    stand-ins, so module paths (and the units each module gathers) are the model's. Its
    forward calls each child once, in registration order, on the running value and adds a
    sum of each of its own floating parameters: every module's hooks run once per forward,
    and autograd reaches every parameter in reverse order, as backward would."""

    def __init__(self, module: nn.Module, memo: dict[int, RegistrationOrder] | None = None
                 ) -> None:  # fmt: skip
        super().__init__()
        memo = {} if memo is None else memo
        memo[id(module)] = self
        for name, p in module.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, child in module.named_children():
            # a module registered twice stays one module (called twice, as the model would)
            self.add_module(name, memo[id(child)] if id(child) in memo
                            else RegistrationOrder(child, memo))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        for child in self.children():
            x = child(x)
        for p in self.parameters(recurse=False):
            if p.dtype.is_floating_point:  # a metadata read: no torch function runs
                x = x + p.sum()
        return x


def stand_in_input(dtype: torch.dtype) -> Tensor:
    """What `RegistrationOrder` runs on: a scalar of the compute dtype."""
    return torch.zeros((), dtype=dtype)


__all__ = ["RegistrationOrder", "input_candidates", "stand_in_input", "takes_one_input"]
