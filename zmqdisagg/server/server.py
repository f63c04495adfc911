"""``TargetServer``: one ROUTER socket, one thread, every client.

The thread that owns the model is the only thread that touches the socket, the model and the
transports, so nothing needs a lock and no two threads ever issue collectives: with ``--tp``, the
broadcast to the other ranks happens inside ``model.compute``, on this same thread. Requests from
many clients and lanes queue in the ROUTER and are served in arrival order.

Per message: check size -> decode header -> apply piggybacked releases -> refresh the lease ->
replay the cached reply if this is a retry -> run the handler -> send the reply -> start the
transfer (communicator transports). Any exception becomes a typed ``error`` reply to that client
only, except ``RankFailed`` (a broken tensor-parallel group), which ends ``serve_forever``.

With ``--batch-tokens N`` the loop drains every message already queued (it never waits for more).
Fresh eagle3/dflash requests become ``batching.Job``s; they run, packed, right before the next
message of another kind (so effects keep their arrival order) and at the end of the round. Each
job's reply, idempotency-cache entry, transfer and error are those it would get if served alone.
Between rounds the loop reaps expired leases and late transfers, and lets a TP model ping its ranks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import zmq

from zmqdisagg import transports
from zmqdisagg.config import ServeConfig
from zmqdisagg.errors import BadRequest, ProtocolMismatch, UnknownClient, ZmqDisaggError
from zmqdisagg.protocol import codec
from zmqdisagg.protocol import messages as m
from zmqdisagg.protocol.messages import Header
from zmqdisagg.server import handlers
from zmqdisagg.server.batching import Batcher, Job
from zmqdisagg.server.connection import PendingWork
from zmqdisagg.server.handlers import HANDLERS, ServerState
from zmqdisagg.server.tp import RankFailed
from zmqdisagg.server.utilisation import Utilisation
from zmqdisagg.topology import local_identity
from zmqdisagg.transports.shm import sweep_stale

logger = logging.getLogger(__name__)

POLL_MS = 100  # how often the loop wakes to reap leases and check the stop flag
MAX_DRAIN = 256  # most queued messages taken in one round when batching
COMPUTE_OPS = frozenset({m.EAGLE3, m.DFLASH})


class TargetServer:
    """Serve ``model`` on ``config.bind`` until ``stop()`` is called (from any thread or a signal)."""

    def __init__(self, model: Any, config: ServeConfig) -> None:
        self.config = config
        removed = sweep_stale()
        if removed:
            logger.info("removed %d shared-memory segments left by dead servers", removed)
        offered = transports.available()
        self.utilisation = Utilisation()
        self.state = ServerState(model=model, config=config, identity=local_identity(config.device, offered),
                                 utilisation=self.utilisation)
        self._batcher = Batcher(budget=config.batch_tokens, utilisation=self.utilisation) \
            if config.batch_tokens else None
        self._keepalive = getattr(model, "keepalive", None)  # a ShardedTarget pings and watches its ranks
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._auth = None
        if config.curve_secret_key:
            from zmqdisagg.security import ServerAuth
            self._auth = ServerAuth(self._ctx, config.curve_secret_key, config.curve_authorized_dir or "")
        self._sock = self._ctx.socket(zmq.ROUTER)
        if self._auth is not None:
            self._auth.apply(self._sock)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 4 * config.max_request_bytes)
        self._sock.bind(config.bind)
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.offered = offered
        self._closed = False

    def stop(self) -> None:
        """Ask the loop to finish its current message and return (safe from signal handlers)."""
        self._stop.set()

    def serve_forever(self) -> None:
        """Run the loop until ``stop()``; the caller closes the server afterwards."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        next_reap = 0.0
        while not self._stop.is_set():
            if poller.poll(POLL_MS):
                started = time.monotonic()
                self._serve_round(self._drain())
                self.utilisation.busy(started, time.monotonic())
            now = time.monotonic()
            if now >= next_reap:
                self._reap(now)
                next_reap = now + 0.2
            if self._keepalive is not None:
                self._keepalive()

    def _drain(self) -> list[list[Any]]:
        """The message that woke us, plus (when batching) every message already queued behind it.

        Each message is ``[*envelope, header, *frames]``: envelope and header as bytes, frames zero-copy.
        """
        messages = [codec.recv(self._sock, routed=True)]
        while self._batcher is not None and len(messages) < MAX_DRAIN:
            try:
                messages.append(codec.recv(self._sock, zmq.NOBLOCK, routed=True))
            except zmq.Again:
                break
        return messages

    def _serve_round(self, messages: list[list[Any]]) -> None:
        jobs: list[Job] = []  # admitted eagle3/dflash requests waiting to run together (batching only)
        for parts in messages:
            self._serve_one(parts, jobs)
        self._run_jobs(jobs)

    def _serve_one(self, parts: list[Any], jobs: list[Job]) -> None:
        try:
            split = parts.index(b"")  # the envelope is bytes (codec.recv), so this finds its delimiter
        except ValueError:
            logger.warning("dropping a message without a REQ envelope")
            return
        envelope = parts[:split + 1]
        header_frame, frames = parts[split + 1] if len(parts) > split + 1 else None, parts[split + 2:]
        header = Header(op=m.ERROR)
        try:
            if header_frame is None:
                raise ProtocolMismatch("message has no header frame")
            size = sum(len(p) for p in parts[split + 1:])
            if size > self.config.max_request_bytes:
                raise BadRequest(f"request of {size} bytes is over the {self.config.max_request_bytes}-byte limit")
            header = codec.decode(header_frame)
            self._reply(envelope, header, frames, jobs)
        except RankFailed:
            raise
        except Exception as e:
            self._send_error(envelope, header, e)

    def _reply(self, envelope: list[bytes], header: Header, frames: list, jobs: list[Job]) -> None:
        if header.op not in m.REQUEST_OPS:
            raise BadRequest(f"unknown op {header.op!r}; expected one of {sorted(m.REQUEST_OPS)}")
        state = self.state
        state.counters["requests"] += 1
        batchable = self._batcher is not None and header.op in COMPUTE_OPS
        if jobs and (not batchable or any(_same_lane(j.header, header) for j in jobs)):
            self._run_jobs(jobs)  # keep arrival order; a retry then finds its original in the cache
        conn = state.connections.get(header.client_id)
        if conn is not None:
            conn.touch()
            if header.releases:
                conn.release(header.releases)
            cached = conn.cached(header) if header.op in m.DATA_OPS else None
            if cached is not None and cached.delivery is not None and cached.delivery.start is not None:
                # A communicator transfer cannot be replayed: its send was posted once already. Start the
                # client over on a fresh connection; it retries the request there.
                state.drop(header.client_id, "retried a communicator transfer")
                raise UnknownClient("the reply's transfer was already sent; reconnecting and retrying")
            if cached is not None:
                state.counters["retries"] += 1
                logger.info("client %s retried request %d; replaying its reply", header.client_id,
                            header.request_id)
                self._send(envelope, cached.header, cached.delivery, conn, start=False)
                return
        if batchable:
            jobs.append(handlers.admit(state, envelope, header, frames))
            return
        reply, delivery = HANDLERS[header.op](state, header, frames)
        self._finish(envelope, header, reply, delivery)

    def _run_jobs(self, jobs: list[Job]) -> None:
        """Run the queued jobs (packed) and answer each as if it had been served alone."""
        if not jobs:
            return
        pending = list(jobs)
        jobs.clear()
        self._batcher.run(self.state.model, pending)
        for job in pending:
            try:
                if job.error is not None:
                    raise job.error
                reply, delivery = handlers.deliver(job.conn, job.header, job.outputs)
            except Exception as e:
                self._send_error(job.envelope, job.header, e)
                continue
            self._finish(job.envelope, job.header, reply, delivery)

    def _finish(self, envelope: list[bytes], header: Header, reply: Header, delivery: Any) -> None:
        conn = self.state.connections.get(header.client_id)
        if conn is not None and header.op in m.DATA_OPS:
            conn.remember(header, reply, delivery)
        self._send(envelope, reply, delivery, conn, start=True)

    def _send(self, envelope: list[bytes], reply: Header, delivery: Any, conn: Any, start: bool) -> None:
        frames = delivery.frames if delivery is not None else []
        try:
            codec.send(self._sock, reply, frames, envelope=envelope)
        except zmq.ZMQError as e:  # the client's socket is gone (EHOSTUNREACH); its lease will expire
            logger.info("could not reply to client %s: %s", reply.client_id, e)
            return
        if start and delivery is not None and delivery.start is not None and conn is not None:
            deadline = time.monotonic() + self.config.transfer_timeout_s
            conn.pending.append(PendingWork(work=delivery.start(), deadline=deadline))

    def _send_error(self, envelope: list[bytes], header: Header, e: Exception) -> None:
        self.state.counters["errors"] += 1
        if isinstance(e, ZmqDisaggError):
            code, message = e.code, str(e)
            logger.info("request %s from %s refused: %s: %s", header.op, header.client_id, code, message)
        else:
            code, message = "RemoteError", f"server failed on {header.op}: {type(e).__name__}: {e}"
            logger.exception("request %s from %s failed", header.op, header.client_id)
        try:
            codec.send(self._sock, header.error(code, message), envelope=envelope)
        except zmq.ZMQError as err:
            logger.info("could not send error to client %s: %s", header.client_id, err)

    def _reap(self, now: float) -> None:
        for cid, conn in list(self.state.connections.items()):
            if conn.expired(now):
                self.state.drop(cid, f"lease of {conn.lease_s}s expired")
                continue
            problem = conn.poll_pending(now)
            if problem:
                self.state.drop(cid, problem)

    def close(self) -> None:
        """Free every connection's resources, the socket and an ipc:// socket file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for cid in list(self.state.connections):
            self.state.drop(cid, "server shutting down")
        self._sock.close(linger=0)
        if self._auth is not None:
            self._auth.close()
        self._ctx.destroy(linger=0)  # closes any socket still open, so this can never hang
        if self.address.startswith("ipc://"):
            try:
                os.unlink(self.address[len("ipc://"):])
            except OSError:
                pass

    def __enter__(self) -> "TargetServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _same_lane(a: Header, b: Header) -> bool:
    return a.client_id == b.client_id and a.lane == b.lane
