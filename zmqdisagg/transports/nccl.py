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
"""

from __future__ import annotations

import datetime
import logging
import secrets
import socket
import threading
import time
import queue
from concurrent.futures import Future
from typing import Any, Callable, Mapping, Sequence

import torch

from zmqdisagg.errors import PeerTimeout, ProtocolMismatch, TransportUnavailable
from zmqdisagg.native.nccl_comm import CLIENT_RANK, SERVER_RANK, NcclPair, nccl_missing
from zmqdisagg.protocol.tensor_meta import TensorMeta, as_bytes, from_bytes, layout
from zmqdisagg.transports.base import Delivery, TransportContext

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 60.0  # joining waits for the client's handshake, so it gets more than one transfer
WATCHDOG_PERIOD_S = 0.05


class _Transfer:
    """One reply's send or receive in flight; implements ``Work``.

    ``is_completed`` never raises: it is True once the bytes moved *or* the transfer failed, and then
    ``error`` says which (None on success). ``wait`` raises the failure.
    """

    __slots__ = ("_owner", "_posted", "_done", "_deadline", "_what", "error", "_finished", "keep")

    def __init__(self, owner: "NcclTransport", posted: Future, what: str) -> None:
        self._owner, self._posted, self._what = owner, posted, what
        self._done: Callable[[], bool] | None = None  # set by the poster: link-level completion check
        self._deadline = time.monotonic() + owner.ctx.transfer_timeout_s
        self.error: BaseException | None = None
        self._finished = False
        self.keep: Any = None  # tensors that must stay alive until the bytes have moved

    def is_completed(self) -> bool:
        try:
            return self._poll()
        except Exception:
            return True  # failed; ``error`` holds why

    def wait(self, timeout: float | None = None) -> None:
        """Block until done (spinning for 2 ms, then 0.2 ms sleeps); raise if the transfer failed."""
        until = None if timeout is None else time.monotonic() + timeout
        start = time.monotonic()
        while not self._poll():
            if until is not None and time.monotonic() > until:
                raise PeerTimeout(f"{self._what} still running after {timeout:g}s")
            if time.monotonic() - start > 0.002:
                time.sleep(0.0002)

    def _poll(self) -> bool:
        if self._finished:
            return True
        if self.error is not None:
            raise self.error
        try:
            if self._posted.done():
                self._posted.result()  # re-raises a posting error
                if self._done is not None and self._done():
                    self._finished, self.keep = True, None
                    self._owner._warm = True
                    return True
        except Exception as e:  # the link reported an error (gloo's own deadline reads "Timed out")
            kind = PeerTimeout if any(w in str(e).lower() for w in ("timed out", "timeout")) else TransportUnavailable
            self._fail(kind(f"{self._what} failed: {e}; the connection was aborted, close it and "
                            "handshake again"))
        if time.monotonic() > self._deadline:
            self._fail(PeerTimeout(
                f"{self._what} did not finish within {self._owner.ctx.transfer_timeout_s:g}s: the peer is "
                "gone or not receiving; the communicator was aborted. Raise ZMQDISAGG_TRANSFER_TIMEOUT_S "
                "if the link is just slow"))
        return False

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
            self.keep = None
            self._owner._abort(str(error))
        raise self.error


class NcclTransport:
    """One side of one connection's communicator (NCCL for CUDA devices, gloo for the CPU)."""

    name = "nccl"

    def __init__(self, ctx: TransportContext) -> None:
        self.ctx = ctx
        self.device = torch.device(ctx.device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.backend == "nccl" and (why := nccl_missing()):
            raise TransportUnavailable(f"nccl transport on {ctx.device}: {why}")
        self._rank = SERVER_RANK if ctx.role == "server" else CLIENT_RANK
        self._worker = _Worker(f"zmqdisagg-nccl-{ctx.connection_id[:12]}")
        self._link: _GlooLink | NcclPair | None = None
        self._joined: Future | None = None
        self._inflight: list[_Transfer] = []
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
        link = NcclPair(self.device) if self.backend == "nccl" else _GlooLink(self.ctx)
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
        self._link = NcclPair(self.device) if backend == "nccl" else _GlooLink(self.ctx)
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
            staged, tag = _pack_cpu(srcs, metas), self._next_tag()
            return Delivery(note={"tag": tag}, metas=tuple(metas),
                            start=lambda: self._start(lambda link: link.send([staged], tag), staged))
        srcs = [t.contiguous() for t in srcs]
        ready = _record(self.device)
        return Delivery(note={}, metas=tuple(metas),
                        start=lambda: self._start(lambda link: link.send(srcs, ready), srcs))

    def _start(self, post: Callable[[Any], Callable[[], bool]], keep: Any) -> _Transfer:
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
    def _post(self, post: Callable[[Any], Callable[[], bool]], keep: Any, what: str) -> _Transfer:
        link, joined = self._link, self._joined
        if link is None or joined is None:
            raise TransportUnavailable("nccl transport used before offer/accept")

        def run() -> None:
            joined.result()  # the communicator must exist first (server: the client has joined)
            transfer._done = post(link)

        transfer = _Transfer(self, Future(), what)
        transfer.keep = keep
        if self._warm and self.backend == "nccl" and joined.done():
            _run_into(transfer._posted, run)  # enqueue only: returns at once
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

    def __enter__(self) -> "NcclTransport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class _Worker:
    """One daemon thread running jobs in order: joins and first sends, which may block on the peer.

    A daemon, so a join whose peer never comes (a client that died between hello and accept) can
    never keep the process from exiting.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        self._jobs.put((fut, fn, args))
        return fut

    def stop(self) -> None:
        self._jobs.put(None)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn, args = job
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:
                    fut.set_exception(e)


def _run_into(fut: Future, fn: Callable[[], None]) -> None:
    try:
        fn()
        fut.set_result(None)
    except BaseException as e:  # surfaced by _Transfer.is_completed
        fut.set_exception(e)


def _record(device: torch.device) -> torch.cuda.Event:
    """An event on ``device``'s current stream: the communicator stream waits for it."""
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(device))
    return ev


