"""``cuda_ipc`` pack mode: the server packs a reply into one of *its* slots, the client copies it out.

``PackPath`` is a mixin of ``cuda_ipc.CudaIpcTransport`` (which owns the state it uses: ``_slots``,
``_busy``, ``_events``, ``_gen``, ``_peer``, ``_stream``, ``_marks``, ``_ready``, ``_done`` and the
tuning attributes, all set in its ``__init__``). Server half: ``_pack`` (called by ``put``),
``_acquire``, ``_allocate``, ``_free``. Client half: ``_get_packed`` (called by ``get``), ``_parse``,
``_mapping``, ``_await_chunk`` and ``finish_views``. Push mode lives in ``cuda_ipc_recv``.

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
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from zmqdisagg.errors import ProtocolMismatch, ResourceExhausted
from zmqdisagg.native import pack as native
from zmqdisagg.protocol.tensor_meta import TensorMeta, from_bytes
from zmqdisagg.transports.base import Delivery
from zmqdisagg.transports.cuda_ipc_common import (
    HANDLE_HEX, MAX_CHUNKS, chunk_ranges, chunking, copy_ranges, pow2_at_least, view, wait_event)

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class Slot:
    """Server: one exported allocation. Client: one opened mapping of it."""

    gen: int
    ptr: int
    size: int
    buf: torch.Tensor | None  # uint8 view of [ptr, ptr + size)
    handle: str = ""  # hex IPC mem handle (server side)


class PackPath:
    """Pack mode of ``CudaIpcTransport``: server slots (``_pack``) and copying out of them (``_get_packed``)."""

    # -- server side -------------------------------------------------------------------------------
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

    def _allocate(self, size: int) -> Slot:
        import cupy

        self._gen += 1
        with cupy.cuda.Device(self.index):
            ptr = cupy.cuda.runtime.malloc(size)
            handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(ptr)).hex()
        logger.debug("cuda_ipc slot of %d bytes on %s (gen %d)", size, self.uuid, self._gen)
        return Slot(gen=self._gen, ptr=ptr, size=size, buf=view(ptr, size, self.index), handle=handle)

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

    # -- client side -------------------------------------------------------------------------------
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

    def _mapping(self, slot: int, note: Mapping[str, Any]) -> Slot:
        """The opened mapping of (slot, gen), opening it under the exporting GPU's context once."""
        gen, size = int(note["gen"]), int(note["size"])
        s = self._slots.get(slot)
        if s is not None and s.gen == gen:
            return s
        self._free(slot)  # an older generation of this slot
        import cupy

        with cupy.cuda.Device(self._peer):
            ptr = cupy.cuda.runtime.ipcOpenMemHandle(bytes.fromhex(str(note["mem"])))
        s = self._slots[slot] = Slot(gen=gen, ptr=ptr, size=size, buf=view(ptr, size, self._peer))
        return s
__all__ = ["PackPath", "Slot"]
