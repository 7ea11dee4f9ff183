"""Pending collectives: what `Comm` returns for work that completes on `wait()` (a result
taken out of a larger collective, summed from point-to-point messages, or decoded from its
wire form)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

WireCodec = Any  # collectives.WireCodec (imported there from here: no cycle)


class DoneWork:
    """Stands in for a `dist.Work` when there was nothing to communicate."""

    def wait(self) -> bool:
        return True


DONE = DoneWork()


class AllOf:
    """Several pending collectives standing for one."""

    def __init__(self, works: list[Any]) -> None:
        self.works = works

    def wait(self) -> bool:
        wait_all(self.works)
        return True


class ChunkOnWait:
    """A pending all-reduce standing for a reduce-scatter: `out` takes its chunk on wait."""

    def __init__(self, work: Any, chunk: Tensor, out: Tensor) -> None:
        self.work, self.chunk, self.out = work, chunk, out

    def wait(self) -> bool:
        if self.work is not None:
            self.work.wait()
            self.work = None
            self.out.copy_(self.chunk)
        return True


class SumOnWait:
    """A pending exchange standing for a reduce-scatter: on wait, `out` takes this rank's
    chunk combined with every peer's copy of it, in rank order (so the result does not
    depend on which message came first)."""

    def __init__(self, works: list[Any], own: Tensor, received: list[Tensor | None],
                 out: Tensor, op: str) -> None:  # fmt: skip
        self.works, self.own, self.received, self.out, self.op = works, own, received, out, op

    def wait(self) -> bool:
        if self.works:
            wait_all(self.works)
            terms = [self.own if t is None else t for t in self.received]
            combine = torch.maximum if self.op == "max" else torch.add
            if any(t is self.out for t in terms):  # a peer's chunk (one of the first two) is there
                acc, rest = self.out, [t for t in terms if t is not self.out]
            elif self.out.data_ptr() != self.own.data_ptr():  # out of place: input kept as it was
                acc, rest = self.out, terms[2:]
                combine(terms[0], terms[1], out=acc)
            elif any(t is self.own for t in terms[:2]):  # the first two commute exactly
                acc, rest = self.own, [t for t in terms if t is not self.own]
            else:
                acc, rest = terms[0], terms[1:]
            for t in rest:
                combine(acc, t, out=acc)
            if self.op == "avg":
                acc.div_(len(terms))
            if acc.data_ptr() != self.out.data_ptr():
                self.out.copy_(acc)
            self.received = []
        return True


class Decoded:
    """A pending collective whose received wire form is decoded into `out` on `wait()`."""

    def __init__(self, work: Any, codec: WireCodec, wire: Tensor, out: Tensor) -> None:
        self.work, self.codec, self.wire, self.out = work, codec, wire, out

    def wait(self) -> bool:
        if self.work is not None:
            self.work.wait()
            self.work = None
            self.codec.decode(self.wire, self.out)
        return True


class ChunkwiseDecode:
    """Decodes a gathered wire buffer rank by rank: each rank encoded its chunk alone (a
    blockwise codec's blocks and scales are per chunk)."""

    reducible = False

    def __init__(self, codec: WireCodec, chunks: int) -> None:
        self.codec, self.chunks = codec, chunks

    def encode(self, t: Tensor) -> Tensor:
        return self.codec.encode(t)

    def decode(self, wire: Tensor, out: Tensor) -> None:
        for w, o in zip(wire.chunk(self.chunks), out.reshape(-1).chunk(self.chunks)):
            self.codec.decode(w, o)


def wait_all(works: list) -> None:
    for w in works:
        if w is not None:
            w.wait()
    works.clear()
