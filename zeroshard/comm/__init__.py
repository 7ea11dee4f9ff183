"""Collectives: what every stage sends, behind one small protocol.

- collectives.py: `Collectives` (the protocol: all_gather, reduce_scatter, all_reduce,
  broadcast, each with a codec hook), `Comm` (torch.distributed, counting every byte sent);
- inflight.py: `InFlight`, the bounded queue of asynchronous reductions.
"""

from zeroshard.comm.collectives import Collectives, Comm, CommCounter, wait_all

__all__ = ["Collectives", "Comm", "CommCounter", "wait_all"]
