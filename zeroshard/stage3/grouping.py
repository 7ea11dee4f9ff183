"""Which parameters form one stage-3 unit, and which module's forward gathers each unit.

A unit is gathered, released and reduced as one, so its size trades memory for collectives:

- "module": every module's own parameters are a unit (the smallest gathered set; one
  all-gather and one reduce-scatter per module and pass, before coalescing);
- "block" (the default): a repeated child class (the `Block`s of a `ModuleList`, found
  automatically: the outermost modules whose class occurs at least twice among one parent's
  children) is one unit with everything under it, as FSDP2's per-block `fully_shard`;
  parameters outside every block keep one unit per module;
- a list of class names: modules of those classes (outermost) are units, the rest per module.

A unit is gathered by the smallest module that holds all its parameters (the block itself),
so it stays gathered for that module's whole forward; a module that registers a parameter of
a unit outside its own subtree (a tied weight) gathers that unit too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Union

from torch import nn

Grouping = Union[str, Sequence[str]]  # "block", "module", or class names


def unit_roots(model: nn.Module, grouping: Grouping) -> dict[nn.Module, str]:
    """The modules whose whole subtree is one unit (name by module); none for "module"."""
    if grouping == "module":
        return {}
    names = {m: n for n, m in model.named_modules()}
    roots: dict[nn.Module, str] = {}
    if grouping == "block":

        def visit(m: nn.Module) -> None:
            kids = [c for c in m.children() if any(True for _ in c.parameters())]
            repeated = {k for k, n in Counter(type(c) for c in kids).items() if n > 1}
            for c in m.children():
                if type(c) in repeated:
                    roots.setdefault(c, names[c])
                else:
                    visit(c)

        visit(model)
        return roots
    wanted = set(grouping)

    def pick(m: nn.Module) -> None:
        for c in m.children():
            if type(c).__name__ in wanted:
                roots.setdefault(c, names[c])
            else:
                pick(c)

    if type(model).__name__ in wanted:
        return {model: ""}
    pick(model)
    return roots


def unit_owner(model: nn.Module, roots: dict[nn.Module, str]) -> dict[nn.Module, nn.Module]:
    """Module -> the module whose unit takes its own parameters (its enclosing root, or
    itself)."""
    owner: dict[nn.Module, nn.Module] = {}

    def walk(m: nn.Module, root: nn.Module | None) -> None:
        if root is None and m in roots:
            root = m
        owner[m] = root if root is not None else m
        for c in m.children():
            walk(c, root)

    walk(model, None)
    return owner


def _path(name: str) -> tuple[str, ...]:
    return tuple(name.split(".")) if name else ()


def fetchers(model: nn.Module, units: Sequence[Any], param_units: dict[int, Any]
             ) -> dict[nn.Module, list[Any]]:  # fmt: skip
    """Module -> the units its forward gathers (see the module docstring)."""
    owner_path: dict[int, tuple[str, ...]] = {}
    by_path: dict[tuple[str, ...], nn.Module] = {}
    for name, m in model.named_modules():
        by_path[_path(name)] = m
        for p in m.parameters(recurse=False):
            owner_path.setdefault(id(p), _path(name))
    out: dict[nn.Module, list[Any]] = {m: [] for m in model.modules()}
    home: dict[int, tuple[str, ...]] = {}
    for u in units:
        paths = [owner_path[id(p)] for p in u.params if p is not None and id(p) in owner_path]
        if not paths:
            continue
        common = paths[0]
        for q in paths[1:]:
            k = 0
            while k < min(len(common), len(q)) and common[k] == q[k]:
                k += 1
            common = common[:k]
        home[id(u)] = common
        out[by_path[common]].append(u)
    for name, m in model.named_modules():
        path = _path(name)
        for p in m.parameters(recurse=False):
            u = param_units.get(id(p))
            if u is None or id(u) not in home or u in out[m]:
                continue
            if path[: len(home[id(u)])] != home[id(u)]:  # a tied weight of another subtree
                out[m].append(u)
    return out
