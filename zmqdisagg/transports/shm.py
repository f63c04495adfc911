"""``shm``: same-host CPU transport through POSIX shared-memory slots.

Memory layout of one connection (server side)::

    /dev/shm/zmqdisagg-<server pid>-<conn>-<slot>-<gen>   mode 0600, one file per slot
    +----------+----------+-----+------------------------+
    | tensor 0 | tensor 1 | ... |  (unused tail)         |   each start aligned to 256 bytes
    +----------+----------+-----+------------------------+

Slot states: FREE --put--> BUSY --release/bye/lease expiry--> FREE. A slot that is too small for a
reply is replaced by one of the next power-of-two size (new name, new generation). The server owns and
unlinks every segment; the client only maps them, so a killed client leaves nothing behind, and a
killed server's segments are swept by the next server on the same host (``sweep_stale``).
Only the segment name, slot id, generation and tensor offsets travel on ZeroMQ.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from zmqdisagg.errors import ProtocolMismatch, ResourceExhausted, TransportUnavailable
from zmqdisagg.protocol.tensor_meta import TensorMeta, as_bytes, from_bytes, layout
from zmqdisagg.transports.base import Delivery, TransportContext

logger = logging.getLogger(__name__)

PREFIX = "zmqdisagg-"
MIN_SLOT_BYTES = 1 << 20
_NAME = re.compile(r"^zmqdisagg-(\d+)-[0-9a-zA-Z]+-\d+-\d+$")


@dataclass(kw_only=True, slots=True)
class _Segment:
    """One mapped shared-memory file and a writable byte view of it."""

    name: str
    size: int
    mm: mmap.mmap
    view: torch.Tensor

    @classmethod
    def open(cls, directory: str, name: str, size: int, create: bool) -> "_Segment":
        path = os.path.join(directory, name)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size < size:
                raise ProtocolMismatch(f"segment {name} is smaller than the {size} bytes announced")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name=name, size=size, mm=mm, view=torch.frombuffer(mm, dtype=torch.uint8))

    def close(self) -> None:
        self.view = None  # drop the exported buffer before unmapping
        try:
            self.mm.close()
        except (BufferError, ValueError):
            logger.warning("segment %s still has live views; leaving it mapped", self.name)


def sweep_stale(directory: str = "/dev/shm") -> int:
    """Unlink segments left by zmqdisagg servers that no longer run; return how many were removed."""
    removed = 0
    for entry in os.listdir(directory) if os.path.isdir(directory) else ():
        m = _NAME.match(entry)
        if m and not _pid_alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(directory, entry))
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShmTransport:
    """Server: owns a pool of segments for one connection. Client: maps and copies out of them."""

    name = "shm"

    def __init__(self, ctx: TransportContext) -> None:
        self.ctx = ctx
        self._tag = re.sub(r"[^0-9a-zA-Z]", "", ctx.connection_id)[:16] or secrets.token_hex(4)
        self._slots: dict[int, _Segment] = {}  # server: slot id -> segment; client: slot id -> mapping
        self._busy: set[int] = set()  # server: slots a client has not released yet
        self._gen = 0  # server: bumped for every new segment, so names never repeat
        self.closed = False

    @staticmethod
    def probe() -> str | None:
        return None if os.path.isdir("/dev/shm") else "no /dev/shm on this host"

    # -- server side -------------------------------------------------------------------------------
    def offer(self) -> dict[str, Any]:
        return {"dir": self.ctx.shm_dir}

    def put(self, tensors: Mapping[str, torch.Tensor]) -> Delivery:
        metas, total = layout(dict(tensors))
        slot = self._acquire(max(total, 1))
        seg = self._slots[slot]
        for meta, t in zip(metas, tensors.values()):
            seg.view[meta.offset:meta.offset + meta.nbytes].copy_(as_bytes(t.detach().cpu()))
        note = {"slot": slot, "segment": seg.name, "size": seg.size}
        return Delivery(note=note, metas=tuple(metas), slot=slot)

    def _acquire(self, nbytes: int) -> int:
        free = [s for s in self._slots if s not in self._busy]
        fitting = [s for s in free if self._slots[s].size >= nbytes]
        if fitting:
            slot = min(fitting, key=lambda s: self._slots[s].size)
        elif free:
            slot = free[0]
            self._drop(slot)
        elif len(self._slots) < self.ctx.max_slots:
            slot = max(self._slots, default=-1) + 1
        else:
            raise ResourceExhausted(
                f"connection holds all {self.ctx.max_slots} shm slots; release replies after use "
                "or raise ZMQDISAGG_MAX_SLOTS / --max-slots")
        if slot not in self._slots:
            self._gen += 1
            size = max(MIN_SLOT_BYTES, 1 << (nbytes - 1).bit_length())
            name = f"{PREFIX}{os.getpid()}-{self._tag}-{slot}-{self._gen}"
            self._slots[slot] = _Segment.open(self.ctx.shm_dir, name, size, create=True)
        self._busy.add(slot)
        return slot

    def release(self, slot: int) -> None:
        self._busy.discard(slot)

    def _drop(self, slot: int) -> None:
        seg = self._slots.pop(slot)
        seg.close()
        if self.ctx.role == "server":
            try:
                os.unlink(os.path.join(self.ctx.shm_dir, seg.name))
            except FileNotFoundError:
                pass

    # -- client side -------------------------------------------------------------------------------
    def accept(self, offer: Mapping[str, Any]) -> None:
        directory = offer.get("dir")
        if directory != self.ctx.shm_dir and not os.path.isdir(str(directory)):
            raise TransportUnavailable(f"server's shm directory {directory!r} is not visible here")

    def get(self, note: Mapping[str, Any], metas: Sequence[TensorMeta],
            frames: Sequence[Any]) -> dict[str, torch.Tensor]:
        try:
            slot, name, size = int(note["slot"]), str(note["segment"]), int(note["size"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolMismatch(f"shm delivery note {dict(note)!r} lacks slot/segment/size") from None
        if not _NAME.match(name):
            raise ProtocolMismatch(f"shm segment name {name!r} is not one of ours")
        seg = self._slots.get(slot)
        if seg is None or seg.name != name:
            if seg is not None:
                self._drop(slot)
            try:
                seg = self._slots[slot] = _Segment.open(self.ctx.shm_dir, name, size, create=False)
            except FileNotFoundError:
                raise TransportUnavailable(
                    f"shm segment {name} is not visible here; the server is on another host or "
                    "container: use --transport inline") from None
        return {m.name: _owned(from_bytes(seg.view, m), self.ctx.device) for m in metas}

    # -- both --------------------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for slot in list(self._slots):
            self._drop(slot)
        self._busy.clear()


def _owned(view: torch.Tensor, device: str) -> torch.Tensor:
    """Copy a view of shared memory into a tensor the caller owns, on ``device``."""
    out = torch.empty(view.shape, dtype=view.dtype, device=device)
    out.copy_(view)
    return out
