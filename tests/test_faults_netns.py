"""Cut a real network link mid-run: one server lives in its own network namespace behind a veth pair.

    root namespace                                  namespace zmqdisagg-<tag>
    --------------                                  -------------------------
    test process (clients), "near" server on        "far" zmqdisagg-serve --insecure
    127.0.0.1  -- zdh<tag> 198.18.x.1/30 ==veth== zdn<tag> 198.18.x.2/30 --

The link is cut in two ways: ``blackhole`` drops every packet on both ends silently (``netem loss
100%``, or ``pfifo limit 0`` where netem is not built), ``link-down`` takes the host end down. The
client must then fail with a typed error within its configured deadlines (never hang), fail over to
the near server with results bitwise equal to a local target, and the far server must reclaim the
cut-off client by its lease and keep serving new clients once the link is back. Needs root and
``ip netns`` (CI runs as root); otherwise the module skips with the reason. Names and the /30 are
random, so parallel runs do not collide; the namespace, the veth pair and the far server are removed
by a finalizer even when a test fails.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

from zmqdisagg.client.remote import RemoteTarget
from zmqdisagg.config import ClientConfig
from zmqdisagg.errors import NoServerAvailable, PeerTimeout
from zmqdisagg.server import spawn
from zmqdisagg.server.spawn import ServerProcess, start_server
from zmqdisagg.target.build import load_target
from zmqdisagg.target.types import TargetBatch

MODEL = "configs/tiny-llama.json"
LEASE_S = 3.0  # the far server's lease: how long a cut-off client's state may outlive it
ATTEMPT_S, REQUEST_S = 0.5, 2.0  # client deadlines, set through ZMQDISAGG_* like a user would
SLACK_S = 3.0  # scheduling slack on top of a deadline before a call counts as hung (2-core CI)
TEST_NET = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544 benchmarking range: never a real network


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=True)


def _quiet(*cmd: str) -> None:
    subprocess.run(cmd, capture_output=True, timeout=10)


def _free_subnet() -> ipaddress.IPv4Network:
    """A random /30 of the test range that no address on this host overlaps (parallel runs pick apart)."""
    words = _ip("-4", "-o", "addr", "show").stdout.split()
    used = [ipaddress.ip_interface(words[i + 1]).network for i, w in enumerate(words) if w == "inet"]
    while True:
        start = int(TEST_NET.network_address) + 4 * random.randrange(TEST_NET.num_addresses // 4)
        net = ipaddress.ip_network((start, 30))
        if not any(net.overlaps(u) for u in used):
            return net


@dataclass(kw_only=True)
class Veth:
    """A veth pair from the root namespace into ``ns``, and the two ways of cutting it."""

    ns: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str
    drop: tuple[str, ...] = ()  # the tc qdisc that drops everything, found by ``probe_drop``

    def probe_drop(self) -> None:
        for qdisc in (("netem", "loss", "100%"), ("pfifo", "limit", "0")):
            try:
                _ip("link", "show", self.host_if)
                subprocess.run(["tc", "qdisc", "add", "dev", self.host_if, "root", *qdisc],
                               capture_output=True, text=True, timeout=10, check=True)
            except subprocess.CalledProcessError:
                continue
            _quiet("tc", "qdisc", "del", "dev", self.host_if, "root")
            self.drop = qdisc
            return

    def cut(self, how: str) -> None:
        if how == "blackhole":
            subprocess.run(["tc", "qdisc", "add", "dev", self.host_if, "root", *self.drop], check=True, timeout=10)
            subprocess.run(["ip", "netns", "exec", self.ns, "tc", "qdisc", "add", "dev", self.ns_if, "root",
                            *self.drop], check=True, timeout=10)
        else:
            _ip("link", "set", self.host_if, "down")

    def mend(self) -> None:
        _quiet("tc", "qdisc", "del", "dev", self.host_if, "root")
        _quiet("ip", "netns", "exec", self.ns, "tc", "qdisc", "del", "dev", self.ns_if, "root")
        _ip("link", "set", self.host_if, "up")

    def remove(self) -> None:
        pids = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True, timeout=10).stdout
        for pid in pids.split():  # only our far server can live in a namespace we just made
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        _quiet("ip", "link", "del", self.host_if)  # also removes the peer; netns deletion alone is lazy
        _quiet("ip", "netns", "del", self.ns)


@pytest.fixture(scope="module")
def veth(request) -> Veth:
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("network-namespace tests need root on Linux (ip netns, veth, tc)")
    if not (shutil.which("ip") and shutil.which("tc")):
        pytest.skip("network-namespace tests need the ip and tc commands (iproute2)")
    tag = uuid.uuid4().hex[:8]
    try:
        net = _free_subnet()
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"cannot list addresses with ip: {e}")
    hosts = [str(h) for h in net.hosts()]
    v = Veth(ns=f"zmqdisagg-{tag}", host_if=f"zdh{tag}", ns_if=f"zdn{tag}", host_ip=hosts[0], ns_ip=hosts[1])
    request.addfinalizer(v.remove)  # before anything exists, so a half-built setup is removed too
    try:
        _ip("netns", "add", v.ns)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot create a network namespace here: {e.stderr.strip()}")
    try:
        _ip("link", "add", v.host_if, "type", "veth", "peer", "name", v.ns_if)
        _ip("link", "set", v.ns_if, "netns", v.ns)
        _ip("addr", "add", f"{v.host_ip}/30", "dev", v.host_if)
        _ip("-n", v.ns, "addr", "add", f"{v.ns_ip}/30", "dev", v.ns_if)
        _ip("-n", v.ns, "link", "set", "lo", "up")
        _ip("-n", v.ns, "link", "set", v.ns_if, "up")
        _ip("link", "set", v.host_if, "up")
        subprocess.run(["ip", "netns", "exec", v.ns, "true"], capture_output=True, text=True, timeout=10, check=True)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot set up a veth pair into a namespace here: {e.stderr.strip()}")
    v.probe_drop()
    return v


def _start_in_netns(ns: str, bind: str, extra: tuple[str, ...], timeout_s: float = 120.0) -> ServerProcess:
    """``start_server`` with the child entering ``ns`` first (``ip netns exec`` execs, so the pid is the server's)."""
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "zmqdisagg.cli.serve", "--model", MODEL,
           "--bind", bind, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    ready: list[str] = []
    seen = threading.Event()
    threading.Thread(target=spawn._read, args=(proc, log, ready, seen), daemon=True).start()
    seen.wait(timeout_s)
    if not ready:
        proc.kill()
        proc.wait()
        raise PeerTimeout("far server did not become ready:\n" + "\n".join(log[-30:]))
    address = ready[0][len(spawn.READY):].split()[0]
    return ServerProcess(proc=proc, address=address, transports=(), log=log)


@pytest.fixture(scope="module")
def servers(veth):
    """(far, near): far bound to the namespace end of the veth, near on loopback; started side by side."""
    with ThreadPoolExecutor(2) as pool:
        far_f = pool.submit(_start_in_netns, veth.ns, f"tcp://{veth.ns_ip}:*",
                            ("--insecure", "--lease-s", str(LEASE_S)))
        near_f = pool.submit(start_server, MODEL)
        started = []
        try:
            for f in (far_f, near_f):
                started.append(f.result())
        except BaseException:
            for f in (far_f, near_f):
                if f.done() and f.exception() is None:
                    f.result().stop()
            raise
    far, near = started
    yield far, near
    for srv in (far, near):
        srv.stop()


@pytest.fixture(scope="module")
def local():
    model = load_target(MODEL)
    yield model
    model.close()


@pytest.fixture(autouse=True)
def client_env(monkeypatch, veth):
    """Small deadlines through the environment, and the link mended after every test."""
    monkeypatch.setenv("ZMQDISAGG_ATTEMPT_TIMEOUT_S", str(ATTEMPT_S))
    monkeypatch.setenv("ZMQDISAGG_REQUEST_TIMEOUT_S", str(REQUEST_S))
    monkeypatch.setenv("ZMQDISAGG_TRANSPORT", "inline")  # every byte crosses the link we cut
    yield
    veth.mend()


def _config() -> ClientConfig:
    cfg = ClientConfig(connect_timeout_s=10.0)
    assert (cfg.attempt_timeout_s, cfg.request_timeout_s, cfg.transport) == (ATTEMPT_S, REQUEST_S, "inline")
    return cfg


def _batch(seed: int, b: int = 2, s: int = 160) -> TargetBatch:
    ids = torch.randint(0, 320, (b, s), generator=torch.Generator().manual_seed(seed))
    return TargetBatch(input_ids=ids, attention_mask=torch.ones_like(ids))


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _within(limit_s: float, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` on a helper thread; fail the test (instead of hanging it) if it outlives ``limit_s``."""
    pool = ThreadPoolExecutor(1)
    try:
        future = pool.submit(fn, *args)
        if not wait([future], timeout=limit_s).done:  # not result(timeout): PeerTimeout is a TimeoutError
            pytest.fail(f"{getattr(fn, '__name__', fn)} hung for more than {limit_s:.1f}s")
        return future.result()
    finally:
        pool.shutdown(wait=False)


@pytest.mark.parametrize("how", ["blackhole", "link-down"])
def test_cut_link_gives_a_typed_error_within_the_deadline(servers, veth, local, how, record_property):
    far, _ = servers
    if how == "blackhole" and not veth.drop:
        pytest.skip("tc has neither netem nor pfifo here to drop packets")
    remote = RemoteTarget([far.address], _config())
    try:
        assert _same(remote.eagle3(_batch(1)), local.eagle3(_batch(1)))
        veth.cut(how)
        started = time.monotonic()
        with pytest.raises(NoServerAvailable) as info:
            _within(REQUEST_S + SLACK_S, remote.eagle3, _batch(2))
        detected = time.monotonic() - started
    finally:
        remote.close()
    assert isinstance(info.value.__cause__, PeerTimeout), info.value.__cause__
    assert far.address in str(info.value)
    record_property("detection_s", round(detected, 3))
    print(f"\nnetns {how} ({' '.join(veth.drop) if how == 'blackhole' else 'ip link set down'}): "
          f"PeerTimeout after {detected:.2f}s (attempt {ATTEMPT_S}s, request {REQUEST_S}s)")


def test_failover_across_a_cut_link_equals_a_local_target(servers, veth, local, record_property):
    """Sequential calls alternate between far and near; the link is cut while a call to far is in
    flight. Every batch comes back exactly once, equal to the local target's, and far is marked dead."""
    far, near = servers
    batches = [_batch(10 + i) for i in range(12)]
    want = [local.eagle3(b) for b in batches]
    remote = RemoteTarget([far.address, near.address], _config())
    far_conn = next(s for s in remote._servers if s.address == far.address)
    latencies: list[float] = []
    cut: dict[str, float] = {}

    def cutter() -> None:  # cut once a few calls are done and one is in flight to far
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (len(latencies) >= 3 and far_conn.in_flight):
            time.sleep(0.0005)
        cut["in_flight"] = far_conn.in_flight
        veth.cut("blackhole" if veth.drop else "link-down")
        cut["at"] = time.monotonic()

    def run() -> list[dict[str, torch.Tensor]]:
        out = []
        for b in batches:
            t0 = time.monotonic()
            out.append(remote.eagle3(b))
            latencies.append(time.monotonic() - t0)
        return out

    thread = threading.Thread(target=cutter, daemon=True)
    thread.start()
    try:
        got = _within(len(batches) + REQUEST_S + SLACK_S, run)
    finally:
        thread.join(5)
        remote.close()
    assert "at" in cut, "the link was never cut"
    assert len(got) == len(batches), "a batch was lost or duplicated"
    for i, (g, w) in enumerate(zip(got, want)):
        assert _same(g, w), f"batch {i} differs from the local target after failover"
    assert list(remote._dead) == [far.address], remote._dead
    slowest = max(latencies)
    record_property("failover_call_s", round(slowest, 3))
    print(f"\nnetns failover: cut with {cut['in_flight']} call(s) in flight to far; the slowest call "
          f"(detection + resend to near) took {slowest:.2f}s; {len(got)}/{len(batches)} batches equal local")


def test_cut_off_server_reclaims_the_client_by_its_lease_and_serves_new_ones(servers, veth, local, record_property):
    far, _ = servers
    remote = RemoteTarget([far.address], _config())
    try:
        remote.eagle3(_batch(3))
        gone = remote._servers[0].client_id
        veth.cut("blackhole" if veth.drop else "link-down")
        cut_at = time.monotonic()
        with pytest.raises(NoServerAvailable):
            _within(REQUEST_S + SLACK_S, remote.eagle3, _batch(4))
    finally:
        remote.close()  # no bye: the server is dead to this client, so only its lease can free it
    veth.mend()
    with RemoteTarget([far.address], _config()) as fresh:  # a new client is served at once
        assert _same(fresh.eagle3(_batch(5)), local.eagle3(_batch(5)))
        me = fresh._servers[0].client_id
        deadline = cut_at + LEASE_S + 15
        while True:
            clients = _within(REQUEST_S + SLACK_S, fresh.stats)[far.address]["clients"]
            if gone not in clients or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        reclaimed = time.monotonic() - cut_at
        assert gone not in clients, f"the cut-off client was still held {reclaimed:.1f}s after the cut"
        assert me in clients
        assert any(f"closing client {gone}: lease" in line for line in far.log), far.log[-20:]
        assert _same(fresh.eagle3(_batch(6)), local.eagle3(_batch(6)))
    record_property("reclaim_s", round(reclaimed, 3))
    print(f"\nnetns reclaim: the far server dropped the cut-off client {reclaimed:.2f}s after the cut "
          f"(lease {LEASE_S}s) and served a new client throughout")
