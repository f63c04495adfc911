"""Native copy kernel == torch fallback, byte for byte, on one GPU and across two."""

from __future__ import annotations

import pytest
import torch

from zmqdisagg.native import pack
from zmqdisagg.protocol.tensor_meta import layout

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not pack.HAS_NATIVE, reason="zmqdisagg.native._C is not built (setup.py)")]

DTYPES = [torch.bfloat16, torch.float32, torch.int64, torch.uint8, torch.bool, torch.float16, torch.int16]


def reply(n: int, seed: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        size = int(torch.randint(0, 200_000, (1,), generator=g)) if i % 5 else (1 << 20) + 7 * i
        dt = DTYPES[i % len(DTYPES)]
        t = torch.randint(0, 127, (size,), generator=g).to(dt)
        out[f"t{i}"] = t.to(device)
    return out


@pytest.mark.parametrize("n", [1, 3, 70])  # 70 > 64 entries: two launches
def test_native_pack_unpack_equals_fallback(n):
    x = reply(n, n, "cuda:0")
    metas, total = layout(x)
    a = torch.full((total,), 0xAB, dtype=torch.uint8, device="cuda:0")
    b = a.clone()
    pack.pack(list(x.values()), metas, a, native=True)
    pack.pack(list(x.values()), metas, b, native=False)
    torch.cuda.synchronize()
    assert torch.equal(a, b)
    outs = [torch.empty(m.shape, dtype=m.torch_dtype, device="cuda:0") for m in metas]
    pack.unpack(a, metas, outs, native=True)
    torch.cuda.synchronize()
    assert all(torch.equal(o, v) for o, v in zip(outs, x.values()))


@pytest.mark.parametrize("nbytes,offset", [(16 << 20, 0), ((1 << 20) + 3, 5), (4097, 1)])
def test_sm_copy_same_and_unaligned(nbytes, offset):
    src = torch.randint(0, 255, (nbytes + offset,), dtype=torch.uint8, device="cuda:0")[offset:]
    dst = torch.zeros(nbytes + 1, dtype=torch.uint8, device="cuda:0")[1:]
    pack.copy_bytes(dst, src, native=True)
    torch.cuda.synchronize()
    assert torch.equal(dst, src)


@pytest.mark.multi_gpu(2)
def test_sm_copy_push_across_gpus():
    src = torch.randint(0, 255, (64 << 20,), dtype=torch.uint8, device="cuda:0")
    dst = torch.zeros(64 << 20, dtype=torch.uint8, device="cuda:1")
    torch.zeros(1, device="cuda:1").copy_(torch.zeros(1, device="cuda:0"))  # torch turns peer access on
    with torch.cuda.device(0):
        pack.copy_bytes(dst, src, native=True, stream=torch.cuda.current_stream(0))
    torch.cuda.synchronize(0)
    assert torch.equal(dst.cpu(), src.cpu())
