"""Servers that come back: a dead server is probed and re-admitted, and a start tolerates servers that are down.

Every result is compared bit for bit with a local target configured the same way (non-default layers, a
``t2d``), so a re-admitted server that missed the replay of ``configure`` would show. Re-admission is
checked on the server itself: its ``stats`` show this client's requests after the restart.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from zmqdisagg.client.remote import RemoteTarget
from zmqdisagg.config import ClientConfig
from zmqdisagg.errors import ConfigError, NoServerAvailable
from zmqdisagg.server.spawn import start_server
from zmqdisagg.target.build import load_target
from zmqdisagg.target.types import TargetBatch, TargetSettings

MODEL = "configs/tiny-llama.json"
SETTINGS = TargetSettings(aux_layer_ids=(1, 3, 5), dflash_layer_ids=(2, 4))
REVIVE_S = 0.5
CLIENT = dict(transport="shm", attempt_timeout_s=0.5, request_timeout_s=2.0, connect_timeout_s=2.0, revive_s=REVIVE_S)
WAIT_S = 60.0  # bound on any wait below before the test counts as hung (2-core CI)


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _t2d(vocab: int) -> torch.Tensor:
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[::3] = True
    return t2d


def _batches(n: int = 4) -> list[TargetBatch]:
    out = []
    for i in range(n):
        ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(i))
        out.append(TargetBatch(input_ids=ids, attention_mask=torch.ones_like(ids)))
    return out


@pytest.fixture(scope="module")
def want():
    """The local target's results for ``_batches()`` under ``SETTINGS``."""
    local = load_target(MODEL)
    try:
        local.configure(SETTINGS, _t2d(local.info().vocab_size))
        yield [local.eagle3(b) for b in _batches()]
    finally:
        local.close()


@pytest.fixture(scope="module")
def good():
    """A server that stays up through every test of the module."""
    srv = start_server(MODEL)
    yield srv
    srv.stop()


def _check(remote: RemoteTarget, want: list, rounds: int = 1) -> float:
    """Every batch, from 3 threads at once (as a prefetcher sends them), equals the local target's.
    Returns the slowest call's seconds (reported, not asserted)."""
    def timed(batch: TargetBatch) -> tuple[dict, float]:
        t0 = time.monotonic()
        return remote.eagle3(batch), time.monotonic() - t0

    slowest = 0.0
    with ThreadPoolExecutor(3) as pool:
        for _ in range(rounds):
            for i, (got, seconds) in enumerate(pool.map(timed, _batches())):
                assert got.keys() == want[i].keys()
                assert all(torch.equal(got[k], want[i][k]) for k in got), f"batch {i} differs from the local target"
                slowest = max(slowest, seconds)
    return slowest


def _until(done, remote: RemoteTarget, want: list, what: str) -> float:
    """Keep calling (checking every result) until ``done()``; returns the seconds it took."""
    started = time.monotonic()
    while not done():
        assert time.monotonic() - started < WAIT_S, f"{what} did not happen within {WAIT_S:.0f}s"
        _check(remote, want)
        time.sleep(0.02)
    return time.monotonic() - started


def _served_us(remote: RemoteTarget, address: str) -> int:
    """Data requests the server at ``address`` served for this client's current connection."""
    return remote.stats()[address]["you"]["requests"]


def test_killed_server_is_readmitted_after_a_restart(good, want):
    address = _free_address()
    srv = start_server(MODEL, bind=address)
    remote = RemoteTarget([address, good.address], ClientConfig(**CLIENT))
    try:
        remote.configure(SETTINGS, _t2d(remote.info().vocab_size))
        _check(remote, want)
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait()
        dead_s = _until(lambda: address in remote._dead, remote, want, "failover")
        srv = start_server(MODEL, bind=address)  # a new process at the same address
        back_s = _until(lambda: address not in remote._dead, remote, want, "re-admission")
        before = _served_us(remote, address)  # its trial, and any call since the re-admission
        _check(remote, want, rounds=3)
        assert _served_us(remote, address) > before, "the restarted server served none of our requests"
        print(f"\nkilled server: failover after {dead_s:.2f}s, re-admitted {back_s:.2f}s after its restart")
    finally:
        remote.close()
        srv.stop()


def test_start_with_a_server_down_and_admit_it_later(good, want):
    address = _free_address()  # nothing listens there yet
    started = time.monotonic()
    remote = RemoteTarget([address, good.address], ClientConfig(**CLIENT))
    srv = None
    try:
        start_s = time.monotonic() - started
        assert list(remote._dead) == [address] and "PeerTimeout" in remote._dead[address]
        remote.configure(SETTINGS, _t2d(remote.info().vocab_size))
        slowest = _check(remote, want, rounds=5)  # a probe of the dead server rides on some of these calls
        srv = start_server(MODEL, bind=address)
        back_s = _until(lambda: address not in remote._dead, remote, want, "admission")
        before = _served_us(remote, address)
        _check(remote, want, rounds=3)
        assert _served_us(remote, address) > before, "the late server served none of our requests"
        print(f"\nstarted without a server in {start_s:.2f}s (slowest call while it was down {slowest:.3f}s); "
              f"admitted {back_s:.2f}s after it came up")
    finally:
        remote.close()
        if srv is not None:
            srv.stop()


def test_every_server_down_raises_within_the_connect_deadline(good):
    addresses = [_free_address() for _ in range(4)]
    cfg = ClientConfig(**CLIENT)
    started = time.monotonic()
    with pytest.raises(NoServerAvailable) as info:
        RemoteTarget(addresses, cfg)
    elapsed = time.monotonic() - started
    assert all(a in str(info.value) for a in addresses), str(info.value)
    # in parallel: one connect deadline, not one per server (4 in a row would take 8 s)
    assert elapsed < cfg.connect_timeout_s + 4.0, f"gave up after {elapsed:.1f}s"
    with pytest.raises(NoServerAvailable, match="min_servers=2") as info:
        RemoteTarget([addresses[0], good.address], ClientConfig(**CLIENT, min_servers=2))
    assert addresses[0] in str(info.value)
    with pytest.raises(ConfigError, match="min_servers=3"):
        RemoteTarget(addresses[:2], ClientConfig(**CLIENT, min_servers=3))


def test_a_server_back_with_another_model_stays_out(good, want, caplog):
    caplog.set_level(logging.INFO, logger="zmqdisagg.client")
    address = _free_address()
    remote = RemoteTarget([address, good.address], ClientConfig(**CLIENT))
    srv = start_server("configs/tiny-qwen3.json", bind=address)
    try:
        remote.configure(SETTINGS, _t2d(remote.info().vocab_size))
        refused = lambda: any("stays out of rotation" in r.getMessage() for r in caplog.records)  # noqa: E731
        _until(refused, remote, want, "the error about the other model")
        _until(lambda: sum("stays out" in r.getMessage() for r in caplog.records) >= 2, remote, want, "a 2nd probe")
        assert address in remote._dead and list(remote.stats()) == [good.address]
        assert "same --model" in next(r.getMessage() for r in caplog.records if "stays out" in r.getMessage())
        assert not any("re-admitted" in r.getMessage() for r in caplog.records)
        assert not any(" -> transport " in line for line in srv.log), "a probe must not connect to a wrong model"
    finally:
        remote.close()
        srv.stop()
