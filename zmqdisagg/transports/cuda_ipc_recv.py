"""``cuda_ipc`` push mode: the client's receive slots (``RecvPool``) and the server's writer (``PushWriter``).

Who does what:

* **The client allocates.** Each receive slot is one raw ``cudaMalloc`` on the client's GPU (never the
  caching allocator), exported once per generation through the mailbox (``cuda_ipc_mailbox``).
* **The server writes.** ``PushWriter`` opens a slot's handle once per generation *under its own
  GPU's context* (so both the copy engine and an SM kernel of the server's GPU may write it; a mapping
  opened under the other GPU's context faulted for SM access in our runs), copies each reply tensor
  straight from the server's tensors into it, on the server's current stream, and records the slot's
  interprocess event.
* **The client waits from the host.** ``RecvPool.deliver`` polls that event with ``query()`` (no stream
  waits on another process's event at all, which sidesteps the cross-GPU hang recorded in
  ``gpu-baselines.md``) and returns *views* of the slot.
* **Release on GC.** The views share one storage made from a ``Lease`` (``__cuda_array_interface__``).
  torch holds the lease until that storage is freed, i.e. until the last view is gone; ``Lease.__del__``
  then records an event on the stream that was current in ``get`` and, once that event has completed
  (the caller's GPU work on the views is done), the slot is offered to the server again. A slot is
  therefore never reused while a view is alive, nor before kernels reading it have finished.

Threading: a lease may die on any thread. ``__del__`` only appends to a deque and tries the lock
without blocking; whoever holds the lock, or the next ``get``, publishes the release.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Mapping, Sequence

import torch

from zmqdisagg.errors import ProtocolMismatch, TransportUnavailable
from zmqdisagg.protocol.tensor_meta import TensorMeta, from_bytes
from zmqdisagg.transports.cuda_ipc_common import (MIN_SLOT_BYTES, RawRange, copy_ranges, pow2_at_least, view,
                                                  wait_event)
from zmqdisagg.transports.cuda_ipc_mailbox import Mailbox
from zmqdisagg.transports.cuda_ipc_slots import RETIRE, ClientBook, ServerGrants

logger = logging.getLogger(__name__)

INITIAL_SLOTS = 2  # receive slots made at accept: one in use by the caller, one for the next reply
FITTING_SLOTS = 2  # on a miss, grow until this many slots fit the size and one of them is free


class Lease(RawRange):
    """The owner of one reply's views: torch drops it when their storage is freed (see module doc)."""

    __slots__ = ("pool", "r", "gen", "stream")

    def __init__(self, pool: "RecvPool", r: int, gen: int, ptr: int, size: int, stream: torch.cuda.Stream) -> None:
        super().__init__(ptr, size)
        self.pool, self.r, self.gen, self.stream = pool, r, gen, stream

    def __del__(self) -> None:
        try:
            self.pool.released(self.r, self.gen, self.stream)
        except Exception:  # never raise from a finalizer (interpreter shutdown included)
            pass


