"""cuda_ipc push mode on real GPUs: bitwise equality, views that release on GC, killed clients, memory.

The server transport lives in the test process; the client lives in a spawned process (``_peer_main``)
that can hold results, drop them and report its receive-slot counts, so the release-on-GC path is
exercised across a real process boundary.
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import time
import traceback
import uuid
from typing import Any

import pytest
import torch

from zmqdisagg.errors import TransportUnavailable

from test_transport_conformance import Peer as ConformancePeer, _mixed, digest
from zmqdisagg import transports
from zmqdisagg.protocol.tensor_meta import TensorMeta
from zmqdisagg.transports.base import TransportContext

pytestmark = pytest.mark.gpu
TWO = pytest.mark.multi_gpu(2)
SLACK = 8 << 20


def _peer_main(conn: Any) -> None:
    t, held = None, {}
    while True:
        cmd, *args = conn.recv()
        try:
            if cmd == "stop":
                break
            if cmd == "create":
                ctx_kw, attrs = args
                t = transports.create("cuda_ipc", TransportContext(role="client", **ctx_kw))
                for k, v in attrs.items():
                    setattr(t, k, v)
                value = None
            elif cmd == "accept":
                t.accept(args[0])
                value = t.mode
            elif cmd == "get":
                note, metas, key = args
                out = t.get(note, [TensorMeta.from_wire(m) for m in metas], [])
                torch.cuda.synchronize()
                value = {k: digest(v) for k, v in out.items()}
                if key is not None:
                    held[key] = out
                del out
            elif cmd == "digest":
                torch.cuda.synchronize()
                value = {k: digest(v) for k, v in held[args[0]].items()}
            elif cmd == "drop":
                for key in args[0]:
                    held.pop(key, None)
                gc.collect()
                torch.cuda.synchronize()
                value = None
            elif cmd == "slots":  # (offered to the server now, allocated)
                value = (t.free_recv_slots(), len(t._pool.mem) if t._pool is not None else 0)
            elif cmd == "close":
                t.close()
                t.close()  # idempotent
                value = None
            conn.send(("ok", value))
        except BaseException as e:  # report, keep serving
            conn.send(("err", (type(e).__name__, str(e), traceback.format_exc())))


class Peer(ConformancePeer):
    """The conformance tests' peer process, serving the push commands above."""

    def __init__(self) -> None:
        super().__init__(_peer_main)


class PushLink:
    """A server transport here and a client in ``peer``, connected like the handshake does."""

    def __init__(self, peer: Peer, sdev: str, cdev: str, push: bool | None = True, max_slots: int = 4) -> None:
        self.peer = peer
        self.server = transports.create("cuda_ipc", TransportContext(
            role="server", connection_id=uuid.uuid4().hex[:12], device=sdev, max_slots=max_slots,
            transfer_timeout_s=30.0))
        offer = self.server.offer()
        json.dumps(offer)
        attrs = {} if push is None else {"push": push}
        peer.call("create", {"connection_id": "t", "device": cdev, "transfer_timeout_s": 30.0}, attrs)
        self.mode = peer.call("accept", offer)

    def send(self, tensors: dict[str, torch.Tensor], key: str | None = None) -> tuple[dict, dict]:
        d = self.server.put(tensors)
        assert len(json.dumps(d.note)) < 4096
        got = self.peer.call("get", d.note, [m.to_wire() for m in d.metas], key)
        if d.slot is not None:
            self.server.release(d.slot)
        return d.note, got

    def close(self) -> None:
        self.peer.call("close")
        self.server.close()
        self.server.close()


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.stop()


def _devices(cross: bool) -> tuple[str, str]:
    return ("cuda:0", "cuda:1") if cross else ("cuda:0", "cuda:0")


@pytest.mark.parametrize("cross", [pytest.param(True, marks=TWO, id="gpu0-gpu1"), pytest.param(False, id="gpu0-gpu0")])
def test_push_is_bitwise_equal(peer, cross):
    sdev, cdev = _devices(cross)
    link = PushLink(peer, sdev, cdev)
    assert link.mode == "push"
    pushed = 0
    for i in range(6):
        want = _mixed(sdev, seed=i)
        note, got = link.send(want)
        pushed += "recv" in note
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k] == digest(v), (i, k)
    big = {"big": torch.randint(0, 255, ((40 << 20) + 12345,), dtype=torch.uint8, device=sdev),
           "small": torch.arange(10, dtype=torch.int32, device=sdev)}
    notes = []
    for _ in range(3):  # the first misses (pack + want), later ones are pushed into grown slots
        note, got = link.send(big)
        notes.append(note)
        assert got["big"] == digest(big["big"]) and got["small"] == digest(big["small"])
    assert "want" in notes[0] and "recv" in notes[-1]
    assert pushed >= 4, "small replies should be pushed once the peer dropped the previous one"
    link.close()


def test_default_mode_follows_the_gpu_pair(peer, monkeypatch):
    same = PushLink(peer, "cuda:0", "cuda:0", push=None)
    assert same.mode == "pack"  # one GPU: the pack path stays the default
    same.close()
    if torch.cuda.device_count() > 1:
        cross = PushLink(peer, "cuda:0", "cuda:1", push=None)
        assert cross.mode == "push"
        cross.close()