def _pack_cpu(tensors: Sequence[torch.Tensor], metas: Sequence[TensorMeta]) -> torch.Tensor:
    total = max((m.offset + m.nbytes for m in metas), default=0)
    buf = torch.empty(total, dtype=torch.uint8)
    for t, m in zip(tensors, metas):
        buf[m.offset:m.offset + m.nbytes].copy_(as_bytes(t.cpu()))
    return buf


class _GlooLink:
    """A private ``ProcessGroupGloo`` of two ranks over a ``TCPStore`` that the server side owns."""

    def __init__(self, ctx: TransportContext) -> None:
        self.ctx = ctx
        self.timeout = datetime.timedelta(seconds=ctx.transfer_timeout_s)  # per send/receive
        self.join_timeout = datetime.timedelta(seconds=max(JOIN_TIMEOUT_S, ctx.transfer_timeout_s))
        self.store: Any = None
        self.pg: Any = None
        self._aborted = False

    def rendezvous(self) -> dict[str, Any]:
        from torch.distributed import TCPStore

        self.store = TCPStore("0.0.0.0", 0, None, True, timeout=self.join_timeout, wait_for_workers=False)
        addr = _host_address()
        hosts = [addr] + (["127.0.0.1"] if addr != "127.0.0.1" else [])
        return {"hosts": hosts, "port": int(self.store.port), "prefix": f"zmqdisagg/{secrets.token_hex(8)}/"}

    def join(self, rank: int, offer: Mapping[str, Any]) -> None:
        from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

        if rank == SERVER_RANK:
            local = _host_address()
        else:
            host, local = _reachable(offer["hosts"], int(offer["port"]), self.ctx.transfer_timeout_s)
            self.store = TCPStore(host, int(offer["port"]), None, False, timeout=self.join_timeout)
        opts = ProcessGroupGloo._Options()
        opts._devices = [ProcessGroupGloo.create_device(hostname=local)]
        opts._timeout = self.join_timeout
        pg = ProcessGroupGloo(PrefixStore(str(offer["prefix"]), self.store), rank, 2, opts)
        if self._aborted:
            raise TransportUnavailable("connection closed while joining")
        self.pg = pg

    # Gloo point-to-point work completes only inside ``wait()``, so these run on the worker thread and
    # return once the bytes have moved (or gloo's own timeout, the transfer deadline, has passed).
    def send(self, tensors: Sequence[torch.Tensor], tag: int) -> Callable[[], bool]:
        self.pg.send(list(tensors), CLIENT_RANK, tag).wait(self.timeout)
        return _true

    def recv(self, tensors: Sequence[torch.Tensor], tag: int) -> Callable[[], bool]:
        self.pg.recv(list(tensors), SERVER_RANK, tag).wait(self.timeout)
        return _true

    def abort(self) -> None:
        self._aborted = True
        pg, self.pg = self.pg, None
        if pg is not None:
            try:
                pg.abort()
            except Exception as e:  # older torch: dropping the group closes its sockets
                logger.debug("gloo abort: %s", e)

    def close(self, abort: bool) -> None:
        if abort:
            self.abort()
        self.pg = None
        self.store = None


def _true() -> bool:
    return True


def _host_address() -> str:
    """This host's address as peers see it (hostname lookup), else loopback."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _reachable(hosts: Sequence[str], port: int, timeout: float) -> tuple[str, str]:
    """First of ``hosts`` that accepts a TCP connection on ``port``, and our address toward it."""
    errors = []
    for host in hosts:
        try:
            with socket.create_connection((host, port), timeout=min(timeout, 5.0)) as s:
                return host, s.getsockname()[0]
        except OSError as e:
            errors.append(f"{host}:{port} ({e})")
    raise TransportUnavailable(f"cannot reach the server's gloo rendezvous at {', '.join(errors)}")
