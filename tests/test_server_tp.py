"""Server tensor parallelism on CPU (gloo, 2 real ranks): results, launches, shutdown and rank failures.

The all-reduce after each rowwise layer (o_proj, down_proj) sums two partial matmuls, so hidden states
differ from a single process in their last bits: those are compared with a tolerance that the measured
differences in docs/server_tp.md sit far inside. Everything the reduction order cannot touch (model
info, settings, replicated head weights, typed errors) must be exactly equal.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from zmqdisagg.client.remote import RemoteTarget
from zmqdisagg.config import ClientConfig
from zmqdisagg.errors import BadRequest, PeerTimeout
from zmqdisagg.server.spawn import spawn_server, start_server
from zmqdisagg.target.build import load_target
from zmqdisagg.target.types import TargetBatch, TargetSettings

from test_remote_equals_local import _batch, _t2d  # the same inputs as the single-process tests

CONFIGS = ["configs/tiny-llama.json", "configs/tiny-qwen3.json"]
# (rtol, atol) by dtype. fp32: the measured worst case is 1.2e-6 abs on values up to ~4 (docs/server_tp.md);
# bf16 "target_p" is fp32 rounded to bf16, where a last-bit difference can round one bf16 ulp (2^-7) apart.
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2 ** -7, 1e-6)}


def _assert_tp_close(remote: dict, local: dict) -> float:
    """Same keys, dtypes and shapes; bools exactly equal; floats within tolerance. Returns max |diff|."""
    assert remote.keys() == local.keys()
    worst = 0.0
    for k, want in local.items():
        got = remote[k]
        assert got.dtype == want.dtype and got.shape == want.shape, k
        if want.dtype.is_floating_point:
            rtol, atol = TOLERANCE[want.dtype]
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=f"{k} is too far from local")
            worst = max(worst, (got.float() - want.float()).abs().max().item())
        else:
            assert torch.equal(got, want), f"{k} differs between TP and local"
    return worst


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _follower_pid(log: list[str]) -> int:
    found = re.search(r"started tensor-parallel ranks 1\.\.1 as pids \[(\d+)\]", "\n".join(log))
    assert found, "rank 0 should log the pid of the rank it started"
    return int(found.group(1))


def _wait_gone(pids: list[int], timeout_s: float) -> float:
    started = time.monotonic()
    while any(_alive(p) for p in pids) and time.monotonic() - started < timeout_s:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids), f"ranks {[p for p in pids if _alive(p)]} still running"
    return time.monotonic() - started


@pytest.mark.parametrize("config", CONFIGS)
def test_tp_server_matches_a_single_process(config):
    local = load_target(config)
    vocab = local.info().vocab_size
    worst = 0.0
    with spawn_server(config, extra=("--tp", "2")) as srv:
        for transport in ("shm", "inline"):
            with RemoteTarget([srv.address], ClientConfig(transport=transport)) as remote:
                assert remote.info() == local.info()
                head, want = remote.head_weights(), local.head_weights()
                assert head.keys() == want.keys()
                for k, w in want.items():
                    assert torch.equal(head[k], w), f"head weight {k} must be the full, unsharded tensor"
                for teacher in ("hidden", "target_p_fp32", "target_p_bf16"):
                    settings = TargetSettings(aux_layer_ids=(1, 3, 5), dflash_layer_ids=(2, 4), teacher=teacher)
                    assert remote.configure(settings, _t2d(vocab)) == local.configure(settings, _t2d(vocab))
                    batch = _batch(vocab, seed=len(teacher))
                    worst = max(worst, _assert_tp_close(remote.eagle3(batch), local.eagle3(batch)))
                    worst = max(worst, _assert_tp_close(remote.dflash(batch), local.dflash(batch)))
                with pytest.raises(BadRequest, match="must lie in"):  # refused before it reaches rank 1
                    ids = torch.full((1, 4), vocab + 1)
                    remote.eagle3(TargetBatch(input_ids=ids, attention_mask=torch.ones_like(ids)))
                worst = max(worst, _assert_tp_close(remote.eagle3(_batch(vocab, 7)), local.eagle3(_batch(vocab, 7))))
                (stats,) = remote.stats().values()
                assert stats["tp"] == 2
        follower = _follower_pid(srv.log)
    assert worst > 0.0, "the all-reduce changes the summation order: bit-identical results mean no sharding ran"
    assert sum("sharded" in line and "linear layers" in line for line in srv.log) == 2, "both ranks shard"
    _wait_gone([follower], 5.0)


def test_sigterm_to_rank_0_stops_every_rank():
    srv = start_server(CONFIGS[0], extra=("--tp", "2"))
    follower = _follower_pid(srv.log)
    with RemoteTarget([srv.address], ClientConfig(transport="shm")) as remote:
        remote.eagle3(_batch(remote.info().vocab_size, 1))
        os.kill(srv.proc.pid, signal.SIGTERM)  # a client is still connected while the server stops
        assert srv.proc.wait(10) == 0
        elapsed = _wait_gone([srv.proc.pid, follower], 5.0)
    assert elapsed < 5.0
    assert any("rank 0 said shutdown" in line for line in srv.log), "the follower should stop on rank 0's word"


def test_killed_follower_stops_rank_0_and_clients_time_out():
    srv = start_server(CONFIGS[0], extra=("--tp", "2"))
    follower = _follower_pid(srv.log)
    cfg = ClientConfig(transport="inline", attempt_timeout_s=0.5, request_timeout_s=2.0)
    remote = RemoteTarget([srv.address], cfg)
    try:
        batch = _batch(remote.info().vocab_size, 2)
        remote.eagle3(batch)
        os.kill(follower, signal.SIGKILL)
        assert srv.proc.wait(10) == 1, "rank 0 must exit non-zero once a rank is gone"
        assert any(f"rank 1 (pid {follower}) exited" in line for line in srv.log), srv.log[-5:]
        with pytest.raises(PeerTimeout):
            remote.eagle3(batch)
    finally:
        remote.close()
        srv.stop()


def test_killed_rank_0_stops_the_follower():
    srv = start_server(CONFIGS[0], extra=("--tp", "2"))
    follower = _follower_pid(srv.log)
    srv.kill()
    _wait_gone([follower], 5.0)  # gloo sees the closed connection at the next heartbeat at the latest
    assert any("lost rank 0" in line for line in srv.log)


def test_torchrun_launch_serves_the_same_results():
    local = load_target(CONFIGS[0])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "zmqdisagg.cli.serve", "--model", CONFIGS[0], "--bind", "tcp://127.0.0.1:*"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, address = [], None
        for line in proc.stdout:
            log.append(line)
            if line.startswith("zmqdisagg-serve ready on "):
                address = line.split()[3]
                break
        assert address, "".join(log[-30:])
        with RemoteTarget([address], ClientConfig(transport="inline")) as remote:
            batch = _batch(local.info().vocab_size, 3)
            _assert_tp_close(remote.eagle3(batch), local.eagle3(batch))
            assert next(iter(remote.stats().values()))["tp"] == 2
        proc.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks
        rest = proc.communicate(timeout=20)[0]
        assert "rank 0 said shutdown" in rest, "rank 1 should wait for rank 0's orderly shutdown"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
