"""Server-side batching: packed requests get what they would get alone, errors stay per request.

To make requests arrive "together" deterministically, the server is SIGSTOPped while the clients
send, then SIGCONTed: its next round drains them all at once. What holds on CPU (docs/server_batching.md):
packs of equal-length requests are bit-identical to lone forwards (one CPU thread per process, as
conftest sets), padded packs of mixed lengths are close but not bitwise, and batching is off by default.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from typing import Any, Callable

import pytest
import torch
import zmq

from zmqdisagg.client.remote import RemoteTarget
from zmqdisagg.config import ClientConfig
from zmqdisagg.protocol import codec
from zmqdisagg.protocol.messages import Header
from zmqdisagg.server.batching import Batcher, Job
from zmqdisagg.server.spawn import spawn_server
from zmqdisagg.server.utilisation import Utilisation
from zmqdisagg.target.build import load_target
from zmqdisagg.target.types import TargetBatch, TargetSettings
from zmqdisagg.topology import local_identity

MODEL = "configs/tiny-llama.json"
BUDGET = 4096
SLOW = ClientConfig(transport="inline", attempt_timeout_s=30, request_timeout_s=60, max_lanes=1)


def _batch(seed: int, rows: int = 2, length: int = 32) -> TargetBatch:
    ids = torch.randint(0, 256, (rows, length), generator=torch.Generator().manual_seed(seed))
    return TargetBatch(input_ids=ids, attention_mask=torch.ones_like(ids))


def _t2d() -> torch.Tensor:
    t2d = torch.zeros(320, dtype=torch.bool)
    t2d[::3] = True
    return t2d


@pytest.fixture(scope="module")
def local():
    model = load_target(MODEL)
    yield model
    model.close()


@pytest.fixture(scope="module")
def batched():
    with spawn_server(MODEL, extra=("--batch-tokens", str(BUDGET), "--max-slots", "2")) as srv:
        yield srv


def _together(pid: int, calls: list[Callable[[], Any]]) -> list[Any]:
    """Start every call while the server is stopped, so that all its requests queue up; then resume it."""
    results: list[Any] = [None] * len(calls)
    entered = threading.Semaphore(0)

    def run(i: int) -> None:
        entered.release()
        try:
            results[i] = calls[i]()
        except BaseException as e:  # returned, and checked by the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    os.kill(pid, signal.SIGSTOP)
    try:
        for t in threads:
            t.start()
        for _ in threads:  # every call has begun...
            entered.acquire(timeout=30)
        time.sleep(1.5)  # ...and has sent by now, on 2 busy cores too; the stopped server has read nothing
    finally:
        os.kill(pid, signal.SIGCONT)
    for t in threads:
        t.join(60)
    return results


def _utilisation(remote: RemoteTarget) -> dict:
    (stats,) = remote.stats().values()
    return stats["utilisation"]


def _assert_same(got: Any, want: dict) -> None:
    assert not isinstance(got, BaseException), got
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), f"{k} differs from a lone forward"


def _clients(address: str, settings: list[tuple[TargetSettings, torch.Tensor | None]], config=SLOW):
    """One warmed-up client per settings, each with a single lane (so each call is one request)."""
    remotes = [RemoteTarget([address], config) for _ in settings]
    for remote, (s, t2d) in zip(remotes, settings):
        remote.configure(s, t2d)
        remote.eagle3(_batch(0, 1, 8))  # opens the lane before the server is stopped
    return remotes


def test_equal_length_packs_are_bitwise_and_settings_never_mix(batched, local):
    plain, other_layers = TargetSettings(), TargetSettings(aux_layer_ids=(0, 4, 6), dflash_layer_ids=(3,))
    # (settings, t2d, op): three packable eagle3, three packable dflash, and two that must run apart
    plan = [(plain, None, "eagle3")] * 3 + [(plain, None, "dflash")] * 3 + [
        (other_layers, None, "eagle3"), (TargetSettings(teacher="target_p_fp32"), _t2d(), "eagle3")]
    remotes = _clients(batched.address, [(s, t2d) for s, t2d, _ in plan])
    try:
        before = _utilisation(remotes[0])
        got = _together(batched.proc.pid, [lambda r=r, op=op, i=i: getattr(r, op)(_batch(i))
                                           for i, (r, (_, _, op)) in enumerate(zip(remotes, plan))])
        after = _utilisation(remotes[0])
    finally:
        for r in remotes:
            r.close()
    for i, (s, t2d, op) in enumerate(plan):
        local.configure(s, t2d)
        _assert_same(got[i], getattr(local, op)(_batch(i)))
    assert after["batches"] - before["batches"] == 2, (before, after)
    assert after["batched_requests"] - before["batched_requests"] == 6
    assert after["forwards"] - before["forwards"] == 4


def test_mixed_lengths_are_padded_and_close(batched, local):
    remotes = _clients(batched.address, [(TargetSettings(), None)] * 4)
    lengths = (17, 24, 31, 40)
    try:
        before = _utilisation(remotes[0])
        got = _together(batched.proc.pid, [lambda r=r, n=n: r.eagle3(_batch(n, 2, n)) for r, n in zip(remotes, lengths)])
        after = _utilisation(remotes[0])
    finally:
        for r in remotes:
            r.close()
    local.configure(TargetSettings())
    worst = 0.0
    for out, n in zip(got, lengths):
        want = local.eagle3(_batch(n, 2, n))
        for k in want:
            assert out[k].shape == want[k].shape and out[k].dtype == want[k].dtype
            torch.testing.assert_close(out[k], want[k], rtol=1e-5, atol=1e-5)
            worst = max(worst, (out[k] - want[k]).abs().max().item())
    assert after["padding_fraction"] > before["padding_fraction"], "the pack should have been padded"
    assert worst < 1e-5  # measured: 9.5e-7 (docs/server_batching.md)


class _Raw:
    """A client speaking the protocol by hand, with REQ sockets connected (and greeted) in advance."""

    def __init__(self, address: str, ctx: zmq.Context, transport: str = "inline") -> None:
        self.address, self.ctx, self.cid = address, ctx, uuid.uuid4().hex
        hello = Header(op="hello", body={"identity": local_identity().to_wire(), "transport": transport})
        assert self.ask(self.socket(), hello)[0].op == "ok"

    def socket(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        sock.send(codec.encode(Header(op="info")))  # completes the handshake before the server is stopped
        sock.recv_multipart()
        return sock

    def ask(self, sock: zmq.Socket, header: Header, tensors: dict | None = None) -> tuple[Header, list[bytes]]:
        metas, frames = codec.tensor_frames(tensors or {})
        header = Header(op=header.op, client_id=self.cid, request_id=header.request_id, lane=header.lane,
                        body=header.body, tensors=metas)
        sock.send_multipart([codec.encode(header), *[bytes(f) for f in frames]])
        parts = sock.recv_multipart()
        return codec.decode(parts[0]), parts[1:]


def test_one_bad_request_does_not_fail_its_group(batched, local):
    ctx = zmq.Context()
    try:
        bad_ids, hoarder = _Raw(batched.address, ctx), _Raw(batched.address, ctx, transport="shm")
        bad_sock, hoarder_sock = bad_ids.socket(), hoarder.socket()
        for rid in (1, 2):  # the hoarder never releases, so it holds all its --max-slots 2 slots
            assert hoarder.ask(hoarder_sock, Header(op="eagle3", request_id=rid), _batch(rid).tensors())[0].op == "ok"
        good = _clients(batched.address, [(TargetSettings(), None)] * 2)
        too_big = {"input_ids": torch.full((2, 32), 999), "attention_mask": torch.ones(2, 32, dtype=torch.int64)}
        before = _utilisation(good[0])
        calls = [lambda: bad_ids.ask(bad_sock, Header(op="eagle3", request_id=1), too_big),
                 lambda: hoarder.ask(hoarder_sock, Header(op="eagle3", request_id=3), _batch(3).tensors()),
                 lambda: good[0].eagle3(_batch(21)), lambda: good[1].eagle3(_batch(22))]
        (bad, _), (full, _), out0, out1 = _together(batched.proc.pid, calls)
        after = _utilisation(good[0])
        for r in good:
            r.close()
    finally:
        ctx.destroy(linger=0)
    assert after["batched_requests"] - before["batched_requests"] == 3, "the hoarder's request shares the forward"
    assert bad.op == "error" and bad.body["code"] == "BadRequest", bad.body
    assert full.op == "error" and full.body["code"] == "ResourceExhausted", full.body
    local.configure(TargetSettings())
    _assert_same(out0, local.eagle3(_batch(21)))
    _assert_same(out1, local.eagle3(_batch(22)))


def test_a_retry_queued_behind_its_original_gets_the_same_reply(batched):
    ctx = zmq.Context()
    try:
        client, other = _Raw(batched.address, ctx), _Raw(batched.address, ctx)
        socks = [client.socket(), client.socket(), other.socket()]  # the retry comes on a fresh socket
        request = Header(op="eagle3", request_id=5, lane=0)
        first, again, _ = _together(batched.proc.pid, [
            lambda: client.ask(socks[0], request, _batch(5).tensors()),
            lambda: client.ask(socks[1], request, _batch(5).tensors()),
            lambda: other.ask(socks[2], Header(op="eagle3", request_id=5), _batch(6).tensors())])
        stats, _ = client.ask(socks[0], Header(op="stats"))
    finally:
        ctx.destroy(linger=0)
    assert first[0].op == "ok" and first[0] == again[0] and first[1] == again[1], "a retry must replay the reply"
    assert stats.body["retries"] >= 1


def _three_together(extra: tuple[str, ...], op: str, seed: int) -> tuple[list[dict], dict]:
    """Three default-settings clients of one server send ``op`` at once; their results and the server's stats."""
    with spawn_server(MODEL, extra=extra) as srv:
        remotes = _clients(srv.address, [(TargetSettings(), None)] * 3)
        try:
            calls = [lambda r=r, i=i: getattr(r, op)(_batch(seed + i)) for i, r in enumerate(remotes)]
            got = _together(srv.proc.pid, calls)
            (stats,) = remotes[0].stats().values()
        finally:
            for r in remotes:
                r.close()
    return got, stats


