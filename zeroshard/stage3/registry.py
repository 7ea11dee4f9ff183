"""Side tables from user objects to zeroshard's: which unit holds a parameter, which engine
runs a model. Nothing is set as an attribute on the user's modules or parameters; the tables
hold their keys weakly, so they never keep a model alive."""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

# The values are a `unit.ShardedUnit` and an `engine.Stage3Engine`; both modules register
# here, so this one imports neither (typed `Any`, no import circle).
ShardedUnit = Any
Stage3Engine = Any

# Keyed by id(param) (a tensor cannot key a WeakKeyDictionary: weakref equality falls back to
# the tensors' elementwise ==); a finalizer drops the entry when the parameter dies.
_UNITS: dict[int, ShardedUnit] = {}
# The model's hooks keep its engine alive; the table holds the engine weakly, or the engine
# (which holds the model) would keep the model alive from here.
_ENGINES: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


def unit_of(param: Any) -> ShardedUnit | None:
    """The stage-3 unit holding `param`'s shard, if any."""
    return _UNITS.get(id(param))


def set_unit(param: nn.Parameter, unit: ShardedUnit) -> None:
    if id(param) not in _UNITS:
        weakref.finalize(param, _UNITS.pop, id(param), None)
    _UNITS[id(param)] = unit


def clear_unit(param: Any) -> None:
    """Forget `param`'s unit (the estimator builds units on a meta model, then undoes them)."""
    _UNITS.pop(id(param), None)


def engine_of(model: nn.Module) -> Stage3Engine | None:
    """The stage-3 engine running `model`, if it is a stage-3 model."""
    ref = _ENGINES.get(model)
    return ref() if ref is not None else None


def set_engine(model: nn.Module, engine: Stage3Engine) -> None:
    _ENGINES[model] = weakref.ref(engine)
