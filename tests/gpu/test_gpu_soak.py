"""GPU soak: no growth of device memory across 1,000 cuda_ipc requests and 20 connect/disconnect
cycles through a real server (issue 7). Needs CUDA; skipped elsewhere. Run with ``-s`` for the figures.

Device memory is read with ``mem_get_info`` on every GPU (server on cuda:0, this process as the client
on cuda:1 where there is one), after this process has emptied its own caching allocator, so only real
holdings count: the server's slots and cache, and the client's live tensors and IPC mappings. Baselines
are taken after a warm-up, when the allocators have seen every request shape: for the requests with
the client connected, for the cycles with no client connected. Every reply is also checked bit for
bit against the warm-up's reply to the same batch, so a reused slot can never hand back stale bytes.
"""

from __future__ import annotations

import pytest
import torch

from zmqdisagg.client.remote import RemoteTarget
from zmqdisagg.config import ClientConfig
from zmqdisagg.server.spawn import spawn_server
from zmqdisagg.target.types import TargetBatch

pytestmark = pytest.mark.gpu
SLACK = 16 << 20  # allocator rounding and driver bookkeeping; a slot is >= 1 MiB, so a leak of one
# slot per cycle (20 MiB) or per 16 requests shows
REQUESTS, CYCLES, SHAPES = 1000, 20, 50


def _used() -> list[int]:
    """Bytes in use on every GPU, after this process has returned its cached, unused blocks."""
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)
    torch.cuda.empty_cache()
    return [total - free for free, total in (torch.cuda.mem_get_info(d) for d in range(torch.cuda.device_count()))]


def _batch(i: int) -> TargetBatch:
    ids = torch.randint(0, 300, (2, 64 + i % 7), generator=torch.Generator().manual_seed(i))
    return TargetBatch(input_ids=ids, attention_mask=torch.ones_like(ids))


def _mib(xs: list[int]) -> str:
    return ", ".join(f"cuda:{d} {x / (1 << 20):.1f}" for d, x in enumerate(xs))


def _grew(after: list[int], before: list[int]) -> bool:
    return any(a > b + SLACK for a, b in zip(after, before))


def test_cuda_ipc_device_memory_stays_flat():
    client_device = "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"
    cfg = ClientConfig(device=client_device, transport="cuda_ipc")
    with spawn_server("configs/tiny-llama.json", extra=("--device", "cuda:0")) as srv:
        with RemoteTarget([srv.address], cfg) as remote:
            assert remote.transports[srv.address] == "cuda_ipc"
            want = [{k: v.clone() for k, v in remote.eagle3(_batch(i)).items()} for i in range(SHAPES)]
            for i in range(SHAPES):  # warm-up in the measured pattern: the last result is held while the
                got = remote.eagle3(_batch(i))  # next arrives, so the receive slots grow to their steady count
            warm = _used()  # the references stay alive, so they are part of the baseline
            for i in range(REQUESTS):
                got = remote.eagle3(_batch(i % SHAPES))
                assert all(torch.equal(got[k], want[i % SHAPES][k]) for k in want[0]), f"request {i} differs"
            del got
            served = _used()
            (stats,) = remote.stats().values()
        del want
        idle = _used()  # no client connected: the server freed that client's slots on bye
        for cycle in range(CYCLES):
            with RemoteTarget([srv.address], cfg) as remote:
                remote.eagle3(_batch(cycle))
        cycled = _used()
        with RemoteTarget([srv.address], ClientConfig(transport="inline")) as observer:
            (after,) = observer.stats().values()
    delivered = stats.get("you", {}).get("requests")
    print(f"\ncuda_ipc soak: {REQUESTS} requests ({delivered} delivered on that connection), "
          f"device memory used MiB before [{_mib(warm)}] after [{_mib(served)}]; {CYCLES} connect/disconnect "
          f"cycles: before [{_mib(idle)}] after [{_mib(cycled)}]; clients left on the server: "
          f"{len(after['clients']) - 1}")
    assert not _grew(served, warm), (warm, served)
    assert not _grew(cycled, idle), (idle, cycled)
    assert len(after["clients"]) == 1, "a cycled client was still connected after its bye"
