"""``cuda_ipc``: same-host GPU transport through CUDA IPC memory and interprocess events.

Two modes, chosen per connection by the client at ``accept``:

* **push** (default across GPUs; ``cuda_ipc_recv``): the client exports receive slots on its own GPU
  through a shared-memory mailbox (``cuda_ipc_mailbox``, ``cuda_ipc_slots``); the server copies each
  reply's tensors straight into a free one and records that slot's interprocess event; ``get`` polls
  the event from the host and returns views that give the slot back when they are garbage-collected.
  One copy, no pack, no GPU-side wait on another process's event.
* **pack** (the fallback, and the default on one GPU): the server packs the reply into one of *its*
  slots and the client copies it out (or, ``zero_copy``, views it and calls ``finish_views``).
  A push-mode server also packs when no receive slot is free or big enough, and says how many bytes it
  wanted, so the client grows its slots for the next reply.

``ZMQDISAGG_CUDA_IPC_PUSH`` (``auto``/``1``/``0``) or the client attribute ``push`` picks the mode;
``PUSH_BY_DEFAULT`` below is the one-line switch for ``auto``.

Pack-mode memory of one connection, on the server's GPU (one raw ``cudaMalloc`` per slot)::

    slot s, generation g: [ tensor 0 | tensor 1 | ... | pad ]    size: power of two >= 1 MiB
                          |<- chunk 0 ->|<- chunk 1 ->| ...      at most MAX_CHUNKS chunks
    events[s][k]: interprocess event, recorded once chunk k is packed

Slot states: FREE --put--> BUSY --release / close (bye, lease expiry)--> FREE. Pack-mode ``get``: the
client checks each chunk's event with ``query()`` first; only a chunk still being packed costs a
GPU-side wait, and that wait is issued on a stream **of the exporting GPU** (a consumer-GPU stream
waiting on another GPU's IPC event hung silently, ``shared/reference/gpu-baselines.md``), chained to
our GPU by a plain local event. Copy-engine copies run on the caller's current stream (pull); SM copies
push from the exporting GPU (a pulling SM kernel faulted on an IPC mapping). ``get`` returns once the
bytes have landed, so the slot id may be released right away.

A killed client never pins memory: its server slots and opened receive slots are closed by ``close``
on bye or lease expiry; the driver unmaps everything of a dead process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from zmqdisagg import envs, gpu_probe
from zmqdisagg.errors import ProtocolMismatch, ResourceExhausted, TransportUnavailable
from zmqdisagg.native import pack as native
from zmqdisagg.protocol.tensor_meta import TensorMeta, from_bytes, layout
from zmqdisagg.transports.base import Delivery, TransportContext
from zmqdisagg.transports.cuda_ipc_common import (  # noqa: F401  (re-exported for tests and bench)
    HANDLE_HEX, MAX_CHUNKS, MIN_CHUNK_BYTES, MIN_SLOT_BYTES, PACK_SM_MAX_BYTES, SM_COPY_MAX_BYTES, chunk_ranges,
    chunking, copy_ranges, enable_peer_access, pow2_at_least, view, wait_event)

logger = logging.getLogger(__name__)

PUSH_BY_DEFAULT = True  # one-line switch: False makes "auto" pick the pack path across GPUs again
_ON, _OFF = ("1", "on", "true", "yes", "push"), ("0", "off", "false", "no", "pack")


@dataclass(kw_only=True, slots=True)
class _Slot:
    """Server: one exported allocation. Client: one opened mapping of it."""

    gen: int
    ptr: int
    size: int
    buf: torch.Tensor | None  # uint8 view of [ptr, ptr + size)
    handle: str = ""  # hex IPC mem handle (server side)


class CudaIpcTransport:
    """Server: exported slots and the push writer. Client: mappings, receive slots, cached events."""

    name = "cuda_ipc"

    def __init__(self, ctx: TransportContext) -> None:
        if (why := self.probe()) is not None:
            raise TransportUnavailable(why)
        dev = torch.device(ctx.device)
        if dev.type != "cuda":
            raise TransportUnavailable(f"cuda_ipc needs a CUDA device, this side is on {ctx.device}")
        self.ctx = ctx
        self.index = dev.index if dev.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", self.index)
        self.uuid = gpu_probe.cuda_uuid(self.index)
        self.push: bool | None = None  # client: None = ZMQDISAGG_CUDA_IPC_PUSH / PUSH_BY_DEFAULT
        self.zero_copy = False  # client, pack mode, one GPU: return views of the server's slot
        self.sm_copy_max_bytes = SM_COPY_MAX_BYTES  # client: SM kernel up to this, copy engine above
        self.pack_sm_max_bytes = PACK_SM_MAX_BYTES  # server: pack on SMs up to this, copy engine above
        self.push_sm_max_bytes = 0  # server: push on SMs up to this (0: copy engine only)
        self.min_chunk_bytes = MIN_CHUNK_BYTES
        self.pull = True  # client, pack mode, copy engine: copy on our own GPU's stream (pull)
        self.profile: tuple[float, float] = (0.0, 0.0)  # client: seconds to enqueue, seconds waiting
        self._slots: dict[int, _Slot] = {}
        self._busy: set[int] = set()
        self._events: list[list[torch.cuda.Event]] = []
        self._gen = 0
        self._writer: Any = None  # server, push mode: cuda_ipc_recv.PushWriter
        self._pool: Any = None  # client, push mode: cuda_ipc_recv.RecvPool
        self._peer: int | None = None  # client: torch ordinal of the server's GPU here
        self._stream: torch.cuda.Stream | None = None  # client: a stream of the server's GPU
        self._marks: list[torch.cuda.Event] = []  # client: per-chunk local events, reused every get
        self._ready: Any = None  # client: reused event, outputs' memory free on our stream
        self._done: dict[int, torch.cuda.Event] = {}  # client: reused 'copies done' event per GPU
        self.closed = False

    @staticmethod
    def probe() -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA device in this process"
        try:
            import cupy  # noqa: F401
        except Exception as e:
            return f"cupy is not importable ({e}); install cupy-cuda12x/13x"
        return None

    @property
    def mode(self) -> str:
        """``push`` or ``pack`` (client, after accept; a server reports ``push`` once a client attached)."""
        return "push" if self._pool is not None or (self._writer is not None and self._writer.client) else "pack"

    # -- server side -------------------------------------------------------------------------------
    def offer(self) -> dict[str, Any]:
        """Device UUID, the events of every slot and receive slot, and the push mailbox (made once)."""
        from zmqdisagg.transports.cuda_ipc_mailbox import Mailbox
        from zmqdisagg.transports.cuda_ipc_recv import PushWriter

        n = self.ctx.max_slots
        with torch.cuda.device(self.index):
            self._events = [[torch.cuda.Event(interprocess=True) for _ in range(MAX_CHUNKS)] for _ in range(n)]
            push = [torch.cuda.Event(interprocess=True) for _ in range(n)]
            handles = [[bytes(e.ipc_handle()).hex() for e in row] for row in self._events]
            push_handles = [bytes(e.ipc_handle()).hex() for e in push]
        offer = {"device": self.uuid, "max_slots": n, "events": handles}
        try:
            box = Mailbox.create(self.ctx.shm_dir, n)
        except OSError as e:  # no /dev/shm: pack mode only
            logger.warning("cuda_ipc: no push mailbox in %s (%s); replies use the pack path", self.ctx.shm_dir, e)
            return offer
        self._writer = PushWriter(box, self.index, push)
        return {**offer, "mailbox": box.path, "push_events": push_handles}

    def put(self, tensors: Mapping[str, torch.Tensor]) -> Delivery:
        metas, total = layout(dict(tensors))
        srcs = [t.detach() for t in tensors.values()]
        srcs = [t if t.is_cuda and t.device.index == self.index and t.is_contiguous()
                else t.to(self.device).contiguous() for t in srcs]
        stream = torch.cuda.current_stream(self.index)
        extra: dict[str, Any] = {}
        if self._writer is not None and self._writer.attached():
            self._writer.sm_max_bytes = self.push_sm_max_bytes
            note = self._writer.put(srcs, metas, total, stream)
            if note is not None and "recv" in note:
                return Delivery(note=note, metas=tuple(metas))
            extra = {"want": total, **(note or {})}
        try:
            delivery = self._pack(srcs, metas, total, stream)
        except Exception:
            if "retire" in extra:  # the client never hears of this retire: keep its slot offered
                self._writer.grants.ungrant(extra["retire"][0])
            raise
        delivery.note.update(extra)
        return delivery

    def _pack(self, srcs: list[torch.Tensor], metas: list[TensorMeta], total: int,
              stream: torch.cuda.Stream) -> Delivery:
        slot = self._acquire(max(total, 1))
        s = self._slots[slot]
        chunk, n = chunking(total, self.min_chunk_bytes)
        ranges = [[(i, 0, m.nbytes) for i, m in enumerate(metas)]] if n == 1 else chunk_ranges(metas, chunk, n)
        use_sm = native.HAS_NATIVE and total <= self.pack_sm_max_bytes
        with torch.cuda.device(self.index):  # only the SM launch needs it; one guard for the loop
            for k, rs in enumerate(ranges):
                copy_ranges([(srcs[i].data_ptr() + a, s.ptr + metas[i].offset + a, b - a) for i, a, b in rs],
                            stream, use_sm)
                self._events[slot][k].record(stream)
        note = {"slot": slot, "gen": s.gen, "size": s.size, "mem": s.handle, "chunk": chunk, "n": n}
        return Delivery(note=note, metas=tuple(metas), slot=slot)

    def _acquire(self, nbytes: int) -> int:
        if not self._events:
            raise ProtocolMismatch("cuda_ipc put before offer: the server must offer first")
        free = [i for i in range(self.ctx.max_slots) if i not in self._busy]
        if not free:
            raise ResourceExhausted(
                f"connection holds all {self.ctx.max_slots} cuda_ipc slots; release replies after use "
                "or raise ZMQDISAGG_MAX_SLOTS / --max-slots")
        fitting = [i for i in free if i in self._slots and self._slots[i].size >= nbytes]
        slot = min(fitting, key=lambda i: self._slots[i].size) if fitting else \
            next((i for i in free if i not in self._slots), free[0])
        if not fitting:
            self._free(slot)
            self._slots[slot] = self._allocate(pow2_at_least(nbytes))
        self._busy.add(slot)
        return slot

    def _allocate(self, size: int) -> _Slot:
        import cupy

        self._gen += 1
        with cupy.cuda.Device(self.index):
            ptr = cupy.cuda.runtime.malloc(size)
            handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(ptr)).hex()
        logger.debug("cuda_ipc slot of %d bytes on %s (gen %d)", size, self.uuid, self._gen)
        return _Slot(gen=self._gen, ptr=ptr, size=size, buf=view(ptr, size, self.index), handle=handle)

    def _free(self, slot: int) -> None:
        s = self._slots.pop(slot, None)
        if s is None:
            return
        import cupy

        s.buf = None
        if self.ctx.role == "server":
            with cupy.cuda.Device(self.index):
                torch.cuda.current_stream(self.index).synchronize()  # no pack may still write into it
                cupy.cuda.runtime.free(s.ptr)
        else:  # close under the exporting GPU's context, where it was opened
            with cupy.cuda.Device(self._peer):
                if self._stream is not None:
                    self._stream.synchronize()  # every get host-waited its copies; this is belt and braces
                cupy.cuda.runtime.ipcCloseMemHandle(s.ptr)

    def release(self, slot: int) -> None:
        self._busy.discard(slot)

    # -- client side -------------------------------------------------------------------------------
    def accept(self, offer: Mapping[str, Any]) -> None:
        """Find the server's GPU here by UUID, open its events, and set up push mode if chosen."""
        peer = gpu_probe.local_index(str(offer.get("device")))
        if peer is None:
            raise TransportUnavailable(
                f"the server's GPU {offer.get('device')} is not visible in this process; add it to "
                "CUDA_VISIBLE_DEVICES or use the nccl transport")
        self._peer = peer
        device = torch.device("cuda", peer)
        try:
            self._events = [[torch.cuda.Event.from_ipc_handle(device, bytes.fromhex(h)) for h in row]
                            for row in offer["events"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolMismatch(f"cuda_ipc offer has malformed event handles: {e}") from None
        self._stream = torch.cuda.Stream(device)
        self._marks = [torch.cuda.Event() for _ in range(MAX_CHUNKS)]
        self._ready = torch.cuda.Event()
        self._done = {i: torch.cuda.Event() for i in (peer, self.index)}  # an event records on one GPU only
        enable_peer_access(peer, self.index)  # both GPUs reach each other (copy engine, push kernel)
        if self._wants_push(offer):
            self._start_push(offer, device)
        logger.debug("cuda_ipc client on %s, server GPU %d here: %s mode", self.uuid, peer, self.mode)

    def _wants_push(self, offer: Mapping[str, Any]) -> bool:
        if "mailbox" not in offer or (self.zero_copy and self._peer == self.index):
            return False
        if self.push is not None:
            return bool(self.push)
        env = str(envs.ZMQDISAGG_CUDA_IPC_PUSH or "auto").strip().lower()
        if env in _ON or env in _OFF:
            return env in _ON
        return PUSH_BY_DEFAULT and self._peer != self.index

    def _start_push(self, offer: Mapping[str, Any], device: torch.device) -> None:
        from zmqdisagg.transports.cuda_ipc_mailbox import Mailbox
        from zmqdisagg.transports.cuda_ipc_recv import RecvPool

        try:
            box = Mailbox.attach(str(offer["mailbox"]))
            events = [torch.cuda.Event.from_ipc_handle(device, bytes.fromhex(h)) for h in offer["push_events"]]
        except (ProtocolMismatch, KeyError, TypeError, ValueError) as e:  # keep the pack path working
            logger.warning("cuda_ipc push mode unavailable (%s); using the pack path", e)
            return
        if len(events) < box.nslots:
            box.close()
            raise ProtocolMismatch(f"cuda_ipc offer has {len(events)} push events for {box.nslots} slots")
        self._pool = RecvPool(box, self.index, events, self.ctx.transfer_timeout_s)
        self._pool.start(self.uuid)

    def get(self, note: Mapping[str, Any], metas: Sequence[TensorMeta],
            frames: Sequence[Any]) -> dict[str, torch.Tensor]:
        if self._peer is None or self.closed:
            raise TransportUnavailable("cuda_ipc client used before accept or after close")
        if "recv" in note:
            if self._pool is None:
                raise ProtocolMismatch("cuda_ipc server pushed into a receive slot this client never offered")
            t0 = time.perf_counter()
            out = self._pool.deliver(note, metas)
            self.profile = (0.0, time.perf_counter() - t0)
            return out
        out = self._get_packed(note, metas)
        if self._pool is not None and "want" in note:
            self._pool.on_note(note)  # grow receive slots, so the next reply of this size is pushed
        return out

    def _get_packed(self, note: Mapping[str, Any], metas: Sequence[TensorMeta]) -> dict[str, torch.Tensor]:
        slot, n, chunk = self._parse(note, metas)
        s = self._mapping(slot, note)
        events = self._events[slot]
        same = self._peer == self.index
        if self.zero_copy and same:
            cur = torch.cuda.current_stream(self.index)
            for k in range(n):
                cur.wait_event(events[k])
            return {m.name: from_bytes(s.buf, m) for m in metas}
        t0 = time.perf_counter()
        outs = [torch.empty(m.shape, dtype=m.torch_dtype, device=self.device) for m in metas]
        total = max((m.offset + m.nbytes for m in metas), default=0)
        use_sm = native.HAS_NATIVE and total <= self.sm_copy_max_bytes
        packed = [events[k].query() for k in range(n)]  # host check: a finished pack needs no GPU wait
        ranges = [[(i, 0, m.nbytes) for i, m in enumerate(metas)]] if n == 1 else chunk_ranges(metas, chunk, n)
        chunks = [[(s.ptr + metas[i].offset + a, outs[i].data_ptr() + a, b - a) for i, a, b in rs] for rs in ranges]
        if not use_sm and (self.pull or same):  # copy engine on our current stream: outs need no hand-off
            stream = torch.cuda.current_stream(self.index)
            with torch.cuda.device(self.index):  # our current device may be another GPU (bench, trainers)
                for k, entries in enumerate(chunks):
                    if not packed[k]:
                        self._await_chunk(stream, events[k], self._marks[k], same)
                    copy_ranges(entries, stream, False)
        else:  # push from the exporting GPU (SM kernel, or copy engine with pull off)
            stream = self._stream
            self._ready.record(torch.cuda.current_stream(self.index))  # outs' memory is free on our stream
            stream.wait_event(self._ready)
            with torch.cuda.device(self._peer):  # the SM launch runs on the exporting GPU
                for k, entries in enumerate(chunks):
                    if not packed[k]:
                        stream.wait_event(events[k])  # an exporting-GPU stream waits on its own IPC event
                    copy_ranges(entries, stream, use_sm)
        done = self._done[stream.device.index]
        done.record(stream)
        t1 = time.perf_counter()
        wait_event(done, self.ctx.transfer_timeout_s, f"cuda_ipc copy of {total} bytes out of slot {slot}")
        self.profile = (t1 - t0, time.perf_counter() - t1)  # outs are complete: no record_stream needed
        return {m.name: o for m, o in zip(metas, outs)}

    def _await_chunk(self, stream: torch.cuda.Stream, ipc: torch.cuda.Event, mark: torch.cuda.Event,
                     same: bool) -> None:
        """Order ``stream`` (our GPU) after a chunk still being packed, per the gpu-baselines recipe."""
        if same:
            stream.wait_event(ipc)  # one GPU: our stream waits on its own GPU's IPC event
            return
        self._stream.wait_event(ipc)  # the exporting GPU's stream waits on its IPC event ...
        mark.record(self._stream)  # ... and records a plain event, which another GPU may wait on
        stream.wait_event(mark)

    def finish_views(self, note: Mapping[str, Any]) -> int:
        """Zero-copy: wait until the current stream is done with the views; return the slot to release."""
        torch.cuda.current_stream(self.index).synchronize()
        return int(note["slot"])

    def _parse(self, note: Mapping[str, Any], metas: Sequence[TensorMeta]) -> tuple[int, int, int]:
        try:
            slot, size, n, chunk = int(note["slot"]), int(note["size"]), int(note["n"]), int(note["chunk"])
            int(note["gen"]), bytes.fromhex(str(note["mem"]))
        except (KeyError, TypeError, ValueError):
            raise ProtocolMismatch(f"cuda_ipc delivery note {dict(note)!r} is malformed") from None
        if not (0 <= slot < len(self._events)) or not (1 <= n <= MAX_CHUNKS) or len(str(note["mem"])) != HANDLE_HEX:
            raise ProtocolMismatch(f"cuda_ipc note names slot {slot} / {n} chunks outside the offer")
        if any(m.offset + m.nbytes > size for m in metas) or any(m.offset + m.nbytes > n * chunk for m in metas):
            raise ProtocolMismatch(f"cuda_ipc reply's tensors overrun slot {slot} of {size} bytes")
        return slot, n, chunk

    def _mapping(self, slot: int, note: Mapping[str, Any]) -> _Slot:
        """The opened mapping of (slot, gen), opening it under the exporting GPU's context once."""
        gen, size = int(note["gen"]), int(note["size"])
        s = self._slots.get(slot)
        if s is not None and s.gen == gen:
            return s
        self._free(slot)  # an older generation of this slot
        import cupy

        with cupy.cuda.Device(self._peer):
            ptr = cupy.cuda.runtime.ipcOpenMemHandle(bytes.fromhex(str(note["mem"])))
        s = self._slots[slot] = _Slot(gen=gen, ptr=ptr, size=size, buf=view(ptr, size, self._peer))
        return s

    def free_recv_slots(self) -> int:
        """Client, push mode: receive slots offered to the server now (-1 in pack mode)."""
        return self._pool.free_slots() if self._pool is not None else -1

    # -- both --------------------------------------------------------------------------------------
    def close(self) -> None:
        """Server: free every slot and close the client's receive slots. Client: close mappings and free
        receive slots (one with live views is freed when they die). Idempotent."""
        if self.closed:
            return
        self.closed = True
        for part in (self._writer, self._pool):
            try:
                if part is not None:
                    part.close()
            except Exception as e:  # never let one failure keep the rest pinned
                logger.warning("cuda_ipc: closing push mode failed: %s", e)
        for slot in list(self._slots):
            try:
                self._free(slot)
            except Exception as e:
                logger.warning("cuda_ipc: freeing slot %d failed: %s", slot, e)
        self._busy.clear()
        self._events = []

    def held_bytes(self) -> int:
        """Bytes of slot memory this side holds (server: allocated; client: mapped plus receive slots)."""
        own = self._pool.held_bytes() if self._pool is not None else 0
        return own + sum(s.size for s in self._slots.values())

    def __enter__(self) -> "CudaIpcTransport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


__all__ = ["CudaIpcTransport", "PUSH_BY_DEFAULT", "chunk_ranges", "chunking", "MAX_CHUNKS"]
