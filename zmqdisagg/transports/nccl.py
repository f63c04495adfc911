"""``nccl``: a private 2-rank communicator per connection; gloo when the tensors are on the CPU.

Guarantees:

* **Private.** Each connection builds its own communicator: NCCL from a unique id that travels in the
  hello reply (cupy's ``NcclCommunicator``), or gloo from a ``TCPStore`` that this transport owns on a
  free port. No default process group is created or touched, so the trainer's DP groups and the
  server's TP groups never see us. The server is rank 0, the client rank 1.
* **Never blocks the server thread.** Joining the communicator (which waits for the client) and the
  first send (which sets up NCCL's P2P connection) run on a per-connection worker thread; once warm, a
  send is only enqueued on the dedicated stream. ``put`` records an event on the caller's stream and
  returns; ``Delivery.start`` posts the grouped send after the reply header is on the wire.
* **One group per reply.** NCCL: one ``ncclSend`` per tensor inside one group, straight from the
  server's tensors into the client's fresh outputs (no staging copy on either side). Gloo (one tensor
  per send): the reply is packed into one buffer and the client returns views of the received buffer.
* **Bounded.** Every transfer has a deadline (``ctx.transfer_timeout_s``). A watchdog thread polls the
  transfers in flight (CUDA event, ``ncclCommGetAsyncError``, gloo work) and aborts the communicator on
  an error or a missed deadline; the transfer then raises ``PeerTimeout`` or ``TransportUnavailable``
  and every later call says the connection is gone, so the caller closes it and re-handshakes.
  Never retry a reply whose transfer started: the two ranks would disagree on what comes next.

NCCL settings that matter (read once per process, when the first communicator is built):
``NCCL_P2P_DISABLE``/``NCCL_SHM_DISABLE`` force the network path; ``NCCL_IB_HCA``,
``NCCL_SOCKET_IFNAME``, ``NCCL_IB_GID_INDEX`` (RoCE), ``NCCL_NET_GDR_LEVEL`` and
``NCCL_NCHANNELS_PER_NET_PEER`` tune IB/RoCE; see ``docs/benchmarks/transfer.md``.

Where the rest lives: ``nccl_transfer`` (a reply's ``Work`` handle with its deadline, and the worker
thread), ``nccl_gloo`` (the CPU link) and ``native.nccl_comm`` (``NcclPair``, the GPU link).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Mapping, Sequence

import torch

from zmqdisagg.errors import PeerTimeout, ProtocolMismatch, TransportUnavailable
from zmqdisagg.native.nccl_comm import CLIENT_RANK, SERVER_RANK, NcclPair, nccl_missing
from zmqdisagg.protocol.tensor_meta import TensorMeta, from_bytes, layout
from zmqdisagg.transports._closing import Closing
from zmqdisagg.transports.base import Delivery, TransportContext
from zmqdisagg.transports.nccl_gloo import JOIN_TIMEOUT_S, GlooLink, pack_cpu
from zmqdisagg.transports.nccl_transfer import Transfer, Worker, run_into

logger = logging.getLogger(__name__)

WATCHDOG_PERIOD_S = 0.05


class NcclTransport(Closing):
    """One side of one connection's communicator (NCCL for CUDA devices, gloo for the CPU)."""

    name = "nccl"

    def __init__(self, ctx: TransportContext) -> None:
        self.ctx = ctx
        self.device = torch.device(ctx.device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.backend == "nccl" and (why := nccl_missing()):
            raise TransportUnavailable(f"nccl transport on {ctx.device}: {why}")
        self._rank = SERVER_RANK if ctx.role == "server" else CLIENT_RANK
        self._worker = Worker(f"zmqdisagg-nccl-{ctx.connection_id[:12]}")
        self._link: GlooLink | NcclPair | None = None
        self._joined: Future | None = None
        self._inflight: list[Transfer] = []
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._warm = False  # after one completed transfer, posting no longer blocks (connections exist)
        self._tag = 0  # gloo message tag, the same sequence on both ranks
        self._watchdog: threading.Thread | None = None
        self.closed = False

    @staticmethod
    def probe() -> str | None:
        """The transport runs wherever gloo does; NCCL is checked when a CUDA connection is built."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_gloo_available():
            return "torch.distributed with gloo is not available in this torch build"
        return None

    # -- handshake ---------------------------------------------------------------------------------
    def offer(self) -> dict[str, Any]:
        """Server: create the rendezvous and start joining it on the worker thread."""
        self._require_role("server")
        link = NcclPair(self.device) if self.backend == "nccl" else GlooLink(self.ctx)
        offer = {"backend": self.backend, **link.rendezvous()}
        self._link = link
        self._joined = self._worker.submit(link.join, SERVER_RANK, offer)
        return offer

    def accept(self, offer: Mapping[str, Any]) -> None:
        """Client: join the server's communicator, waiting at most ``transfer_timeout_s``."""
        self._require_role("client")
        backend = offer.get("backend")
        if backend != self.backend:
            raise TransportUnavailable(
                f"server's nccl transport runs {backend} but this client's tensors are on {self.ctx.device}; "
                "put both sides on GPU (NCCL) or both on CPU (gloo), or pick another transport")
        self._link = NcclPair(self.device) if backend == "nccl" else GlooLink(self.ctx)
        self._joined = self._worker.submit(self._link.join, CLIENT_RANK, dict(offer))
        try:
            self._joined.result(timeout=self.ctx.transfer_timeout_s)
        except TimeoutError:
            self._abort("join timed out")
            raise PeerTimeout(f"could not join the server's {backend} communicator within "
                              f"{self.ctx.transfer_timeout_s:g}s; is the server alive and reachable?") from None
        except Exception as e:
            raise TransportUnavailable(f"joining the server's {backend} communicator failed: {e}") from e

    # -- server ------------------------------------------------------------------------------------
    def put(self, tensors: Mapping[str, torch.Tensor]) -> Delivery:
        self._require_role("server")
        self._check_usable()
        metas, _ = layout(dict(tensors))
        srcs = [t.detach() for t in tensors.values()]
        if not any(m.nbytes for m in metas):
            return Delivery(note={}, metas=tuple(metas))  # nothing to move; the client posts nothing either
        if self.backend == "gloo":
            staged, tag = pack_cpu(srcs, metas), self._next_tag()
            return Delivery(note={"tag": tag}, metas=tuple(metas),
                            start=lambda: self._start(lambda link: link.send([staged], tag), staged))
        srcs = [t.contiguous() for t in srcs]
        ready = _record(self.device)
        return Delivery(note={}, metas=tuple(metas),
                        start=lambda: self._start(lambda link: link.send(srcs, ready), srcs))

    def _start(self, post: Callable[[Any], Callable[[], bool]], keep: Any) -> Transfer:
        self._check_usable()
        nbytes = sum(t.numel() * t.element_size() for t in (keep if isinstance(keep, list) else [keep]))
        return self._post(post, keep, f"{self.backend} send of {nbytes} bytes to {self.ctx.connection_id}")

    def release(self, slot: int) -> None:
        return None  # nothing is held between replies

    # -- client ------------------------------------------------------------------------------------
    def get(self, note: Mapping[str, Any], metas: Sequence[TensorMeta],
            frames: Sequence[Any]) -> dict[str, torch.Tensor]:
        self._require_role("client")
        self._check_usable()
        if self.backend == "gloo":
            total = max((m.offset + m.nbytes for m in metas), default=0)
            buf = torch.empty(total, dtype=torch.uint8)
            if total:
                try:
                    tag = int(note["tag"])
                except (KeyError, TypeError, ValueError):
                    raise ProtocolMismatch(f"gloo delivery note {dict(note)!r} lacks an integer tag") from None
                self._post(lambda link: link.recv([buf], tag), buf, f"gloo receive of {total} bytes").wait()
            return {m.name: from_bytes(buf, m) for m in metas}
        outs = [torch.empty(m.shape, dtype=m.torch_dtype, device=self.device) for m in metas]
        if not any(m.nbytes for m in metas):
            return {m.name: o for m, o in zip(metas, outs)}  # the server posted nothing either
        ready = _record(self.device)
        self._post(lambda link: link.recv(outs, ready), outs,
                   f"nccl receive of {sum(m.nbytes for m in metas)} bytes").wait()
        torch.cuda.current_stream(self.device).wait_stream(self._link.stream)  # order the caller after it
        return {m.name: o for m, o in zip(metas, outs)}

    # -- both --------------------------------------------------------------------------------------
    def _post(self, post: Callable[[Any], Callable[[], bool]], keep: Any, what: str) -> Transfer:
        link, joined = self._link, self._joined
        if link is None or joined is None:
            raise TransportUnavailable("nccl transport used before offer/accept")

        def run() -> None:
            joined.result()  # the communicator must exist first (server: the client has joined)
            transfer._done = post(link)

        transfer = Transfer(self, Future(), what)
        transfer.keep = keep
        if self._warm and self.backend == "nccl" and joined.done():
            run_into(transfer._posted, run)  # enqueue only: returns at once
        else:
            transfer._posted = self._worker.submit(run)
        with self._lock:
            self._inflight.append(transfer)
        self._ensure_watchdog()
        return transfer

    def _next_tag(self) -> int:
        self._tag += 1
        return self._tag

    def _ensure_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                              name=f"zmqdisagg-nccl-watchdog-{self.ctx.connection_id[:12]}")
            self._watchdog.start()

    def _watch(self) -> None:
        while not self.closed:
            with self._lock:
                live = list(self._inflight)
            done = [t for t in live if t.is_completed()]
            with self._lock:
                self._inflight = [t for t in self._inflight if t not in done]
            time.sleep(WATCHDOG_PERIOD_S)

    def _abort(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
            logger.warning("aborting %s communicator of connection %s: %s", self.backend,
                           self.ctx.connection_id, reason)
        if self._link is not None:
            self._link.abort()

    def _check_usable(self) -> None:
        if self.closed:
            raise TransportUnavailable("nccl transport is closed; handshake again")
        if self._broken is not None:
            raise TransportUnavailable(f"nccl connection was aborted ({self._broken}); close it and handshake again")

    def _require_role(self, role: str) -> None:
        if self.ctx.role != role:
            raise ProtocolMismatch(f"this nccl transport is the {self.ctx.role} side; that call is the {role}'s")

    def close(self) -> None:
        """Abort the communicator if anything is in flight, else destroy it; idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._link is not None:
            with self._lock:
                busy = any(not t._finished for t in self._inflight)
            self._link.close(abort=busy or self._broken is not None)
        self._worker.stop()


def _record(device: torch.device) -> torch.cuda.Event:
    """An event on ``device``'s current stream: the communicator stream waits for it."""
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(device))
    return ev


__all__ = ["JOIN_TIMEOUT_S", "NcclTransport", "WATCHDOG_PERIOD_S"]
