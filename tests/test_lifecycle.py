"""Lifetimes: timeouts when the server dies, clean shutdown, leases, retries, restarts, shm hygiene."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
import torch
import zmq

from zmqdisagg.client.remote import RemoteTarget
from zmqdisagg.config import ClientConfig
from zmqdisagg.errors import NoServerAvailable, PeerTimeout
from zmqdisagg.protocol import codec
from zmqdisagg.protocol.messages import Header
from zmqdisagg.server.spawn import spawn_server, start_server
from zmqdisagg.target.types import TargetBatch
from zmqdisagg.topology import local_identity

MODEL = "configs/tiny-llama.json"


def _batch(n: int = 12) -> TargetBatch:
    ids = torch.arange(n).reshape(1, n) % 200
    return TargetBatch(input_ids=ids, attention_mask=torch.ones_like(ids))


def _segments(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"zmqdisagg-{pid}-")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("transport", ["inline", "shm"])
def test_dead_server_gives_peer_timeout_within_the_deadline(transport):
    srv = start_server(MODEL)
    cfg = ClientConfig(transport=transport, attempt_timeout_s=0.5, request_timeout_s=2.0)
    remote = RemoteTarget([srv.address], cfg)
    try:
        remote.eagle3(_batch())
        os.kill(srv.proc.pid, signal.SIGSTOP)  # freeze it so the next request is mid-flight when it dies
        started = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGKILL)
        with pytest.raises(NoServerAvailable) as info:
            remote.eagle3(_batch())
        elapsed = time.monotonic() - started
        assert isinstance(info.value, PeerTimeout) and isinstance(info.value.__cause__, PeerTimeout)
        assert elapsed < cfg.request_timeout_s + 1.5, f"gave up after {elapsed:.1f}s"
    finally:
        remote.close()
        srv.proc.wait()
        from zmqdisagg.transports.shm import sweep_stale
        sweep_stale()  # the killed server could not unlink its segments; the next server would
    assert not _segments(srv.proc.pid)


def test_sigterm_exits_quickly_and_frees_segments():
    srv = start_server(MODEL)
    remote = RemoteTarget([srv.address], ClientConfig(transport="shm"))
    remote.eagle3(_batch())
    assert _segments(srv.proc.pid), "the shm transport should hold a segment for this client"
    remote.close(), time.sleep(0.1)
    remote = RemoteTarget([srv.address], ClientConfig(transport="shm"))
    remote.eagle3(_batch())  # a client still connected while the server stops
    started = time.monotonic()
    code = srv.stop(grace_s=10)
    assert code == 0 and time.monotonic() - started < 5.0
    assert not _segments(srv.proc.pid)
    remote.close()


def test_killed_client_is_reclaimed_after_its_lease():
    with spawn_server(MODEL, extra=("--lease-s", "4.0")) as srv:
        script = textwrap.dedent(f"""
            import os, torch
            from zmqdisagg.client.remote import RemoteTarget
            from zmqdisagg.config import ClientConfig
            from zmqdisagg.target.types import TargetBatch
            r = RemoteTarget([{srv.address!r}], ClientConfig(transport="shm"))
            ids = torch.arange(8).reshape(1, 8)
            r.eagle3(TargetBatch(input_ids=ids, attention_mask=torch.ones_like(ids)))
            os.kill(os.getpid(), 9)
        """)
        subprocess.run([sys.executable, "-c", script], timeout=120)
        assert _segments(srv.proc.pid), "the dead client's slot should still exist before its lease ends"
        deadline = time.monotonic() + 15
        while _segments(srv.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _segments(srv.proc.pid), "segments of a dead client were not reclaimed"
        with RemoteTarget([srv.address]) as remote:  # and the server still serves
            (stats,) = remote.stats().values()
            assert len(stats["clients"]) == 1


def test_retry_of_the_same_request_gets_the_same_reply():
    with spawn_server(MODEL) as srv:
        ctx = zmq.Context()
        cid = uuid.uuid4().hex

        def ask(parts):
            sock = ctx.socket(zmq.REQ)  # a fresh socket per attempt, as a retrying lane does
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(srv.address)
            sock.send_multipart(parts)
            out = sock.recv_multipart()
            sock.close(0)
            return out

        hello = Header(op="hello", client_id=cid, body={"identity": local_identity().to_wire(), "transport": "inline"})
        ask([codec.encode(hello)])

        def request(rid: int, seed: int):
            ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(seed))
            metas, frames = codec.tensor_frames({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
            return [codec.encode(Header(op="eagle3", client_id=cid, request_id=rid, lane=0, tensors=metas)),
                    *[bytes(f) for f in frames]]

        first = ask(request(5, seed=1))
        again = ask(request(5, seed=1))
        other = ask(request(6, seed=2))
        assert first == again, "a retried request must get the very same reply"
        assert other[1:] != first[1:], "a new request id must get its own tensors"
        assert codec.decode(other[0]).request_id == 6
        stats = ask([codec.encode(Header(op="stats", client_id=cid))])
        assert codec.decode(stats[0]).body["retries"] == 1
        ctx.term()


def test_client_survives_a_server_restart_at_the_same_address():
    address = f"tcp://127.0.0.1:{_free_port()}"
    srv = start_server(MODEL, bind=address)
    remote = RemoteTarget([address], ClientConfig(transport="shm", attempt_timeout_s=1.0, request_timeout_s=60))
    try:
        before = remote.eagle3(_batch())
        srv.stop()
        srv = start_server(MODEL, bind=address)
        after = remote.eagle3(_batch())  # the new server does not know us: the client says hello again
        for k in before:
            assert torch.equal(before[k], after[k])
    finally:
        remote.close()
        srv.stop()


def test_segments_are_private_and_stale_ones_are_swept():
    with spawn_server(MODEL) as srv, RemoteTarget([srv.address], ClientConfig(transport="shm")) as remote:
        remote.eagle3(_batch())
        (name,) = _segments(srv.proc.pid)
        assert os.stat(f"/dev/shm/{name}").st_mode & 0o777 == 0o600
    dead = start_server(MODEL)
    with RemoteTarget([dead.address], ClientConfig(transport="shm")) as remote:
        remote.eagle3(_batch())
        dead.kill()
    assert _segments(dead.proc.pid), "a SIGKILLed server cannot unlink its own segments"
    with spawn_server(MODEL):
        assert not _segments(dead.proc.pid), "a new server sweeps segments of dead servers"


def test_server_stopped_past_the_lease_recovers_after_sigcont():
    """SIGSTOP longer than the lease: on SIGCONT the server has forgotten the client (or replays its
    queued retry); either way the client gets the right answer without losing its request."""
    with spawn_server(MODEL, extra=("--lease-s", "1.5")) as srv:
        cfg = ClientConfig(transport="shm", attempt_timeout_s=1.0, request_timeout_s=30.0)
        with RemoteTarget([srv.address], cfg) as remote:
            want = remote.eagle3(_batch(9))
            os.kill(srv.proc.pid, signal.SIGSTOP)
            timer = threading.Timer(3.0, os.kill, args=(srv.proc.pid, signal.SIGCONT))
            timer.start()
            got = remote.eagle3(_batch(9))
            timer.join()
            assert all(torch.equal(got[k], want[k]) for k in want)
            assert any("expired" in line for line in srv.log) or remote._servers[0]._lanes[0].retries
