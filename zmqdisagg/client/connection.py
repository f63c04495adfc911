"""``ServerConnection``: a client's link to one server: handshake, lanes, transport, releases.

Handshake: ``hello`` (our identity) -> the server picks a transport -> ``accept`` its offer -> a
``trial`` request moves a known pattern through it. If accepting or the trial fails, the transport is
excluded and the handshake starts again, down the ladder to ``inline``.

Lanes: up to ``max_lanes`` REQ sockets, one per request in flight; a thread takes a free lane for the
duration of one call. Slots the client has finished with are released by piggybacking their ids on the
next request from any lane. If the server forgets us (it restarted, or our lease expired), the
connection says hello again, replays its configuration, and retries the request once.
"""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
from typing import Any, Mapping

import torch
import zmq

from zmqdisagg import transports
from zmqdisagg.config import ClientConfig
from zmqdisagg.errors import PeerTimeout, ProtocolMismatch, TransportUnavailable, UnknownClient
from zmqdisagg.client.lane import Lane
from zmqdisagg.protocol import messages as m
from zmqdisagg.protocol.codec import tensor_frames
from zmqdisagg.protocol.messages import Header, trial_pattern
from zmqdisagg.target.types import ModelInfo
from zmqdisagg.topology import local_identity
from zmqdisagg.transports.base import TransportContext
from zmqdisagg.transports.select import Identity, verdicts

logger = logging.getLogger(__name__)


