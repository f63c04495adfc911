"""The selection ladder on recorded identity records (no GPU needed), and the trial-verdict cache.

Records below are shaped like what ``topology.local_identity`` produced on real machines: two H100s
joined by NVLink in one VM (NVML P2P NVLINK ok, PCIe ancestor HOSTBRIDGE), a MIG slice, a container
with its own PID namespace, a trainer whose CUDA_VISIBLE_DEVICES hides the server's GPU, another node.
"""

from __future__ import annotations

import pytest

from zmqdisagg.errors import ProtocolMismatch, TransportUnavailable
from zmqdisagg.topology import local_identity, matrix
from zmqdisagg.transports.select import Identity, TrialVerdicts, choose, ladder

GPU0 = "GPU-3b9f2c1e-0a1b-4c2d-9e8f-112233445566"
GPU1 = "GPU-7d6e5f4a-1b2c-4d3e-8f9a-aabbccddeeff"
ALL = ("cuda_ipc", "nccl", "shm", "inline")


def ident(**kw) -> Identity:
    base = dict(hostname="node-a", boot_id="b00t-a", pid_ns="pid:[4026531836]", pid=100, device="cuda:0",
                gpu_uuid=GPU0, pci_bus_id="00000000:18:00.0", p2p=(GPU1,), visible=(GPU0, GPU1),
                transports=ALL)
    base.update(kw)
    return Identity(**base)


SERVER = ident()
NO_P2P = ident(p2p=())
CASES = [  # (name, server, client, transport, zero_copy)
    ("same GPU", SERVER, ident(pid=200), "cuda_ipc", True),
    ("NVLink peer", SERVER, ident(pid=200, gpu_uuid=GPU1, device="cuda:1", p2p=(GPU0,)), "cuda_ipc", False),
    ("P2P in one record only", SERVER, ident(pid=200, gpu_uuid=GPU1, p2p=()), "cuda_ipc", False),
    ("no P2P", NO_P2P, ident(pid=200, gpu_uuid=GPU1, p2p=()), "nccl", False),
    ("other PID namespace", SERVER, ident(pid=7, gpu_uuid=GPU1, pid_ns="pid:[4026532999]"), "nccl", False),
    ("MIG slice", SERVER, ident(pid=200, gpu_uuid="MIG-1234", mig=True), "nccl", False),
    ("server GPU hidden from client", SERVER, ident(pid=200, gpu_uuid=GPU1, visible=(GPU1,)), "nccl", False),
    ("other host", SERVER, ident(hostname="node-b", boot_id="b00t-b", gpu_uuid=GPU1), "nccl", False),
    ("same hostname, rebooted", SERVER, ident(boot_id="b00t-new", gpu_uuid=GPU1), "nccl", False),
    ("CPU client, same host", SERVER, ident(device="cpu", gpu_uuid=None, p2p=(), visible=()), "shm", False),
    ("CPU client, other host", SERVER,
     ident(hostname="node-b", boot_id="b00t-b", device="cpu", gpu_uuid=None), "inline", False),
]


@pytest.mark.parametrize("server,client,want,zero_copy", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_ladder(server, client, want, zero_copy):
    got = choose(server, client)
    assert (got.name, got.zero_copy) == (want, zero_copy), got.reason


def test_reason_names_the_rung():
    assert "MIG" in choose(SERVER, ident(pid=2, gpu_uuid="MIG-1", mig=True)).reason
    assert "cannot open" in choose(SERVER, ident(pid=2, gpu_uuid=GPU1, visible=(GPU1,))).reason
    assert "other host" in choose(SERVER, ident(hostname="x", boot_id="y", gpu_uuid=GPU1)).reason


def test_empty_visible_means_unknown_not_hidden():
    """Records from peers that predate ``visible`` must still reach cuda_ipc."""
    assert choose(SERVER, ident(pid=2, gpu_uuid=GPU1, visible=())).name == "cuda_ipc"


def test_cpu_server_never_offers_gpu_rungs():
    server = ident(device="cpu", gpu_uuid=None, p2p=(), visible=())
    assert [r[0] for r in ladder(server, ident(pid=2))] == ["shm", "inline"]


def test_exclude_walks_down_and_override_is_checked():
    client = ident(pid=2, gpu_uuid=GPU1)
    assert choose(SERVER, client, exclude={"cuda_ipc"}).name == "nccl"
    assert choose(SERVER, client, exclude={"cuda_ipc", "nccl"}).name == "shm"
    assert choose(SERVER, client, override="inline").name == "inline"
    with pytest.raises(TransportUnavailable, match="forced"):
        choose(SERVER, ident(pid=2, transports=("inline",)), override="cuda_ipc")
    with pytest.raises(TransportUnavailable):
        choose(SERVER, ident(pid=2, transports=("cuda_ipc",)), exclude={"cuda_ipc"})


def test_only_transports_both_sides_run():
    client = ident(pid=2, gpu_uuid=GPU1, transports=("nccl", "shm", "inline"))  # no cupy IPC there
    assert choose(SERVER, client).name == "nccl"


def test_wire_roundtrip_keeps_gpu_fields():
    c = ident(mig=True, p2p=(GPU1,), visible=(GPU0,))
    assert Identity.from_wire(c.to_wire()) == c
    old = {k: v for k, v in c.to_wire().items() if k not in ("visible", "pci_bus_id")}
    assert Identity.from_wire(old).visible == ()
    with pytest.raises(ProtocolMismatch):
        Identity.from_wire({"hostname": "x"})


def test_trial_verdicts_are_cached_per_gpu_pair():
    v = TrialVerdicts()
    a, b, c = SERVER, ident(pid=2, gpu_uuid=GPU1), ident(pid=3)
    v.record(a, b, "cuda_ipc", False, "open failed")
    v.record(a, b, "nccl", True)
    assert v.excluded(a, b) == {"cuda_ipc"}
    assert v.excluded(a, c) == frozenset()  # another GPU pair is not affected
    assert choose(a, b, exclude=v.excluded(a, b)).name == "nccl"
    assert v.get(a, b, "nccl") == (True, "")


def test_local_identity_and_matrix_on_this_machine():
    me = local_identity("cpu")
    assert me.gpu_uuid is None and me.boot_id and me.pid_ns
    rows = matrix(("shm", "inline"))
    assert {"server": "cpu", "client": "cpu"}.items() <= rows[0].items()
    assert rows[0]["transport"] == "shm"
