"""One conformance suite for every transport this machine can run, at the ``Transport`` level.

The server side lives in the test process; the client side lives in a real spawned process (``Peer``),
so shared memory, gloo sockets, CUDA IPC handles and NCCL communicators all cross a process boundary.
On a CPU-only machine this covers ``nccl`` (over gloo), ``shm`` and ``inline``; where CUDA is present
``cuda_ipc`` and ``nccl`` also run on GPU tensors (marked ``gpu``). The client reports a SHA-256 of
every tensor's bytes, so "remote equals local" is checked bit for bit without shipping tensors back.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import traceback
import uuid
from typing import Any, Callable

import pytest
import torch

from zmqdisagg import transports
from zmqdisagg.errors import ResourceExhausted
from zmqdisagg.protocol.tensor_meta import TensorMeta, as_bytes
from zmqdisagg.transports.base import TransportContext


def digest(t: torch.Tensor) -> tuple[str, list[int], str]:
    """dtype, shape and SHA-256 of the bytes of ``t`` (any device)."""
    raw = as_bytes(t.detach().cpu()).numpy().tobytes()
    return str(t.dtype), list(t.shape), hashlib.sha256(raw).hexdigest()


def _peer_main(conn: Any) -> None:
    """Client side: execute commands from the test process until told to stop."""
    t = None
    while True:
        cmd, *args = conn.recv()
        try:
            if cmd == "stop":
                break
            if cmd == "create":
                name, ctx_kw, attrs = args
                t = transports.create(name, TransportContext(role="client", **ctx_kw))
                for k, v in attrs.items():
                    setattr(t, k, v)
                conn.send(("ok", None))
            elif cmd == "accept":
                t.accept(args[0])
                conn.send(("ok", None))
            elif cmd == "get":
                note, metas, frames = args
                out = t.get(note, [TensorMeta.from_wire(m) for m in metas], frames)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                conn.send(("ok", {k: (digest(v), str(v.device)) for k, v in out.items()}))
            elif cmd == "close":
                t.close()
                t.close()  # idempotent
                conn.send(("ok", None))
            elif cmd == "exit_hard":
                import os
                os._exit(1)
        except BaseException as e:  # report, keep serving
            conn.send(("err", (type(e).__name__, str(e), traceback.format_exc())))
    if t is not None:
        t.close()


class Peer:
    """A spawned client process driving one side of a transport; ``main`` serves its commands."""

    def __init__(self, main: Callable[[Any], None] | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=main or _peer_main, args=(child,), daemon=True)
        self.proc.start()

    def call(self, *cmd: Any, timeout: float = 120.0) -> Any:
        self.conn.send(cmd)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"peer did not answer {cmd[0]} within {timeout}s")
        status, value = self.conn.recv()
        if status == "err":
            raise RuntimeError(f"peer {cmd[0]} failed: {value[0]}: {value[1]}\n{value[2]}")
        return value

    def send(self, *cmd: Any) -> None:
        """Send without waiting (the caller collects the answer with ``result``)."""
        self.conn.send(cmd)

    def result(self, timeout: float = 120.0) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"peer did not answer within {timeout}s")
        status, value = self.conn.recv()
        if status == "err":
            raise RuntimeError(f"peer failed: {value[0]}: {value[1]}\n{value[2]}")
        return value

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(10)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.kill()


class Link:
    """A connected (server transport, peer client) pair, as the handshake would build it."""

    def __init__(self, peer: Peer, name: str, server_device: str, client_device: str,
                 timeout_s: float = 30.0, max_slots: int = 4, client_attrs: dict | None = None) -> None:
        cid = uuid.uuid4().hex[:12]
        self.peer = peer
        self.server = transports.create(name, TransportContext(
            role="server", connection_id=cid, device=server_device, max_slots=max_slots,
            transfer_timeout_s=timeout_s))
        offer = self.server.offer()
        json.dumps(offer)  # the offer must travel in a JSON header
        peer.call("create", name, {"connection_id": cid, "device": client_device,
                                   "transfer_timeout_s": timeout_s}, client_attrs or {})
        peer.call("accept", offer)

    def roundtrip(self, tensors: dict[str, torch.Tensor], release: bool = True) -> dict[str, Any]:
        d = self.server.put(tensors)
        assert len(json.dumps(d.note)) < 4096, "delivery notes carry metadata only"
        self.peer.send("get", d.note, [m.to_wire() for m in d.metas], _frames(d))
        work = d.start() if d.start is not None else None
        got = self.peer.result()
        if work is not None:
            work.wait(30)
        if release and d.slot is not None:
            self.server.release(d.slot)
        return got

    def close(self) -> None:
        self.peer.call("close")
        self.server.close()
        self.server.close()


def _frames(d: Any) -> list[bytes]:
    """Inline frames as plain bytes, standing in for the ZMQ frames that follow a reply header."""
    return [bytes(memoryview(f).cast("B")) for f in d.frames]


def _cases() -> list[Any]:
    cases = []
    names = transports.available()
    for name in names:
        if name != "cuda_ipc":
            cases.append(pytest.param((name, "cpu", "cpu"), id=f"{name}-cpu"))
    gpu = pytest.mark.gpu
    # Skipped by the gpu markers where CUDA is absent. No nccl on one GPU: NCCL refuses two ranks on
    # one device, and the ladder sends that pair to cuda_ipc.
    cases.append(pytest.param(("cuda_ipc", "cuda:0", "cuda:0"), id="cuda_ipc-gpu0-gpu0", marks=gpu))
    for name in ("cuda_ipc", "nccl"):
        cases.append(pytest.param((name, "cuda:0", "cuda:1"), id=f"{name}-gpu0-gpu1",
                                  marks=[gpu, pytest.mark.multi_gpu(2)]))
    return cases


@pytest.fixture(scope="module")
def peer():
    p = Peer()
    yield p
    p.stop()


@pytest.fixture(params=_cases())
def link(request, peer):
    name, sdev, cdev = request.param
    if name == "cuda_ipc" and (why := transports.transport_class(name).probe()):
        pytest.skip(why)
    lk = Link(peer, name, sdev, cdev)
    lk.device = sdev
    yield lk
    lk.close()


def _mixed(device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {
        "hidden": torch.randn(3, 5, 64, generator=g).to(torch.bfloat16),
        "logits": torch.randn(2, 37, generator=g),
        "half": torch.randn(11, generator=g).half(),
        "ids": torch.randint(0, 1 << 40, (4, 9), generator=g),
        "mask": torch.rand(4, 9, generator=g) > 0.5,
        "bytes": torch.randint(0, 255, (1001,), generator=g, dtype=torch.uint8),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.zeros(0, 7),
        "strided": torch.randn(16, 8, generator=g).t(),  # not contiguous
    }
    return {k: v.to(device) for k, v in t.items()}


def test_remote_equals_local(link):
    want = _mixed(link.device)
    got = link.roundtrip(want)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k][0] == digest(v), k


def test_many_replies_reuse_slots(link):
    for i in range(6):
        want = {"x": torch.randn(257 + i, 33, generator=torch.Generator().manual_seed(i)).to(link.device)}
        assert link.roundtrip(want)["x"][0] == digest(want["x"])


def test_large_payload(link):
    n = (40 << 20) + 12345  # crosses cuda_ipc's chunking threshold, odd tail
    want = {"big": torch.randint(0, 255, (n,), dtype=torch.uint8).to(link.device),
            "small": torch.arange(10, dtype=torch.int32).to(link.device)}
    got = link.roundtrip(want)
    assert got["big"][0] == digest(want["big"]) and got["small"][0] == digest(want["small"])


def test_empty_reply(link):
    assert link.roundtrip({}) == {}


def test_slots_exhaust_and_release(link):
    x = {"x": torch.ones(10).to(link.device)}
    d = link.server.put(x)
    if d.slot is None:
        link.peer.send("get", d.note, [m.to_wire() for m in d.metas], _frames(d))
        w = d.start() if d.start else None
        link.peer.result()
        if w is not None:
            w.wait(30)
        pytest.skip(f"{link.server.name} holds nothing between replies")
    held = [d.slot]
    for _ in range(link.server.ctx.max_slots - 1):
        held.append(link.server.put(x).slot)
    assert len(set(held)) == link.server.ctx.max_slots
    with pytest.raises(ResourceExhausted):
        link.server.put(x)
    link.server.release(held[0])
    d2 = link.server.put(x)
    assert d2.slot == held[0]
    for s in held:
        link.server.release(s)
