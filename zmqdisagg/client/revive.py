"""Servers that are down: a start that goes on without them, and their re-admission once they answer.

``connect_all`` opens the first connections in parallel, so a start with servers down costs one
``connect_timeout_s``, not one per server, and tells which servers answered and why the others did not.

``Reviver`` watches the servers ``RemoteTarget`` marked dead. Each gets a *probe*: a REQ socket that
asks for ``info``, an op that needs no connection, so a probe leaves no state on the server. A probe is
sent ``delay`` after the server died (``revive_s``; at once for a server down at start) and sent again on
a fresh socket every ``revive_s``; ZeroMQ keeps reconnecting underneath, so a server that comes back
answers the probe queued for it. Probes are sent and polled without waiting, from the routing path, so a
server that is still dead costs a data call nothing::

    dead --(revive_s)--> probe sent --answer, same ModelInfo--> claimed --connect--> re-admitted
                           ^   |  no answer within revive_s: fresh socket, same probe   |
                           |   +-- answer with another ModelInfo: error logged          |
                           +--------------------- handshake failed ---------------------+

Only an answered probe with the same ``ModelInfo`` is *claimed*, by one call at a time, which then
pays for ``connect``: hello within ``min(connect_timeout_s, attempt_timeout_s)``, the transport trial,
and the replay of the last ``configure``, so results stay bitwise those of the servers never lost.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import torch
import zmq

from zmqdisagg.client.connection import ServerConnection
from zmqdisagg.client.lane import open_req
from zmqdisagg.config import ClientConfig
from zmqdisagg.errors import ConfigError, PeerTimeout, TransportUnavailable
from zmqdisagg.protocol import codec
from zmqdisagg.protocol import messages as m
from zmqdisagg.protocol.messages import Header
from zmqdisagg.target.types import ModelInfo

logger = logging.getLogger(__name__)

DOWN = (PeerTimeout, TransportUnavailable, zmq.ZMQError)  # failures after which a connection cannot serve again
Configured = tuple[dict, torch.Tensor | None]  # the last configure(settings wire form, t2d)


def connect_all(addresses: Sequence[str], config: ClientConfig,
                ctx: zmq.Context) -> tuple[dict[str, ServerConnection], dict[str, str]]:
    """Connect to every address at once. Returns the connections and, for each server that is down
    (a ``DOWN`` failure), why; any other error (a wrong key, another schema version) is raised."""
    with ThreadPoolExecutor(len(addresses), thread_name_prefix="zmqdisagg-connect") as pool:
        futures = {a: pool.submit(ServerConnection, a, config, ctx) for a in addresses}
    conns: dict[str, ServerConnection] = {}
    down: dict[str, str] = {}
    errors = []
    for address, future in futures.items():
        e = future.exception()
        if e is None:
            conns[address] = future.result()
        elif isinstance(e, DOWN):
            down[address] = f"{type(e).__name__}: {e}"
        else:
            errors.append(e)
    if errors:
        for conn in conns.values():
            conn.close()
        raise errors[0]
    return conns, down


class Reviver:
    """Probes of dead servers, sent and polled without waiting. Thread-safe."""

    def __init__(self, config: ClientConfig, ctx: zmq.Context, info: ModelInfo) -> None:
        self.config = config
        self.info = info  # what a server must serve to be re-admitted
        self._ctx = ctx
        self._lock = threading.Lock()  # guards everything below; a probe socket is used under it only
        self._probes: dict[str, zmq.Socket] = {}
        self._due: dict[str, float] = {}  # address -> when its probe is sent (again)
        self._claimed: set[str] = set()  # addresses some call is connecting to now
        self.closed = False

    def watch(self, address: str, delay: float) -> None:
        """``address`` is dead from now on: probe it ``delay`` seconds from now, then every ``revive_s``."""
        with self._lock:
            self._drop(address)
            self._due[address] = time.monotonic() + delay

    def answered(self, dead: Iterable[str]) -> str | None:
        """Send the probes that are due, and claim one dead server whose probe came back with our model.

        Never waits. The caller must ``connect`` to a claimed address and then ``release`` it."""
        now = time.monotonic()
        with self._lock:
            if self.closed:
                return None
            for address in dead:
                if address in self._claimed or address not in self._due:
                    continue
                if now >= self._due[address]:
                    self._send(address, now)
                if self._answer(address) == self.info:
                    self._drop(address)
                    self._claimed.add(address)
                    return address
        return None

    def connect(self, address: str, configured: Configured | None) -> ServerConnection:
        """A fresh connection to a claimed ``address`` serving our model, with ``configured`` replayed."""
        quick = min(self.config.connect_timeout_s, self.config.attempt_timeout_s)
        conn = ServerConnection(address, dataclasses.replace(self.config, connect_timeout_s=quick), self._ctx)
        try:
            if conn.info != self.info:
                raise ConfigError(f"{address} now serves {conn.info}, not {self.info}; restart it with the "
                                  "same --model as the other servers")
            if configured is not None:
                conn.configure(*configured)
        except BaseException:
            conn.close()
            raise
        return conn

    def release(self, address: str, admitted: bool) -> None:
        """End a claim: done with ``address``, or probe it again in ``revive_s``."""
        with self._lock:
            self._claimed.discard(address)
            if admitted:
                self._due.pop(address, None)
            else:
                self._due[address] = time.monotonic() + self.config.revive_s

    # -- probes (under self._lock) -----------------------------------------------------------------
    def _send(self, address: str, now: float) -> None:
        self._drop(address)
        self._due[address] = now + self.config.revive_s
        try:  # send timeout 0: never wait here, we hold the lock on the routing path
            sock = self._probes[address] = open_req(self._ctx, address, self.config.curve(), send_timeout_ms=0)
            codec.send(sock, Header(op=m.INFO, client_id=f"probe-{uuid.uuid4().hex}"))
        except zmq.ZMQError as e:  # ZeroMQ queues it even while the server is down; this is unexpected
            logger.debug("probe of %s could not be sent: %s", address, e)
            self._drop(address)

    def _answer(self, address: str) -> ModelInfo | None:
        """The model info in the probe's reply, if one has arrived (logged if it is not ours)."""
        sock = self._probes.get(address)
        if sock is None or not sock.poll(0):
            return None
        try:
            reply = codec.decode(codec.recv(sock)[0])
            if reply.op != m.OK:
                raise TransportUnavailable(f"{reply.body.get('code')}: {reply.body.get('message')}")
            info = ModelInfo.from_wire(reply.body["info"])
        except Exception as e:  # another schema version, a bad reply: it stays out until the next probe
            logger.error("server %s answered its probe with an error (%s); it stays out of rotation", address, e)
            return None
        finally:
            self._drop(address)
        if info != self.info:
            logger.error("server %s is back but serves %s, not %s like the other servers; it stays out of "
                         "rotation: restart it with the same --model (and --dtype, --device)", address, info,
                         self.info)
        return info

    def _drop(self, address: str) -> None:
        sock = self._probes.pop(address, None)
        if sock is not None:
            sock.close(linger=0)

    def close(self) -> None:
        """Close every probe socket. Idempotent."""
        with self._lock:
            self.closed = True
            for address in list(self._probes):
                self._drop(address)
