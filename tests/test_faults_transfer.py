"""kill -9 mid-transfer, through the real server path: a spawned ``zmqdisagg-serve`` and a ``RemoteTarget``
in a spawned trainer process, for the communicator transport (``nccl``; gloo on CPU tensors).

* A server killed mid-transfer: the trainer fails over to a second server, and every batch equals an
  undisturbed run exactly (this found ``RemoteTarget`` letting ``TransportUnavailable`` from an aborted
  communicator escape instead of failing over).
* A trainer killed mid-transfer: the server drops its connection (lease or failed transfer) and serves
  another trainer bit for bit.

"Mid-transfer" is exact, not a race: the trainer wraps its connection's ``transport.get`` and asks
the test to kill once the reply note has arrived and before the bytes are read (``before_read``),
or while it reads them (``during_read``), or it freezes there to be killed itself (``hold``). The real
``get`` always runs. The same scenario runs on GPUs in ``tests/gpu/test_gpu_faults.py``.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing as mp
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from zmqdisagg.client.remote import RemoteTarget
from zmqdisagg.config import ClientConfig
from zmqdisagg.server.spawn import ServerProcess, start_server
from zmqdisagg.target.types import TargetBatch

MODEL = "configs/tiny-llama.json"
CPU_CLIENT = dict(attempt_timeout_s=1.0, request_timeout_s=3.0, transfer_timeout_s=3.0, connect_timeout_s=30.0)
SLACK_S = 10.0  # on top of the client's deadlines before a call counts as hung (2-core CI)


# -- the trainer process ---------------------------------------------------------------------------
def batch(i: int, b: int, s: int) -> TargetBatch:
    ids = torch.randint(0, 320, (b, s), generator=torch.Generator().manual_seed(1000 + i))
    return TargetBatch(input_ids=ids, attention_mask=torch.ones_like(ids))


def digests(out: dict[str, torch.Tensor]) -> dict[str, tuple[str, list[int], str]]:
    """dtype, shape and SHA-256 of every output's bytes (copied to the host on the current stream)."""
    res = {}
    for k, v in sorted(out.items()):
        raw = v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        res[k] = (str(v.dtype), list(v.shape), hashlib.sha256(raw).hexdigest())
    return res


def trainer_main(conn: Any, plan: dict[str, Any]) -> None:
    """Entry of the spawned trainer: run ``plan``, report ("ids" ...), ("kill" ...), ("done", result)."""
    try:
        conn.send(("done", _run(conn, plan)))
    except BaseException:
        conn.send(("err", traceback.format_exc()))


def _run(conn: Any, plan: dict[str, Any]) -> dict[str, Any]:
    cfg = ClientConfig(**plan["config"])
    batches = [batch(i, plan["b"], plan["s"]) for i in range(plan["n"])]
    out: dict[str, Any] = {}
    if plan.get("reference"):  # an undisturbed run against the survivor first
        with RemoteTarget(plan["reference"], cfg) as ref:
            out["reference"] = [digests(ref.eagle3(b)) for b in batches]
    remote = RemoteTarget(plan["addresses"], cfg)
    try:
        out["transports"] = remote.transports
        conn.send(("ids", {s.address: s.client_id for s in remote._servers}))
        if plan.get("kill"):
            _arm(remote, plan["kill"], plan["kill_at"], plan["when"], conn)
        out["digests"], out["seconds"] = [], []
        for b in batches:
            t0 = time.monotonic()
            got = remote.eagle3(b)
            out["seconds"].append(time.monotonic() - t0)
            out["digests"].append(digests(got))
        out["dead"] = dict(remote._dead)
    finally:
        remote.close()
    return out


def _arm(remote: RemoteTarget, address: str, at: int, when: str, conn: Any) -> None:
    """Wrap the data-plane ``get`` of ``address``'s connection: the ``at``-th reply triggers the kill."""
    server = next(s for s in remote._servers if s.address == address)
    real, count = server.transport.get, itertools.count(1)

    def get(note: Any, metas: Any, frames: Any) -> dict[str, torch.Tensor]:
        if next(count) == at:
            conn.send(("kill", when))
            if when == "before_read" and (not conn.poll(120) or conn.recv() != ("killed",)):
                raise RuntimeError("the test did not confirm the kill within 120s")
            if when == "hold":
                time.sleep(600)  # frozen with the transfer in flight until the test kills us
        return real(note, metas, frames)

    server.transport.get = get


# -- the test side ---------------------------------------------------------------------------------
class Trainer:
    """A spawned trainer running one plan; every wait on it is bounded."""

    def __init__(self, plan: dict[str, Any]) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=trainer_main, args=(child, plan), daemon=True)
        self.proc.start()

    def expect(self, kind: str, timeout_s: float) -> Any:
        if not self.conn.poll(timeout_s):
            pytest.fail(f"the trainer sent nothing for {timeout_s:.0f}s while the test waited for {kind!r}: hung")
        try:
            msg = self.conn.recv()
        except EOFError:
            self.proc.join(10)
            pytest.fail(f"the trainer died (exit code {self.proc.exitcode}) before sending {kind!r}")
        if msg[0] == "err":
            pytest.fail(f"the trainer failed:\n{msg[1]}")
        assert msg[0] == kind, msg
        return msg[1]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(60)

    def close(self) -> None:
        if self.proc.is_alive():
            self.kill()