class RecvPool:
    """Client side: the receive slots on our GPU, their leases and the release events."""

    def __init__(self, box: Mailbox, index: int, push_events: list[torch.cuda.Event], timeout_s: float) -> None:
        self.box, self.index, self.push_events, self.timeout_s = box, index, push_events, timeout_s
        self.book = ClientBook(box)
        self.mem: dict[int, tuple[int, int]] = {}  # r -> (ptr, size)
        self.leased: set[int] = set()
        self._events: dict[int, torch.cuda.Event] = {}  # r -> local event: GPU done with r's views
        self._pending: collections.deque = collections.deque()  # (r, gen, stream) from dying leases
        self._waiting: list[tuple[int, int]] = []  # released, event recorded, not yet complete
        self._lock = threading.Lock()
        self.closed = False

    def start(self, uuid: str) -> None:
        """Make the first slots and tell the server we take pushes (the attach word goes last)."""
        with self._lock:
            for _ in range(min(INITIAL_SLOTS, self.box.nslots)):
                self._allocate(self.book.unused(), MIN_SLOT_BYTES)
        self.box.set_client(uuid)

    def deliver(self, note: Mapping[str, Any], metas: Sequence[TensorMeta]) -> dict[str, torch.Tensor]:
        """Views of the slot the server pushed this reply into, once its event says the bytes landed."""
        try:
            r, gen = int(note["recv"]), int(note["rgen"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolMismatch(f"cuda_ipc push note {dict(note)!r} is malformed") from None
        with self._lock:
            self._drain()
            rec = self.book.granted(r, gen)
            ptr, size = self.mem[r]
            self.leased.add(r)
        self._flush()
        if any(m.offset + m.nbytes > rec.size for m in metas):
            raise ProtocolMismatch(f"cuda_ipc reply's tensors overrun receive slot {r} of {rec.size} bytes")
        wait_event(self.push_events[r], self.timeout_s, f"cuda_ipc push into receive slot {r}")
        lease = Lease(self, r, gen, ptr, size, torch.cuda.current_stream(self.index))
        base = view(ptr, size, self.index, lease)
        return {m.name: from_bytes(base, m) for m in metas}

    def on_note(self, note: Mapping[str, Any]) -> None:
        """Grow after a miss: regrow a slot the server retired, or add slots until two fit ``want``."""
        want, retire = note.get("want"), note.get("retire")
        if not want and retire is None:
            return
        size = pow2_at_least(int(want or 1))
        with self._lock:
            if retire is not None:
                r, gen = int(retire[0]), int(retire[1])
                self.book.granted(r, gen)
                self.book.forget(r)
                self._free(r)
                self._allocate(r, size)
            while self._short_of(size) and (r := self.book.unused()) is not None:
                self._allocate(r, size)
        self._flush()

    def _short_of(self, size: int) -> bool:
        """Fewer than FITTING_SLOTS slots fit ``size``, or none that fits is offered right now."""
        offered = self.book.offered()
        return self.book.fitting(size) < FITTING_SLOTS or not any(self.book.recs[r].size >= size for r in offered)

    # -- release ---------------------------------------------------------------------------------------
    def released(self, r: int, gen: int, stream: torch.cuda.Stream) -> None:
        """A lease died (any thread, inside GC): queue it; publish now if the lock is free."""
        self._pending.append((r, gen, stream))
        self._flush()

    def _flush(self) -> None:
        """Drain dead leases if nobody holds the lock (whoever does drains them on the way out)."""
        while self._pending and self._lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._lock.release()

    def _drain(self) -> None:
        """Record release events for dead leases; offer every slot whose event has completed."""
        while self._pending:
            r, gen, stream = self._pending.popleft()
            ev = self._events.get(r)
            if ev is None:
                ev = self._events[r] = torch.cuda.Event()
            ev.record(stream)  # after every kernel the caller queued on the views' stream
            self._waiting.append((r, gen))
        still = []
        for r, gen in self._waiting:
            if not self._events[r].query():
                still.append((r, gen))
                continue
            self.leased.discard(r)
            if self.closed:
                self._free(r)
            else:
                self.book.offer(r, gen)
        self._waiting = still

    def free_slots(self) -> int:
        """Slots offered to the server now (after publishing finished releases); for tests and stats."""
        with self._lock:
            self._drain()
            return len(self.book.offered())

    def held_bytes(self) -> int:
        return sum(size for _, size in self.mem.values())

    # -- memory ----------------------------------------------------------------------------------------
    def _allocate(self, r: int, size: int) -> None:
        import cupy

        with cupy.cuda.Device(self.index):
            ptr = cupy.cuda.runtime.malloc(size)
            handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(ptr))
        self.mem[r] = (ptr, size)
        gen = self.book.add(r, size, handle)
        logger.debug("cuda_ipc receive slot %d: %d bytes (gen %d)", r, size, gen)

    def _free(self, r: int) -> None:
        entry = self.mem.pop(r, None)
        if entry is None:
            return
        import cupy

        with cupy.cuda.Device(self.index):
            cupy.cuda.runtime.free(entry[0])  # cudaFree waits for the device: no copy still touches it

    def close(self) -> None:
        """Free every slot without live views; a slot with live views is freed when they die."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._drain()
            for r, _ in self._waiting:  # released, but the caller's last kernels may still read
                self._events[r].synchronize()
                self.leased.discard(r)
            self._waiting = []
            for r in [r for r in self.mem if r not in self.leased]:
                try:
                    self._free(r)
                except Exception as e:
                    logger.warning("cuda_ipc: freeing receive slot %d failed: %s", r, e)
        self.box.close()


class PushWriter:
    """Server side: the client's slots opened here, and the copies into them."""

    def __init__(self, box: Mailbox, index: int, events: list[torch.cuda.Event]) -> None:
        self.box, self.index, self.events = box, index, events
        self.grants = ServerGrants(box)
        self.maps: dict[int, tuple[int, int]] = {}  # r -> (gen, ptr) opened under our context
        self.sm_max_bytes = 0  # push with the native kernel up to this many bytes (0: copy engine only)
        self.client: str | None = None

    def attached(self) -> bool:
        if self.client is None and (uuid := self.box.client()) is not None:
            self.client = uuid
            from zmqdisagg import gpu_probe
            from zmqdisagg.transports.cuda_ipc_common import enable_peer_access

            peer = gpu_probe.local_index(uuid)
            if peer is not None:
                enable_peer_access(self.index, peer)
            logger.info("cuda_ipc: client on %s takes pushes (visible here as %s)", uuid, peer)
        return self.client is not None

    def put(self, srcs: Sequence[torch.Tensor], metas: Sequence[TensorMeta], total: int,
            stream: torch.cuda.Stream) -> dict[str, Any] | None:
        """Push one reply, or say why not: a note for the reply, or None (no free slot: pack instead)."""
        pick = self.grants.pick(max(total, 1))
        if pick is None:
            return None
        if pick.kind == RETIRE:
            return {"retire": [pick.r, pick.desc.gen]}
        ptr = self._mapping(pick.r, pick.desc.gen, pick.desc.handle)
        entries = [(s.data_ptr(), ptr + m.offset, m.nbytes) for s, m in zip(srcs, metas)]
        from zmqdisagg.native import pack as native

        with torch.cuda.device(self.index):  # an SM launch needs it; a memcpy on this stream is safe with it
            copy_ranges(entries, stream, use_sm=native.HAS_NATIVE and total <= self.sm_max_bytes)
        self.events[pick.r].record(stream)
        return {"recv": pick.r, "rgen": pick.desc.gen}

    def _mapping(self, r: int, gen: int, handle: bytes) -> int:
        m = self.maps.get(r)
        if m is not None and m[0] == gen:
            return m[1]
        self._close(r)  # an older generation: the client freed it only after our writes completed
        import cupy

        try:
            with cupy.cuda.Device(self.index):
                ptr = cupy.cuda.runtime.ipcOpenMemHandle(handle)
        except cupy.cuda.runtime.CUDARuntimeError as e:  # the exporting client has exited (or freed it)
            raise TransportUnavailable(f"cuda_ipc: cannot open the client's receive slot {r} ({e}); the client "
                                       "is gone, so its connection is dropped") from e
        self.maps[r] = (gen, ptr)
        return ptr

    def _close(self, r: int) -> None:
        m = self.maps.pop(r, None)
        if m is None:
            return
        import cupy

        with cupy.cuda.Device(self.index):
            cupy.cuda.runtime.ipcCloseMemHandle(m[1])

    def close(self) -> None:
        """Close every mapping (a dead client's memory goes back to the driver) and the mailbox."""
        if self.maps:
            torch.cuda.current_stream(self.index).synchronize()  # no push may still write
        for r in list(self.maps):
            try:
                self._close(r)
            except Exception as e:
                logger.warning("cuda_ipc: closing receive slot %d failed: %s", r, e)
        self.box.close(unlink=True)