def test_batching_is_off_by_default_and_utilisation_is_reported(local):
    got, stats = _three_together((), "eagle3", 30)
    local.configure(TargetSettings())
    for i, out in enumerate(got):
        _assert_same(out, local.eagle3(_batch(30 + i)))
    util = stats["utilisation"]
    assert stats["batch_tokens"] == 0 and util["batches"] == 0 and util["mean_batch_size"] == 1.0
    assert util["forwards"] == 6  # three warm-up requests and three queued together, each alone
    assert 0.0 < util["busy_fraction"] <= 1.0


def test_batching_on_a_tensor_parallel_server(local):
    """Packs go through the TP broadcast like single requests; results are TP-close (test_server_tp.py)."""
    got, stats = _three_together(("--tp", "2", "--batch-tokens", str(BUDGET)), "dflash", 40)
    local.configure(TargetSettings())
    for i, out in enumerate(got):
        torch.testing.assert_close(out["hidden"], local.dflash(_batch(40 + i))["hidden"], rtol=1e-5, atol=1e-6)
    assert stats["tp"] == 2 and stats["utilisation"]["batches"] == 1


def _job(rows: int, length: int, op: str = "eagle3", settings: TargetSettings = TargetSettings()) -> Job:
    return Job(envelope=[], header=Header(op=op), conn=None, batch=_batch(length, rows, length),
               settings=settings, t2d=None)