def test_views_stay_valid_and_slots_come_back_after_gc(peer):
    sdev, cdev = _devices(torch.cuda.device_count() > 1)
    link = PushLink(peer, sdev, cdev)
    xs = [{"x": torch.full((256 << 10,), i + 1, dtype=torch.uint8, device=sdev)} for i in range(4)]
    notes = [link.send(x, key=f"k{i}")[0] for i, x in enumerate(xs[:3])]
    assert "recv" in notes[0] and "recv" in notes[1]
    assert len({n["recv"] for n in notes if "recv" in n}) == sum("recv" in n for n in notes)  # no slot twice
    link.send(xs[3], key="k3")  # one more while three are held: must not land in a held slot
    for i, x in enumerate(xs):
        assert peer.call("digest", f"k{i}")["x"] == digest(x["x"]), f"held result {i} was overwritten"
    free, total = peer.call("slots")
    assert total >= 2 and free < total
    peer.call("drop", [f"k{i}" for i in range(4)])
    free, total = peer.call("slots")
    assert free == total, "every slot is offered again once its views are gone"
    for i in range(10):  # and they are reused, with no new slot
        note, got = link.send(xs[i % 4])
        assert got["x"] == digest(xs[i % 4]["x"]) and "recv" in note
    assert peer.call("slots")[1] == total
    link.close()


def test_no_device_memory_growth(peer):
    sdev, cdev = _devices(torch.cuda.device_count() > 1)
    link = PushLink(peer, sdev, cdev)
    sizes = [64 << 10, 1 << 20, 3 << 20, 17 << 20]
    xs = [{"x": torch.randint(0, 255, (n,), dtype=torch.uint8, device=sdev)} for n in sizes]

    def cycle(rounds: int) -> int:
        pushed = 0
        for i in range(rounds):
            note, got = link.send(xs[i % 4], key="last")  # the peer holds the previous result, like training
            assert got["x"] == digest(xs[i % 4]["x"])
            pushed += "recv" in note
        return pushed

    cycle(80)  # slots grow and settle
    torch.cuda.synchronize()
    before = [torch.cuda.mem_get_info(d)[0] for d in range(torch.cuda.device_count())]
    pushed = cycle(400)
    torch.cuda.synchronize()
    after = [torch.cuda.mem_get_info(d)[0] for d in range(torch.cuda.device_count())]
    assert all(a >= b - SLACK for a, b in zip(after, before)), (before, after)
    assert pushed >= 300, f"only {pushed} of 400 replies were pushed"
    link.close()


def test_killed_client_with_live_views_does_not_wedge_the_server(peer):
    sdev, cdev = _devices(torch.cuda.device_count() > 1)
    link = PushLink(peer, sdev, cdev)
    x = {"x": torch.randint(0, 255, (8 << 20,), dtype=torch.uint8, device=sdev)}
    for i in range(3):
        link.send(x, key=f"k{i}")
    peer.proc.kill()
    peer.proc.join(10)
    small = {"s": torch.arange(1000, device=sdev)}
    try:  # a reply in flight when the client died: pushed into a slot opened before, or refused cleanly
        assert "recv" in link.server.put(small).note
        link.server.put(x)  # and a packed one
    except TransportUnavailable as e:  # the slot was not open yet: the dead exporter's handle can't be
        assert "client is gone" in str(e)  # opened any more, and the server drops the connection
    torch.cuda.synchronize()
    link.server.close()  # what lease expiry does
    assert link.server.held_bytes() == 0
    fresh = Peer()
    try:
        again = PushLink(fresh, sdev, cdev)
        for _ in range(3):
            assert again.send(x)[1]["x"] == digest(x["x"])
        again.close()
    finally:
        fresh.stop()


def _remote_client(address: str, device: str, ready: Any) -> None:
    from zmqdisagg.client.remote import RemoteTarget
    from zmqdisagg.config import ClientConfig

    os.environ["ZMQDISAGG_CUDA_IPC_PUSH"] = "1"
    rt = RemoteTarget([address], ClientConfig(device=device, transport="cuda_ipc"))
    held = []
    for i in range(200000):
        out = rt.eagle3(_batch(i))
        if i < 3:
            held.append(out)  # views the server must never write over
        if i == 5:
            ready.set()


def _batch(i: int) -> Any:
    from zmqdisagg.target.types import TargetBatch

    ids = torch.randint(0, 300, (2, 64 + i % 7), generator=torch.Generator().manual_seed(i))
    return TargetBatch(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_real_server_survives_a_killed_push_client(monkeypatch):
    from zmqdisagg.client.remote import RemoteTarget
    from zmqdisagg.config import ClientConfig
    from zmqdisagg.server.spawn import spawn_server

    monkeypatch.setenv("ZMQDISAGG_CUDA_IPC_PUSH", "1")
    cdev = "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"
    with spawn_server("configs/tiny-llama.json", extra=("--device", "cuda:0", "--lease-s", "2")) as srv:
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        proc = ctx.Process(target=_remote_client, args=(srv.address, cdev, ready), daemon=True)
        proc.start()
        assert ready.wait(120), "the push client never got going"
        proc.kill()  # mid-stream, holding views
        proc.join(10)
        with RemoteTarget([srv.address], ClientConfig(device=cdev, transport="cuda_ipc")) as rt:
            conn = rt._servers[0]
            assert conn.transport.mode == "push"
            ref = rt.eagle3(_batch(1))
            ref = {k: v.clone() for k, v in ref.items()}
            for i in range(50):
                out = rt.eagle3(_batch(1))
                assert all(torch.equal(out[k], ref[k]) for k in ref)
            deadline = time.monotonic() + 20
            while len(conn.stats()["clients"]) > 1 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert len(conn.stats()["clients"]) == 1, "the dead client's connection was never dropped"
        assert srv.proc.poll() is None
