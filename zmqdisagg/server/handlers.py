"""What the server does for each op. Each handler returns ``(reply header, Delivery or None)``.

Handlers raise typed errors (``BadRequest``, ``ConfigError``, ``ProtocolMismatch`` ...) and never
catch them: ``server.py`` turns any exception into an ``error`` reply and keeps serving. A batch is
followed here from its request frames to the transport: decode -> validate -> forward -> ``put``.
With batching, ``admit`` does the decode and validation into a ``Job``, the batcher runs the forward,
and ``deliver`` does the ``put``: the same steps, with the same errors, split in two.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from zmqdisagg import transports
from zmqdisagg.config import ServeConfig
from zmqdisagg.errors import BadRequest, UnknownClient
from zmqdisagg.protocol import messages as m
from zmqdisagg.protocol.codec import frames_to_tensors
from zmqdisagg.protocol.messages import Header, trial_pattern
from zmqdisagg.server.batching import Job
from zmqdisagg.server.connection import Connection
from zmqdisagg.server.utilisation import Utilisation
from zmqdisagg.target.types import TargetBatch, TargetSettings, check_batch
from zmqdisagg.transports.base import Delivery, TransportContext
from zmqdisagg.transports.select import Identity, choose

logger = logging.getLogger(__name__)

Handled = tuple[Header, Delivery | None]


@dataclass(kw_only=True)
class ServerState:
    """What handlers share: the model, this server's identity, its config and the live connections."""

    model: Any  # a TargetModel
    identity: Identity
    config: ServeConfig
    connections: dict[str, Connection] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    counters: dict[str, int] = field(default_factory=lambda: {"requests": 0, "errors": 0, "retries": 0})
    utilisation: Utilisation = field(default_factory=Utilisation)
    bench_payloads: dict[int, torch.Tensor] = field(default_factory=dict)  # the bench op's last payload
    _info: tuple[Any, dict[str, Any]] = field(default=(None, {}), init=False, repr=False)  # last ModelInfo, wire form

    def info_wire(self) -> dict[str, Any]:
        """``model.info().to_wire()``, converted again only when the model returns another ``ModelInfo``."""
        info = self.model.info()  # still called each time: a closed model raises here
        if info is not self._info[0]:
            self._info = (info, info.to_wire())
        return self._info[1]

    def connection(self, header: Header) -> Connection:
        conn = self.connections.get(header.client_id)
        if conn is None:
            raise UnknownClient(f"client {header.client_id!r} is not connected; send hello first")
        return conn

    def drop(self, client_id: str, why: str) -> None:
        conn = self.connections.pop(client_id, None)
        if conn is not None:
            logger.info("closing client %s: %s", client_id, why)
            conn.close()


def hello(state: ServerState, header: Header, frames: list) -> Handled:
    body = header.body
    peer = Identity.from_wire(body.get("identity"))
    override = state.config.transport or body.get("transport")
    choice = choose(state.identity, peer, override=override, exclude=body.get("exclude") or ())
    state.drop(header.client_id, "said hello again")
    ctx = TransportContext(role="server", connection_id=header.client_id, device=state.config.device,
                           max_slots=state.config.max_slots,
                           transfer_timeout_s=state.config.transfer_timeout_s)
    transport = transports.create(choice.name, ctx)
    state.connections[header.client_id] = Connection(
        client_id=header.client_id, transport=transport, choice=choice, lease_s=state.config.lease_s)
    logger.info("client %s (pid %s on %s) -> transport %s: %s", header.client_id, peer.pid,
                peer.hostname, choice.name, choice.reason)
    return header.reply({"transport": choice.name, "reason": choice.reason, "zero_copy": choice.zero_copy,
                         "offer": transport.offer(), "identity": state.identity.to_wire(),
                         "info": state.info_wire(), "lease_s": state.config.lease_s}), None


def trial(state: ServerState, header: Header, frames: list) -> Handled:
    return deliver(state.connection(header), header, {"trial": trial_pattern().to(state.config.device)})


def info(state: ServerState, header: Header, frames: list) -> Handled:
    return header.reply({"info": state.info_wire()}), None


def weights(state: ServerState, header: Header, frames: list) -> Handled:
    return deliver(state.connection(header), header, state.model.head_weights())