def start_servers(n: int, extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> list[ServerProcess]:
    """``n`` servers started side by side (a start is mostly imports)."""
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(start_server, MODEL, extra=extra, env=env) for _ in range(n)]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        for f in futures:
            if f.exception() is None:
                f.result().stop()
        raise errors[0]
    return [f.result() for f in futures]


def server_killed_mid_transfer(*, transport: str, device: str, client: dict, when: str, n: int, b: int, s: int,
                               extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Servers A and B; the trainer's ``kill_at``-th reply from A triggers SIGKILL of A. Returns the
    trainer's result after checking it: every batch equal to B's undisturbed run, A marked dead."""
    a, b_srv = start_servers(2, extra)
    trainer = None
    try:
        config = {**client, "transport": transport, "device": device}
        plan = dict(config=config, addresses=[a.address, b_srv.address], reference=[b_srv.address], n=n, b=b, s=s,
                    kill=a.address, kill_at=2, when=when)
        trainer = Trainer(plan)
        trainer.expect("ids", 300)
        assert trainer.expect("kill", 300) == when
        a.kill()  # SIGKILL and reap
        if when == "before_read":
            trainer.conn.send(("killed",))
        bound = client["request_timeout_s"] + client["transfer_timeout_s"] + SLACK_S
        res = trainer.expect("done", n * bound)
    finally:
        if trainer is not None:
            trainer.close()
        for srv in (a, b_srv):
            srv.stop()
    assert res["transports"] == {a.address: transport, b_srv.address: transport}, res["transports"]
    assert len(res["digests"]) == n, "a batch was lost"
    for i, (got, want) in enumerate(zip(res["digests"], res["reference"])):
        assert got == want, f"batch {i} differs from the undisturbed run"
    assert list(res["dead"]) == [a.address], res["dead"]
    assert max(res["seconds"]) < bound, res["seconds"]
    return res


def trainer_killed_mid_transfer(srv: ServerProcess, *, transport: str, device: str, client: dict, n: int, b: int,
                                s: int, between: Any = None) -> dict[str, Any]:
    """A reference trainer, then a victim frozen inside its 3rd ``get`` and SIGKILLed, then a third trainer.
    ``between(phase)`` is called at "baseline", "killed" and "reclaimed" (GPU memory checks).
    Returns the reclaim time, the reason the server logged, and when "killed" was measured."""
    config = {**client, "transport": transport, "device": device}
    plan = dict(config=config, addresses=[srv.address], n=n, b=b, s=s)
    ref = Trainer(plan)
    ref.expect("ids", 300)
    want = ref.expect("done", 300)
    ref.close()
    assert want["transports"] == {srv.address: transport}
    if between:
        between("baseline")
    victim = Trainer({**plan, "kill": srv.address, "kill_at": 3, "when": "hold"})
    try:
        gone = victim.expect("ids", 300)[srv.address]
        assert victim.expect("kill", 300) == "hold"
        killed_at = time.monotonic()
        victim.kill()
    finally:
        victim.close()
    if between:
        between("killed")
    measured_s = time.monotonic() - killed_at  # how long after the kill "killed" was measured
    with RemoteTarget([srv.address], ClientConfig(transport="inline", attempt_timeout_s=5.0,
                                                  request_timeout_s=30.0)) as observer:
        deadline = time.monotonic() + 120
        while gone in observer.stats()[srv.address]["clients"]:
            assert time.monotonic() < deadline, "the killed trainer's connection was never reclaimed"
            time.sleep(0.1)
    reclaim_s = time.monotonic() - killed_at
    reason = next((line.split(f"closing client {gone}: ", 1)[1] for line in srv.log
                   if f"closing client {gone}: " in line), None)
    assert reason is not None, srv.log[-20:]
    if between:
        between("reclaimed")
    again = Trainer(plan)
    again.expect("ids", 300)
    res = again.expect("done", 300)
    again.close()
    assert res["digests"] == want["digests"], "the server serves a new trainer differently after the kill"
    assert srv.proc.poll() is None, "the server died with its trainer"
    return {"reclaim_s": reclaim_s, "reason": reason, "killed_measured_s": measured_s}


# -- CPU tests -------------------------------------------------------------------------------------
def test_server_killed_mid_transfer_fails_over_on_cpu():
    res = server_killed_mid_transfer(transport="nccl", device="cpu", client=CPU_CLIENT, when="before_read",
                                     n=6, b=4, s=128)
    print(f"\ngloo, server killed before the read: slowest call {max(res['seconds']):.2f}s, "
          f"failure: {next(iter(res['dead'].values()))[:80]}")


def test_trainer_killed_mid_transfer_is_reclaimed_on_cpu():
    (srv,) = start_servers(1, ("--lease-s", "3"))
    try:
        res = trainer_killed_mid_transfer(srv, transport="nccl", device="cpu", client=CPU_CLIENT, n=4, b=4, s=128)
    finally:
        srv.stop()
    print(f"\ngloo, trainer killed mid-transfer: reclaimed after {res['reclaim_s']:.2f}s ({res['reason']})")