class ServerConnection:
    """Thread-safe client side of one server."""

    def __init__(self, address: str, config: ClientConfig, ctx: zmq.Context) -> None:
        self.address = address
        self.config = config
        self.client_id = uuid.uuid4().hex
        self._ctx = ctx
        self._rids = itertools.count(1)
        self._lock = threading.Lock()  # guards lanes, releases, counters and the request-id counter
        self._free = threading.Condition(self._lock)
        self._lanes: list[Lane] = []
        self._idle: list[Lane] = []
        self._releases: list[int] = []
        self._get_lock = threading.Lock()  # one transport.get at a time
        self._handshake_lock = threading.RLock()
        self._configured: tuple[dict, torch.Tensor | None] | None = None
        self.transport: Any = None
        self.transport_name = ""
        self.info: ModelInfo | None = None
        self.in_flight = 0
        self.closed = False
        self.identity = local_identity(config.device, transports.available())
        try:
            self.handshake()
        except BaseException:
            self.close(say_bye=False)  # free the lanes, or the caller's zmq context can never terminate
            raise

    # -- handshake ---------------------------------------------------------------------------------
    def handshake(self) -> None:
        """Say hello, pick and verify a transport, and replay any configuration."""
        with self._handshake_lock:
            excluded: set[str] = set()
            while True:
                reply = self._plain(m.HELLO, self._hello_body(sorted(excluded)),
                                    timeout_s=self.config.connect_timeout_s)
                name, server = str(reply.body["transport"]), Identity.from_wire(reply.body["identity"])
                known_bad = verdicts.excluded(server, self.identity) - excluded
                if name in known_bad and not self.config.transport:
                    excluded |= known_bad  # this GPU pair failed that trial before: skip it at once
                    continue
                try:
                    self._attach(name, reply.body)
                    verdicts.record(server, self.identity, name, True)
                    break
                except (TransportUnavailable, ProtocolMismatch, PeerTimeout) as e:
                    verdicts.record(server, self.identity, name, False, str(e))
                    logger.warning("transport %s to %s failed its trial (%s); trying the next one",
                                   name, self.address, e)
                    excluded.add(name)
                    if self.config.transport:
                        raise
            self.info = ModelInfo.from_wire(reply.body["info"])
            logger.info("connected to %s via %s (%s)", self.address, name, reply.body.get("reason"))
            if self._configured is not None:
                self._call(m.CONFIGURE, *self._configured_request())

    def _hello_body(self, excluded: list[str]) -> dict[str, Any]:
        return {"identity": self.identity.to_wire(), "exclude": excluded, "transport": self.config.transport}

    def _attach(self, name: str, body: Mapping[str, Any]) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        ctx = TransportContext(role="client", connection_id=self.client_id, device=self.config.device,
                               transfer_timeout_s=self.config.transfer_timeout_s)
        transport = transports.create(name, ctx)
        transport.accept(body.get("offer") or {})
        self.transport, self.transport_name = transport, name
        _, out = self._call(m.TRIAL)
        got, want = out["trial"].cpu(), trial_pattern()
        if not torch.equal(got, want):
            raise TransportUnavailable(f"trial transfer over {name} returned wrong bytes")

    # -- requests ----------------------------------------------------------------------------------
    def configure(self, settings_wire: dict, t2d: torch.Tensor | None) -> dict:
        self._configured = (settings_wire, t2d)
        reply, _ = self._call(m.CONFIGURE, *self._configured_request())
        return dict(reply.body["settings"])

    def _configured_request(self) -> tuple[dict, dict[str, torch.Tensor]]:
        settings_wire, t2d = self._configured
        return {"settings": settings_wire}, ({"t2d": t2d.cpu()} if t2d is not None else {})

    def data(self, op: str, tensors: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Run a data op and return the delivered tensors, owned by the caller."""
        _, out = self._call(op, tensors=dict(tensors or {}))
        return out

    def stats(self) -> dict[str, Any]:
        return dict(self._call(m.STATS)[0].body)

    def _call(self, op: str, body: dict | None = None,
              tensors: dict[str, torch.Tensor] | None = None) -> tuple[Header, dict[str, torch.Tensor]]:
        try:
            return self._call_once(op, body, tensors)
        except UnknownClient:
            logger.warning("server %s no longer knows this client; reconnecting", self.address)
            self.handshake()
            return self._call_once(op, body, tensors)

    def _call_once(self, op: str, body: dict | None,
                   tensors: dict[str, torch.Tensor] | None) -> tuple[Header, dict[str, torch.Tensor]]:
        metas, frames = tensor_frames({k: v.detach().cpu() for k, v in tensors.items()}) if tensors else ((), [])
        lane, rid, releases = self._take_lane(with_releases=True)
        try:
            header = Header(op=op, client_id=self.client_id, request_id=rid, lane=lane.index,
                            body=body or {}, tensors=metas, releases=releases)
            reply, reply_frames = lane.request(header, frames)
            out = {}
            if "delivery" in reply.body:
                note = reply.body["delivery"]
                with self._get_lock:
                    out = self.transport.get(note, reply.tensors, reply_frames)
                if note.get("slot") is not None:
                    with self._lock:
                        self._releases.append(int(note["slot"]))
            return reply, out
        finally:
            self._give_lane(lane)

    def _plain(self, op: str, body: dict, *, timeout_s: float) -> Header:
        """A request without a transport (the hello)."""
        lane, rid, _ = self._take_lane()
        try:
            header = Header(op=op, client_id=self.client_id, request_id=rid, lane=lane.index, body=body)
            return lane.request(header, timeout_s=timeout_s)[0]
        finally:
            self._give_lane(lane)

    def _take_lane(self, with_releases: bool = False) -> tuple[Lane, int, tuple[int, ...]]:
        """A free lane (waiting for one if all ``max_lanes`` are busy), a fresh request id, and (if asked)
        the slots to release, taken off the list: one lock round trip for all three."""
        with self._free:
            while not self._idle and len(self._lanes) >= self.config.max_lanes:
                self._free.wait()
            if not self._idle:
                lane = Lane(self._ctx, self.address, len(self._lanes),
                            attempt_timeout_s=self.config.attempt_timeout_s,
                            request_timeout_s=self.config.request_timeout_s,
                            curve=self.config.curve())
                self._lanes.append(lane)
                self._idle.append(lane)
            self.in_flight += 1
            releases = ()
            if with_releases and self._releases:
                releases = tuple(self._releases)
                self._releases.clear()
            return self._idle.pop(), next(self._rids), releases

    def _give_lane(self, lane: Lane) -> None:
        with self._free:
            self.in_flight -= 1
            self._idle.append(lane)
            self._free.notify()

    def close(self, say_bye: bool = True) -> None:
        """Say bye (best effort, short timeout) and free sockets and the transport. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if say_bye:
            try:
                self._plain(m.BYE, {}, timeout_s=min(2.0, self.config.attempt_timeout_s))
            except Exception as e:  # the server may be gone already; nothing is lost by skipping bye
                logger.debug("bye to %s failed: %s", self.address, e)
        for lane in self._lanes:
            lane.close()
        if self.transport is not None:
            self.transport.close()