def configure(state: ServerState, header: Header, frames: list) -> Handled:
    conn = state.connection(header)
    settings = TargetSettings.from_wire(dict(header.body.get("settings") or {}))
    tensors = frames_to_tensors(header.tensors, frames)
    conn.settings, conn.t2d = state.model.resolve(settings, tensors.get("t2d"))
    effective = conn.settings
    return header.reply({"settings": effective.to_wire()}), None


def compute(state: ServerState, header: Header, frames: list) -> Handled:
    conn = state.connection(header)
    batch = _batch(state, header, frames)
    outputs = state.model.compute(header.op, batch, conn.settings, conn.t2d)
    tokens = batch.input_ids.numel()
    state.utilisation.forward(requests=1, tokens=tokens, padded_tokens=tokens)
    return deliver(conn, header, outputs)


def admit(state: ServerState, envelope: list[bytes], header: Header, frames: list) -> Job:
    """An eagle3/dflash request, validated, with its connection's settings as of now, ready to batch."""
    conn = state.connection(header)
    info = state.model.info()
    batch = check_batch(_batch(state, header, frames), vocab_size=info.vocab_size, max_positions=info.max_positions)
    settings, t2d = state.model.resolve(conn.settings, conn.t2d)  # default layers filled in, so packs can match
    return Job(envelope=envelope, header=header, conn=conn, batch=batch, settings=settings, t2d=t2d)


def release(state: ServerState, header: Header, frames: list) -> Handled:
    state.connection(header)  # releases were applied on arrival; this only checks the client exists
    return header.reply(), None


def stats(state: ServerState, header: Header, frames: list) -> Handled:
    body = {"uptime_s": round(time.monotonic() - state.started_at, 3), **state.counters,
            "clients": {cid: c.stats() for cid, c in state.connections.items()},
            "info": state.info_wire(), "tp": state.config.tp,
            "batch_tokens": state.config.batch_tokens, "utilisation": state.utilisation.snapshot()}
    if header.client_id in state.connections:
        body["you"] = state.connections[header.client_id].stats()
    return header.reply(body), None


def bye(state: ServerState, header: Header, frames: list) -> Handled:
    state.drop(header.client_id, "said bye")
    return header.reply(), None


def bench(state: ServerState, header: Header, frames: list) -> Handled:
    """``nbytes`` of ``i % 251`` through the transport, for bench/transfer_bw.py; capped by --max-bench-bytes."""
    nbytes = header.body.get("nbytes")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or not 0 < nbytes <= state.config.max_bench_bytes:
        raise BadRequest(f"bench needs 0 < nbytes <= {state.config.max_bench_bytes} (--max-bench-bytes), got {nbytes!r}")
    payload = state.bench_payloads.get(nbytes)
    if payload is None:
        state.bench_payloads.clear()  # keep one size: a sweep asks for one size at a time
        payload = state.bench_payloads[nbytes] = trial_pattern(nbytes).to(state.config.device)
    return deliver(state.connection(header), header, {"payload": payload})


HANDLERS: dict[str, Callable[[ServerState, Header, list], Handled]] = {
    m.HELLO: hello, m.TRIAL: trial, m.INFO: info, m.WEIGHTS: weights, m.CONFIGURE: configure,
    m.EAGLE3: compute, m.DFLASH: compute, m.BENCH: bench, m.RELEASE: release, m.STATS: stats, m.BYE: bye,
}


def _batch(state: ServerState, header: Header, frames: list) -> TargetBatch:
    """Decode and bound-check the request's tensors; the model checks ids, dtypes and shapes."""
    names = [t.name for t in header.tensors]
    if sorted(names) != ["attention_mask", "input_ids"]:
        raise BadRequest(f"{header.op} needs tensors input_ids and attention_mask, got {names}")
    tensors = frames_to_tensors(header.tensors, frames)
    ids = tensors["input_ids"]
    if ids.numel() > state.config.max_tokens:
        raise BadRequest(f"request has {ids.numel()} tokens, over this server's --max-tokens="
                         f"{state.config.max_tokens}; send smaller batches")
    device = state.config.device
    return TargetBatch(input_ids=ids.to(device), attention_mask=tensors["attention_mask"].to(device))


def deliver(conn: Connection, header: Header, tensors: dict[str, torch.Tensor]) -> Handled:
    """Stage ``tensors`` on the client's transport; the reply carries the delivery note and metas."""
    delivery = conn.transport.put(tensors)
    reply = header.reply({"delivery": delivery.note}, tensors=delivery.metas)
    return reply, delivery
