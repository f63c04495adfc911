"""Receive-slot bookkeeping of ``cuda_ipc`` push mode, on each side of the mailbox. No CUDA here.

``ServerGrants`` decides which client slot a reply may be written into; ``ClientBook`` tracks what the
client has offered and what the server has granted. The protocol (see ``cuda_ipc_mailbox``)::

    client: publish gen g (offers=1) --> server: pick -> grant (grants=offers) --> reply names (r, g)
    client: views of r gone, GPU done -> offers += 1 --> r is free for the server again

    slot state on the client:  OFFERED --grant (reply)--> LEASED --last view freed--> OFFERED
                               OFFERED --retire (reply)--> HELD --reallocate--> OFFERED (gen g+1)

A server that finds no free slot big enough falls back to its own slots (the pack path) and tells the
client how many bytes it wanted; when every slot is published and none fits, it hands the smallest free
one back ("retire") so the client can regrow it. Nothing in this module blocks or allocates GPU memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from zmqdisagg.errors import ProtocolMismatch
from zmqdisagg.transports.cuda_ipc_mailbox import MASK, Descriptor, Mailbox

logger = logging.getLogger(__name__)

PUSH, RETIRE = "push", "retire"


@dataclass(frozen=True, slots=True)
class Pick:
    """The server's decision for one reply: write into slot ``r`` (push) or give it back (retire)."""

    kind: str
    r: int
    desc: Descriptor


class ServerGrants:
    """Server side: the client's published slots, and how often each generation was granted."""

    def __init__(self, box: Mailbox) -> None:
        self.box = box
        self.known: dict[int, Descriptor] = {}
        self.grants: dict[int, int] = {}

    def state(self, r: int) -> tuple[Descriptor | None, bool]:
        """(descriptor, free) of slot r as published now; a new generation resets its grant count."""
        gen, offers = self.box.word(r)
        if gen == 0:
            return None, False
        d = self.known.get(r)
        if d is None or d.gen != gen:
            d = self.box.descriptor(r, gen)
            if d is None:  # torn or stale read of a descriptor being rewritten: skip it this time
                return None, False
            self.known[r], self.grants[r] = d, 0
        return d, (offers - self.grants[r]) & MASK == 1

    def pick(self, nbytes: int) -> Pick | None:
        """Grant the smallest free slot of at least ``nbytes``; else retire the smallest free one when
        every slot is published (so the client can regrow it); else None (use the pack path)."""
        best = small = None
        published = 0
        for r in range(self.box.nslots):
            d, free = self.state(r)
            published += d is not None
            if not free:
                continue
            if d.size >= nbytes and (best is None or d.size < best[1].size):
                best = (r, d)
            if small is None or d.size < small[1].size:
                small = (r, d)
        if best is not None:
            return self._grant(PUSH, *best)
        if small is not None and published == self.box.nslots:
            return self._grant(RETIRE, *small)
        return None

    def _grant(self, kind: str, r: int, d: Descriptor) -> Pick:
        self.grants[r] += 1
        return Pick(kind=kind, r=r, desc=d)

    def ungrant(self, r: int) -> None:
        """Undo a grant whose reply was never sent (the pack fallback failed after a retire)."""
        self.grants[r] -= 1

    def free_count(self) -> int:
        return sum(self.state(r)[1] for r in range(self.box.nslots))


@dataclass(slots=True)
class _Rec:
    gen: int
    size: int
    offers: int = 1
    received: int = 0


class ClientBook:
    """Client side: per slot, its generation and size, offers published and grants received."""

    def __init__(self, box: Mailbox) -> None:
        self.box = box
        self.recs: dict[int, _Rec] = {}
        self._gen = 0

    def add(self, r: int, size: int, handle: bytes) -> int:
        """Publish a new generation of slot r (which the client holds) and offer it once."""
        rec = self.recs.get(r)
        if rec is not None and rec.offers != rec.received:
            raise ProtocolMismatch(f"receive slot {r} is still offered to the server; it cannot be replaced")
        self._gen = self._gen % MASK + 1
        self.recs[r] = _Rec(gen=self._gen, size=size)
        self.box.publish(r, Descriptor(gen=self._gen, size=size, handle=handle))
        return self._gen

    def granted(self, r: int, gen: int) -> _Rec:
        """The server named (r, gen) in a reply: it must be ours, current and offered, not yet granted."""
        rec = self.recs.get(r)
        if rec is None or rec.gen != gen or (rec.offers - rec.received) & MASK != 1:
            raise ProtocolMismatch(f"cuda_ipc reply names receive slot {r} gen {gen}, which the client did "
                                   f"not offer ({rec}); reconnect, or set ZMQDISAGG_CUDA_IPC_PUSH=0")
        rec.received += 1
        return rec

    def offer(self, r: int, gen: int) -> bool:
        """Hand slot r back to the server; False (nothing done) if r has since been replaced."""
        rec = self.recs.get(r)
        if rec is None or rec.gen != gen or rec.offers != rec.received:
            return False
        rec.offers += 1
        self.box.set_word(r, rec.gen, rec.offers)
        return True

    def forget(self, r: int) -> None:
        """Drop a held slot (after a retire, before reallocating it)."""
        rec = self.recs.pop(r, None)
        if rec is not None and rec.offers != rec.received:
            raise ProtocolMismatch(f"receive slot {r} is offered to the server; it cannot be dropped")

    def offered(self) -> list[int]:
        return sorted(r for r, rec in self.recs.items() if rec.offers != rec.received)

    def fitting(self, nbytes: int) -> int:
        return sum(rec.size >= nbytes for rec in self.recs.values())

    def unused(self) -> int | None:
        return next((r for r in range(self.box.nslots) if r not in self.recs), None)
