"""The ``nccl`` transport over gloo (CPU tensors): private groups, deadlines, dead peers, bad offers.

Everything runs for real: a spawned client process, a ``TCPStore`` on a free loopback port, a private
``ProcessGroupGloo``. The deadline tests use a 2 s ``transfer_timeout_s`` and assert the error comes
within a few seconds of it, never a hang.
"""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.distributed as dist

from test_transport_conformance import Link, Peer, digest
from zmqdisagg import transports
from zmqdisagg.errors import PeerTimeout, ProtocolMismatch, TransportUnavailable
from zmqdisagg.protocol.tensor_meta import layout
from zmqdisagg.transports.base import TransportContext


DEADLINE = 4.0  # transfer deadline in these tests; errors must come within it plus a margin
MARGIN = 8.0


def ctx(role: str, timeout_s: float = DEADLINE) -> TransportContext:
    return TransportContext(role=role, connection_id=f"t-{role}", transfer_timeout_s=timeout_s)


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.stop()


def test_private_group_never_touches_the_default_one(peer):
    link = Link(peer, "nccl", "cpu", "cpu", timeout_s=10)
    x = {"a": torch.randn(100, 3), "b": torch.arange(7)}
    got = link.roundtrip(x)
    assert got["a"][0] == digest(x["a"]) and got["b"][0] == digest(x["b"])
    assert link.server.backend == "gloo"
    assert not dist.is_initialized()
    link.close()


def test_send_to_a_client_that_never_receives_fails_within_deadline(peer):
    link = Link(peer, "nccl", "cpu", "cpu", timeout_s=DEADLINE)
    d = link.server.put({"x": torch.randn(1000)})
    t0 = time.monotonic()
    work = d.start()
    while not work.is_completed():  # how the server loop polls: never raises
        assert time.monotonic() - t0 < 15, "the send hung past its deadline"
        time.sleep(0.05)
    assert isinstance(work.error, PeerTimeout)
    assert time.monotonic() - t0 < DEADLINE + MARGIN
    with pytest.raises(TransportUnavailable, match="aborted"):
        link.server.put({"x": torch.randn(3)})
    link.server.close()


def test_receive_from_a_killed_server_fails_within_deadline(peer):
    """The peer process is the *server* here: it joins, then dies before sending."""
    client = transports.create("nccl", ctx("client"))
    server = transports.create("nccl", ctx("server"))
    offer = server.offer()
    client.accept(offer)
    metas, _ = layout({"x": torch.empty(1 << 16)})
    note = server.put({"x": torch.empty(1 << 16)}).note
    server._abort("simulated server death")  # its sockets close as a killed process's would
    t0 = time.monotonic()
    with pytest.raises((PeerTimeout, TransportUnavailable)):
        client.get(note, metas, [])
    assert time.monotonic() - t0 < DEADLINE + MARGIN
    client.close()
    server.close()


def test_killed_client_process_does_not_hang_the_server(peer):
    link = Link(peer, "nccl", "cpu", "cpu", timeout_s=DEADLINE)
    assert link.roundtrip({"x": torch.ones(4)})["x"][0] == digest(torch.ones(4))
    peer.kill()
    d = link.server.put({"x": torch.randn(1 << 20)})
    work = d.start()
    t0 = time.monotonic()
    with pytest.raises((PeerTimeout, TransportUnavailable)):
        work.wait(30)
    assert time.monotonic() - t0 < DEADLINE + MARGIN
    link.server.close()


def test_unreachable_rendezvous_is_a_clear_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = transports.create("nccl", ctx("client"))
    with pytest.raises(TransportUnavailable, match="rendezvous|join"):
        client.accept({"backend": "gloo", "hosts": ["127.0.0.1"], "port": port, "prefix": "p/"})
    client.close()


def test_backend_mismatch_and_roles():
    client = transports.create("nccl", ctx("client"))
    with pytest.raises(TransportUnavailable, match="both sides on GPU"):
        client.accept({"backend": "nccl", "uid": "00" * 128})
    with pytest.raises(ProtocolMismatch):
        client.put({"x": torch.ones(1)})
    client.close()
    client.close()
    server = transports.create("nccl", ctx("server"))
    with pytest.raises(ProtocolMismatch):
        server.get({}, [], [])
    server.close()


def test_server_close_before_client_joins_is_clean():
    server = transports.create("nccl", ctx("server", 1.0))
    server.offer()
    t0 = time.monotonic()
    server.close()
    assert time.monotonic() - t0 < 1.0
