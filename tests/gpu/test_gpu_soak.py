"""GPU soak: no growth of device memory across 1,000 cuda_ipc requests and 20 connect/disconnect
cycles through a real server (issue 7). Needs CUDA; skipped elsewhere."""

from __future__ import annotations

import torch

import pytest

from zmqdisagg.client.remote import RemoteTarget
from zmqdisagg.config import ClientConfig
from zmqdisagg.server.spawn import spawn_server
from zmqdisagg.target.types import TargetBatch

pytestmark = pytest.mark.gpu
SLACK = 16 << 20  # allocator rounding and NCCL/driver bookkeeping


def _used(device: int) -> int:
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def _batch(i: int) -> TargetBatch:
    ids = torch.randint(0, 300, (2, 64 + i % 7), generator=torch.Generator().manual_seed(i))
    return TargetBatch(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_cuda_ipc_device_memory_stays_flat():
    client_device = "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"
    with spawn_server("configs/tiny-llama.json", extra=("--device", "cuda:0")) as srv:
        cfg = ClientConfig(device=client_device, transport="cuda_ipc")
        with RemoteTarget([srv.address], cfg) as remote:
            for i in range(50):
                remote.eagle3(_batch(i))
            torch.cuda.synchronize()
            before = [_used(d) for d in range(torch.cuda.device_count())]
            for i in range(1000):
                remote.eagle3(_batch(i))
            torch.cuda.synchronize()
            after = [_used(d) for d in range(torch.cuda.device_count())]
        assert all(a <= b + SLACK for a, b in zip(after, before)), (before, after)
        for cycle in range(20):
            with RemoteTarget([srv.address], cfg) as remote:
                remote.eagle3(_batch(cycle))
        torch.cuda.synchronize()
        cycled = [_used(d) for d in range(torch.cuda.device_count())]
        assert all(c <= b + SLACK for c, b in zip(cycled, before)), (before, cycled)
