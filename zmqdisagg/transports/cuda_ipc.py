"""``cuda_ipc``: same-host GPU transport through CUDA IPC slots and interprocess events.

Memory of one connection, on the server's GPU (one raw ``cudaMalloc`` per slot, never the caching
allocator, so no expandable-segment IPC and nothing torch may recycle)::

    slot s, generation g: [ tensor 0 | tensor 1 | ... | pad ]    size: power of two >= 1 MiB
                          |<- chunk 0 ->|<- chunk 1 ->| ...      at most MAX_CHUNKS chunks
    events[s][k]: interprocess event, recorded once chunk k is packed

Slot states: FREE --put--> BUSY --release / close (bye, lease expiry)--> FREE. A free slot too small for
a reply is freed and reallocated with the next generation. Replies name ``slot``, ``gen``, the slot's
IPC memory handle and the chunking; the client opens a handle once per (slot, gen) and caches it.

Ordering, with no host round trip between the two processes:

* server ``put``: pack chunk k on the current stream (one native launch, or ``copy_``), record event k.
  Chunking lets the client copy chunk 0 over NVLink while the server still packs chunk 1.
* client ``get``: the GPUs are matched by UUID. A stream **of the exporting GPU** waits on event k (a
  consumer-GPU stream waiting on another GPU's IPC event hung silently on our VMs, see
  ``shared/reference/gpu-baselines.md``), then chunk k is copied into the client's own tensors: by the
  SM copy kernel for payloads up to ``sm_copy_max_bytes`` (launched on the exporting GPU, pushing over
  NVLink), by the copy engine above. For copy-engine copies ``pull = True`` (default) records a plain
  local event on that stream and lets a stream of the client's own GPU wait on it and copy (a local
  event is safe to wait on across GPUs; only the IPC event is not); it measured 1-3% faster than
  pushing at >= 256 MiB. An SM kernel on the client's GPU reading the IPC mapping faulted (illegal
  address, H200, CUDA 13), so SM copies always push. ``get`` returns once the bytes have landed (it polls an event
  against ``transfer_timeout_s``), so the slot id may be released right away. ``profile`` keeps the
  last get's (enqueue, wait) seconds for the benchmark.
* zero-copy (same GPU, ``zero_copy = True`` on the client side): ``get`` returns views of the slot,
  ordered after the server's events on the caller's current stream. The caller must not release the
  slot until it is done with the views: call ``finish_views(note)`` (it synchronizes the current
  stream) and only then piggyback ``note["slot"]`` as released.

A killed client never pins memory: its slots are freed by ``close`` on bye or lease expiry. The
importer closes its mappings in ``close``; the driver unmaps everything of a dead process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from zmqdisagg import gpu_probe
from zmqdisagg.errors import PeerTimeout, ProtocolMismatch, ResourceExhausted, TransportUnavailable
from zmqdisagg.native import pack as native
from zmqdisagg.protocol.tensor_meta import TensorMeta, as_bytes, from_bytes, layout
from zmqdisagg.transports.base import Delivery, TransportContext

logger = logging.getLogger(__name__)

MIN_SLOT_BYTES = 1 << 20
MAX_CHUNKS = 8  # events per slot; the offer carries max_slots x MAX_CHUNKS event handles
MIN_CHUNK_BYTES = 16 << 20  # payloads up to 2x this go in one chunk
SM_COPY_MAX_BYTES = 64 << 20  # client copies up to this on SMs (native kernel), above on the copy engine
PACK_SM_MAX_BYTES = 64 << 20  # server packs up to this with one kernel launch, above with the copy engine
HANDLE_HEX = 128  # a cudaIpcMemHandle_t / cudaIpcEventHandle_t is 64 bytes


class _CudaArray:
    """A raw device range in ``__cuda_array_interface__`` form, so torch can view it without copying."""

    __slots__ = ("__cuda_array_interface__",)

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 2}


def _view(ptr: int, nbytes: int, index: int) -> torch.Tensor:
    return torch.as_tensor(_CudaArray(ptr, nbytes), device=torch.device("cuda", index))


@dataclass(kw_only=True, slots=True)
class _Slot:
    """Server: one exported allocation. Client: one opened mapping of it."""

    gen: int
    ptr: int
    size: int
    buf: torch.Tensor  # uint8 view of [ptr, ptr + size)
    handle: str = ""  # hex IPC mem handle (server side)


def chunking(total: int, min_chunk: int = MIN_CHUNK_BYTES) -> tuple[int, int]:
    """(chunk bytes, chunk count) for a ``total``-byte reply: one chunk up to 2x ``min_chunk``."""
    if total <= 2 * min_chunk:
        return max(total, 1), 1
    chunk = max(min_chunk, -(-total // MAX_CHUNKS))
    chunk = -(-chunk // (1 << 20)) * (1 << 20)  # whole MiB: every cut stays 16-byte aligned
    return chunk, -(-total // chunk)


def chunk_ranges(metas: Sequence[TensorMeta], chunk: int, n: int) -> list[list[tuple[int, int, int]]]:
    """For each chunk k, the (tensor index, start, end) byte ranges of tensors that fall inside it."""
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
    for i, m in enumerate(metas):
        a = 0
        while a < m.nbytes:
            k = (m.offset + a) // chunk
            b = min(m.nbytes, (k + 1) * chunk - m.offset)
            out[k].append((i, a, b))
            a = b
    return out


class CudaIpcTransport:
    """Server: a pool of exported slots on its GPU. Client: cached mappings and a copy stream."""

    name = "cuda_ipc"

    def __init__(self, ctx: TransportContext) -> None:
        if (why := self.probe()) is not None:
            raise TransportUnavailable(why)
        dev = torch.device(ctx.device)
        if dev.type != "cuda":
            raise TransportUnavailable(f"cuda_ipc needs a CUDA device, this side is on {ctx.device}")
        self.ctx = ctx
        self.index = dev.index if dev.index is not None else torch.cuda.current_device()
        self.uuid = gpu_probe.cuda_uuid(self.index)
        self.zero_copy = False  # client: return views when both sides share the GPU (see module doc)
        self.sm_copy_max_bytes = SM_COPY_MAX_BYTES  # client: SM kernel up to this, copy engine above
        self.pack_sm_max_bytes = PACK_SM_MAX_BYTES  # server: pack on SMs up to this, copy engine above
        self.min_chunk_bytes = MIN_CHUNK_BYTES
        self.pull = True  # client, across GPUs, copy-engine copies: issue them on our own GPU (pull)
        self.profile: tuple[float, float] = (0.0, 0.0)  # client: seconds to enqueue, seconds waiting
        self._slots: dict[int, _Slot] = {}
        self._busy: set[int] = set()
        self._events: list[list[torch.cuda.Event]] = []
        self._gen = 0
        self._peer: int | None = None  # client: torch ordinal of the server's GPU here
        self._stream: torch.cuda.Stream | None = None  # client: copy stream on the server's GPU
        self._own_stream: torch.cuda.Stream | None = None  # client: copy stream on our GPU (pull)
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

    # -- server side -------------------------------------------------------------------------------
    def offer(self) -> dict[str, Any]:
        """Device UUID and the interprocess events of every slot (made once, here)."""
        with torch.cuda.device(self.index):
            self._events = [[torch.cuda.Event(interprocess=True) for _ in range(MAX_CHUNKS)]
                            for _ in range(self.ctx.max_slots)]
            handles = [[bytes(e.ipc_handle()).hex() for e in row] for row in self._events]
        return {"device": self.uuid, "max_slots": self.ctx.max_slots, "events": handles}

    def put(self, tensors: Mapping[str, torch.Tensor]) -> Delivery:
        metas, total = layout(dict(tensors))
        slot = self._acquire(max(total, 1))
        s = self._slots[slot]
        chunk, n = chunking(total, self.min_chunk_bytes)
        srcs = [t.detach() for t in tensors.values()]
        srcs = [t if t.is_cuda and t.is_contiguous() and t.device.index == self.index
                else t.to(f"cuda:{self.index}").contiguous() for t in srcs]
        with torch.cuda.device(self.index):
            stream = torch.cuda.current_stream()
            use_sm = native.HAS_NATIVE and total <= self.pack_sm_max_bytes
            for k, ranges in enumerate(chunk_ranges(metas, chunk, n)):
                if use_sm:
                    native.copy_list([(srcs[i].data_ptr() + a, s.ptr + metas[i].offset + a, b - a)
                                      for i, a, b in ranges], stream)
                else:
                    for i, a, b in ranges:
                        s.buf[metas[i].offset + a:metas[i].offset + b].copy_(as_bytes(srcs[i])[a:b])
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
            self._slots[slot] = self._allocate(max(MIN_SLOT_BYTES, 1 << (nbytes - 1).bit_length()))
        self._busy.add(slot)
        return slot

    def _allocate(self, size: int) -> _Slot:
        import cupy

        self._gen += 1
        with cupy.cuda.Device(self.index):
            ptr = cupy.cuda.runtime.malloc(size)
            handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(ptr)).hex()
        logger.debug("cuda_ipc slot of %d bytes on %s (gen %d)", size, self.uuid, self._gen)
        return _Slot(gen=self._gen, ptr=ptr, size=size, buf=_view(ptr, size, self.index), handle=handle)

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
                for st in (self._stream, self._own_stream):
                    if st is not None:
                        st.synchronize()  # no copy may still read from it
                cupy.cuda.runtime.ipcCloseMemHandle(s.ptr)

    def release(self, slot: int) -> None:
        self._busy.discard(slot)

    # -- client side -------------------------------------------------------------------------------
    def accept(self, offer: Mapping[str, Any]) -> None:
        """Find the server's GPU here by UUID and open its events (mem handles come with replies)."""
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
        self._own_stream = torch.cuda.Stream(torch.device("cuda", self.index))
        if peer != self.index:  # let both GPUs reach each other (copy engine and the push kernel)
            _enable_peer_access(peer, self.index)

    def get(self, note: Mapping[str, Any], metas: Sequence[TensorMeta],
            frames: Sequence[Any]) -> dict[str, torch.Tensor]:
        if self._peer is None or self.closed:
            raise TransportUnavailable("cuda_ipc client used before accept or after close")
        slot, n, chunk = self._parse(note, metas)
        s = self._mapping(slot, note)
        events = self._events[slot]
        if self.zero_copy and self._peer == self.index:
            cur = torch.cuda.current_stream(self.index)
            for k in range(n):
                cur.wait_event(events[k])
            return {m.name: from_bytes(s.buf, m) for m in metas}
        t0 = time.perf_counter()
        outs = [torch.empty(m.shape, dtype=m.torch_dtype, device=f"cuda:{self.index}") for m in metas]
        total = max((m.offset + m.nbytes for m in metas), default=0)
        use_sm = native.HAS_NATIVE and total <= self.sm_copy_max_bytes
        pull = self.pull and not use_sm and self._peer != self.index  # a pulling SM kernel faulted
        chunks = [[(s.ptr + metas[i].offset + a, outs[i].data_ptr() + a, b - a) for i, a, b in ranges]
                  for ranges in chunk_ranges(metas, chunk, n)]
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.index))  # outputs' memory is free on our stream
        marks = [torch.cuda.Event() for _ in range(n)] if pull else []
        with torch.cuda.device(self._peer):  # the exporting GPU's stream waits on its IPC events
            self._stream.wait_event(ready)
            for k, entries in enumerate(chunks):
                self._stream.wait_event(events[k])
                if pull:
                    marks[k].record(self._stream)  # a local event: our GPU may wait on it safely
                else:
                    _copy(entries, self._stream, use_sm)
        stream = self._stream
        if pull:
            stream = self._own_stream
            with torch.cuda.device(self.index):
                stream.wait_event(ready)
                for k, entries in enumerate(chunks):
                    stream.wait_event(marks[k])
                    _copy(entries, stream, use_sm)
        done = torch.cuda.Event()
        done.record(stream)
        t1 = time.perf_counter()
        _wait(done, self.ctx.transfer_timeout_s, f"cuda_ipc copy of {total} bytes out of slot {slot}")
        self.profile = (t1 - t0, time.perf_counter() - t1)
        torch.cuda.current_stream(self.index).wait_event(done)
        for o in outs:
            o.record_stream(stream)
        return {m.name: o for m, o in zip(metas, outs)}

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
        s = self._slots[slot] = _Slot(gen=gen, ptr=ptr, size=size, buf=_view(ptr, size, self._peer))
        return s

    # -- both --------------------------------------------------------------------------------------
    def close(self) -> None:
        """Server: free every slot (a client's pinned memory comes back). Client: close mappings."""
        if self.closed:
            return
        self.closed = True
        for slot in list(self._slots):
            try:
                self._free(slot)
            except Exception as e:  # never let one bad slot keep the others pinned
                logger.warning("cuda_ipc: freeing slot %d failed: %s", slot, e)
        self._busy.clear()
        self._events = []

    def held_bytes(self) -> int:
        """Bytes of slot memory this side holds (server: allocated; client: mapped)."""
        return sum(s.size for s in self._slots.values())

    def __enter__(self) -> "CudaIpcTransport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _copy(entries: list[tuple[int, int, int]], stream: torch.cuda.Stream, use_sm: bool) -> None:
    """Copy (src, dst, n) ranges on ``stream``: one SM-kernel launch, or one copy-engine call each."""
    entries = [e for e in entries if e[2]]
    if not entries:
        return
    if use_sm:
        native.copy_list(entries, stream)
        return
    import cupy

    for src, dst, n in entries:  # cudaMemcpyDefault: UVA works out the direction and the peer path
        cupy.cuda.runtime.memcpyAsync(dst, src, n, cupy.cuda.runtime.memcpyDefault, stream.cuda_stream)


def _wait(event: torch.cuda.Event, timeout_s: float, what: str) -> None:
    """Poll ``event`` (spin for 2 ms, then 0.1 ms sleeps) until done or ``timeout_s``."""
    start = time.monotonic()
    while not event.query():
        waited = time.monotonic() - start
        if waited > timeout_s:
            raise PeerTimeout(f"{what} did not finish within {timeout_s:g}s; the server is gone or stuck")
        if waited > 0.002:
            time.sleep(0.0001)


def _enable_peer_access(a: int, b: int) -> None:
    """Peer access both ways, clearing CUDA's 'already enabled' error so torch never trips on it."""
    import cupy

    rt = cupy.cuda.runtime
    ensure = getattr(rt, "_deviceEnsurePeerAccess", None)  # cupy >= 13: idempotent, clears the error
    for src, dst in ((a, b), (b, a)):
        with cupy.cuda.Device(src):
            try:
                if ensure is not None:
                    ensure(dst)
                elif rt.deviceCanAccessPeer(src, dst):
                    rt.deviceEnablePeerAccess(dst)
            except rt.CUDARuntimeError as e:
                logger.warning("peer access %d->%d: %s (copies may bounce through the host)", src, dst, e)
