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

Pack mode (server slots, their chunk events and copying out of them) lives in ``cuda_ipc_pack``, a
mixin of this class; ``put`` and ``get`` below say which path a reply takes.

A killed client never pins memory: its server slots and opened receive slots are closed by ``close``
on bye or lease expiry; the driver unmaps everything of a dead process.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Sequence

import torch

from zmqdisagg import envs, gpu_probe
from zmqdisagg.errors import ProtocolMismatch, TransportUnavailable
from zmqdisagg.protocol.tensor_meta import TensorMeta, layout
from zmqdisagg.transports._closing import Closing
from zmqdisagg.transports.base import Delivery, TransportContext
from zmqdisagg.transports.cuda_ipc_common import (  # noqa: F401  (re-exported for tests and bench)
    HANDLE_HEX, MAX_CHUNKS, MIN_CHUNK_BYTES, MIN_SLOT_BYTES, PACK_SM_MAX_BYTES, SM_COPY_MAX_BYTES, chunk_ranges,
    chunking, copy_ranges, enable_peer_access, pow2_at_least, view, wait_event)
from zmqdisagg.transports.cuda_ipc_pack import PackPath, Slot

logger = logging.getLogger(__name__)

PUSH_BY_DEFAULT = True  # one-line switch: False makes "auto" pick the pack path across GPUs again
_ON, _OFF = ("1", "on", "true", "yes", "push"), ("0", "off", "false", "no", "pack")


class CudaIpcTransport(PackPath, Closing):
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
        self._slots: dict[int, Slot] = {}
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
            delivery = self._pack(srcs, metas, total, stream)  # cuda_ipc_pack.PackPath
        except Exception:
            if "retire" in extra:  # the client never hears of this retire: keep its slot offered
                self._writer.grants.ungrant(extra["retire"][0])
            raise
        delivery.note.update(extra)
        return delivery

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
        out = self._get_packed(note, metas)  # pack mode: cuda_ipc_pack.PackPath
        if self._pool is not None and "want" in note:
            self._pool.on_note(note)  # grow receive slots, so the next reply of this size is pushed
        return out

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


__all__ = ["CudaIpcTransport", "PUSH_BY_DEFAULT", "chunk_ranges", "chunking", "MAX_CHUNKS",
           # re-exported from cuda_ipc_common / cuda_ipc_pack, so older imports keep working
           "HANDLE_HEX", "MIN_CHUNK_BYTES", "MIN_SLOT_BYTES", "PACK_SM_MAX_BYTES", "SM_COPY_MAX_BYTES", "Slot",
           "copy_ranges", "pow2_at_least", "view", "wait_event"]
