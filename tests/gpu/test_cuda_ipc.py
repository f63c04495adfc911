"""cuda_ipc pack mode on real GPUs: zero-copy views on one GPU, and a killed client's slots come back."""

from __future__ import annotations

import pytest
import torch

from test_transport_conformance import Link, Peer, digest

pytestmark = pytest.mark.gpu


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.stop()


def test_same_gpu_zero_copy_views_equal_local(peer):
    link = Link(peer, "cuda_ipc", "cuda:0", "cuda:0", client_attrs={"zero_copy": True})
    x = {"h": torch.randn(4, 1024, 512, device="cuda:0").bfloat16(), "i": torch.arange(99, device="cuda:0")}
    got = link.roundtrip(x)
    assert got["h"][0] == digest(x["h"]) and got["i"][0] == digest(x["i"])
    assert got["h"][1] == "cuda:0"
    link.close()


def test_killed_client_slots_are_reclaimed(peer):
    cdev = "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"
    link = Link(peer, "cuda_ipc", "cuda:0", cdev, max_slots=4, client_attrs={"push": False})  # server slots
    x = {"x": torch.randint(0, 255, (64 << 20,), dtype=torch.uint8, device="cuda:0")}
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info(0)[0]
    for _ in range(3):
        assert link.roundtrip(x, release=False)["x"][0] == digest(x["x"])  # the client holds every slot
    held = link.server.held_bytes()
    assert held >= 3 * (64 << 20)
    assert torch.cuda.mem_get_info(0)[0] <= free0 - held + (8 << 20)
    peer.kill()
    link.server.close()  # what bye or lease expiry does on the server
    assert link.server.held_bytes() == 0
    assert torch.cuda.mem_get_info(0)[0] >= free0 - (8 << 20)
