"""Soak: 10,000 requests from 4 concurrent clients over shm and inline, with no growth of server
memory (RSS < 5%), shared-memory segments or file descriptors."""

from __future__ import annotations

import os
import threading

import torch

from zmqdisagg.client.remote import RemoteTarget
from zmqdisagg.config import ClientConfig
from zmqdisagg.server.spawn import spawn_server
from zmqdisagg.target.types import TargetBatch

TOTAL = 10_000
CLIENTS = ("shm", "inline", "shm", "inline")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _resources(pid: int) -> tuple[int, int, int]:
    segments = sum(n.startswith(f"zmqdisagg-{pid}-") for n in os.listdir("/dev/shm"))
    return _rss_kib(pid), segments, len(os.listdir(f"/proc/{pid}/fd"))


def _run(address: str, transport: str, count: int, errors: list, seed: int) -> None:
    try:
        with RemoteTarget([address], ClientConfig(transport=transport)) as remote:
            g = torch.Generator().manual_seed(seed)
            for i in range(count):
                ids = torch.randint(0, 300, (1, 8 + i % 5), generator=g)
                out = remote.eagle3(TargetBatch(input_ids=ids, attention_mask=torch.ones_like(ids)))
                if out["aux_hidden"].shape[:2] != ids.shape:
                    raise AssertionError(f"wrong shape {out['aux_hidden'].shape} for {ids.shape}")
    except BaseException as e:  # reported by the main thread
        errors.append(e)


def _round(address: str, per_client: int, errors: list) -> None:
    threads = [threading.Thread(target=_run, args=(address, t, per_client, errors, i)) for i, t in enumerate(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)


def test_soak_holds_memory_segments_and_fds_flat():
    with spawn_server("configs/tiny-llama.json") as srv:
        pid = srv.proc.pid
        errors: list[BaseException] = []
        _round(srv.address, 100, errors)  # warm up: allocator pools, imported modules, first segments
        rss0, seg0, fds0 = _resources(pid)
        _round(srv.address, TOTAL // len(CLIENTS), errors)
        rss1, seg1, fds1 = _resources(pid)
        assert not errors, errors[:3]
        assert rss1 < rss0 * 1.05, f"server RSS grew from {rss0} to {rss1} KiB"
        assert seg1 <= seg0, f"shm segments grew from {seg0} to {seg1}"
        assert fds1 <= fds0, f"file descriptors grew from {fds0} to {fds1}"
        print(f"soak: RSS {rss0} -> {rss1} KiB, segments {seg0} -> {seg1}, fds {fds0} -> {fds1}")
