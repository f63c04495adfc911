"""nccl between two GPUs: a peer killed mid-transfer, or a sender that never sends, errors in time."""

from __future__ import annotations

import time

import pytest
import torch

from test_transport_conformance import Link, Peer, digest

pytestmark = [pytest.mark.gpu, pytest.mark.multi_gpu(2)]
DEADLINE = 5.0


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.stop()


def test_client_killed_during_transfer_gives_error_within_deadline(peer):
    link = Link(peer, "nccl", "cuda:0", "cuda:1", timeout_s=DEADLINE)
    assert link.roundtrip({"w": torch.ones(8, device="cuda:0")})["w"][0] == digest(torch.ones(8))
    x = {"big": torch.empty(1 << 30, dtype=torch.uint8, device="cuda:0")}
    d = link.server.put(x)
    peer.send("get", d.note, [m.to_wire() for m in d.metas], [])  # the client posts its receive ...
    time.sleep(1.0)
    peer.kill()  # ... and dies before the bytes arrive
    t0 = time.monotonic()
    work = d.start()
    while not work.is_completed():
        assert time.monotonic() - t0 < DEADLINE + 20, "the NCCL send hung past its deadline"
        time.sleep(0.05)
    assert work.error is not None, "a send to a dead peer cannot succeed"
    assert time.monotonic() - t0 < DEADLINE + 10
    t1 = time.monotonic()
    link.server.close()
    assert time.monotonic() - t1 < 10


def test_receiver_times_out_when_nothing_is_sent(peer):
    link = Link(peer, "nccl", "cuda:0", "cuda:1", timeout_s=DEADLINE)
    d = link.server.put({"x": torch.ones(1 << 20, device="cuda:0")})  # put, but never start
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="PeerTimeout|TransportUnavailable"):
        peer.call("get", d.note, [m.to_wire() for m in d.metas], [], timeout=DEADLINE + 30)
    assert time.monotonic() - t0 < DEADLINE + 15
    link.server.close()
