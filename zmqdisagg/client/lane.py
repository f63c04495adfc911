"""``Lane``: one REQ socket to one server, carrying one request at a time, with timeouts and retry.

A REQ socket that lost its reply is stuck (it cannot send again), so a retry closes it with linger 0,
opens a fresh one and sends the *same* header (same request id). The server answers a repeated
``(client, lane, request id)`` with the reply it already computed, so a retry is idempotent.

Timeouts: each attempt waits ``attempt_timeout_s``; the request gives up after ``request_timeout_s``
in total and raises ``PeerTimeout``. An ``error`` reply is raised as its typed error class.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import zmq

from zmqdisagg.errors import PeerTimeout, from_code
from zmqdisagg.protocol import codec
from zmqdisagg.protocol import messages as m
from zmqdisagg.protocol.messages import Header
from zmqdisagg.security import apply_client

logger = logging.getLogger(__name__)


def open_req(ctx: zmq.Context, address: str, curve: tuple[str, str] | None, *, send_timeout_ms: int = -1) -> zmq.Socket:
    """A REQ socket to ``address`` (no linger; CURVE when ``curve`` names the key files), connected."""
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
    try:
        if curve:
            apply_client(sock, *curve)
        sock.connect(address)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


class Lane:
    """One in-flight request at a time to ``address``; not thread-safe (one user at a time)."""

    def __init__(self, ctx: zmq.Context, address: str, index: int, *, attempt_timeout_s: float,
                 request_timeout_s: float, curve: tuple[str, str] | None = None) -> None:
        self.address = address
        self.index = index
        self.attempt_timeout_s = attempt_timeout_s
        self.request_timeout_s = request_timeout_s
        self._ctx = ctx
        self._sock: zmq.Socket | None = None
        self._poller = zmq.Poller()  # registered once per socket, not per request as Socket.poll does
        self._curve = curve  # (server public key file, client secret key file)
        self.retries = 0

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = open_req(self._ctx, self.address, self._curve)
            self._poller.register(self._sock, zmq.POLLIN)
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._poller.unregister(self._sock)
            self._sock.close(linger=0)
            self._sock = None

    def request(self, header: Header, frames: Sequence[Any] = (), *,
                timeout_s: float | None = None) -> tuple[Header, list[zmq.Frame]]:
        """Send ``header`` + ``frames`` and return the ``ok`` reply (header, raw frames)."""
        budget = self.request_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + budget
        attempt = 0
        while True:
            sock = self._socket()
            codec.send(sock, header, frames)
            wait = min(self.attempt_timeout_s, max(0.0, deadline - time.monotonic()))
            if self._poller.poll(int(wait * 1000)):
                return self._check(header, codec.recv(sock))
            self._reset()
            attempt += 1
            if time.monotonic() >= deadline:
                raise PeerTimeout(
                    f"server {self.address} did not answer {header.op} (request {header.request_id}) "
                    f"within {budget:.1f}s over {attempt} attempts; check that zmqdisagg-serve is "
                    "running there, or raise ZMQDISAGG_REQUEST_TIMEOUT_S")
            self.retries += 1
            logger.warning("no reply from %s to %s request %d after %.1fs; retrying on a fresh socket",
                           self.address, header.op, header.request_id, wait)

    def _check(self, sent: Header, parts: list[Any]) -> tuple[Header, list[zmq.Frame]]:
        reply = codec.decode(parts[0])
        if reply.op == m.ERROR:
            raise from_code(str(reply.body.get("code")), str(reply.body.get("message")))
        if reply.request_id != sent.request_id or reply.lane != sent.lane:
            raise from_code("ProtocolMismatch",
                            f"reply for request {reply.request_id} on lane {reply.lane} arrived for "
                            f"request {sent.request_id} on lane {sent.lane}")
        return reply, parts[1:]

    def close(self) -> None:
        self._reset()