def test_plan_respects_the_budget_the_fill_rule_and_compatibility():
    batcher = Batcher(budget=256, utilisation=Utilisation())
    jobs = [_job(2, 32), _job(2, 32), _job(2, 30), _job(1, 8), _job(2, 32, op="dflash"),
            _job(2, 32, settings=TargetSettings(aux_layer_ids=(0, 1, 2)))]
    packs = [[(j.op, j.rows, j.length) for j in p] for p in batcher.plan(jobs)]
    # 2x32 + 2x32 = 128 <= 256; adding 2x30 -> 6 rows x 32 = 192 fits; adding 1x8 -> 7 x 32 = 224 positions
    # of which 196 are real: fits too. Another op, or other layers, never share a forward.
    assert packs == [[("eagle3", 2, 32), ("eagle3", 2, 32), ("eagle3", 2, 30), ("eagle3", 1, 8)],
                     [("dflash", 2, 32)], [("eagle3", 2, 32)]]
    sparse = Batcher(budget=4096, utilisation=Utilisation()).plan([_job(1, 100), _job(4, 10), _job(4, 10)])
    assert [[j.length for j in p] for p in sparse] == [[100], [10, 10]], "5 x 100 for 140 real tokens: not packed"


def test_utilisation_counts_busy_time_in_its_window():
    util = Utilisation(window_s=10.0)
    now = time.monotonic()
    util.started_at = now - 30
    util.busy(now - 25, now - 20)  # outside the window: forgotten
    util.busy(now - 6, now - 4)
    util.busy(now - 1, now)
    assert util.busy_fraction(now) == pytest.approx(0.3)
    util.forward(requests=3, tokens=90, padded_tokens=120)
    util.forward(requests=1, tokens=30, padded_tokens=30)
    snap = util.snapshot()
    assert snap["forwards"] == 2 and snap["batches"] == 1 and snap["batched_requests"] == 3
    assert snap["mean_batch_size"] == 2.0 and snap["padding_fraction"] == pytest.approx(0.2)
