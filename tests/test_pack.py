"""Pack/unpack: the torch fallback equals a byte-by-byte construction, and cuda_ipc's chunk split is exact.

``tests/gpu/test_native_pack.py`` then checks that the native kernel gives the same bytes as this
fallback, so native == fallback == direct construction.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zmqdisagg.native import pack
from zmqdisagg.protocol.tensor_meta import TensorMeta, from_bytes, layout
from zmqdisagg.transports.cuda_ipc import MAX_CHUNKS, chunk_ranges, chunking

SENTINEL = 0xAB


def reply(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "h": torch.randn(3, 7, 5, generator=g).to(torch.bfloat16),
        "f": torch.randn(13, generator=g),
        "i": torch.randint(-(1 << 40), 1 << 40, (5, 3), generator=g),
        "b": torch.rand(17, generator=g) > 0.5,
        "u": torch.randint(0, 256, (1, 999), generator=g, dtype=torch.uint8),
        "s": torch.tensor(7, dtype=torch.int16),
        "e": torch.zeros(0, 4, dtype=torch.float16),
        "t": torch.randn(6, 4, generator=g).t(),  # non-contiguous input
    }


def direct(tensors: dict[str, torch.Tensor], total: int, metas) -> bytes:
    """The expected buffer, built with numpy from each tensor's own bytes."""
    buf = np.full(total, SENTINEL, dtype=np.uint8)
    for m, t in zip(metas, tensors.values()):
        raw = np.frombuffer(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), dtype=np.uint8)
        buf[m.offset:m.offset + m.nbytes] = raw
    return buf.tobytes()


@pytest.mark.parametrize("seed", range(4))
def test_fallback_pack_equals_direct_construction(seed):
    x = reply(seed)
    metas, total = layout(x)
    buf = torch.full((total,), SENTINEL, dtype=torch.uint8)
    pack.pack(list(x.values()), metas, buf, native=False)
    assert buf.numpy().tobytes() == direct(x, total, metas)


def test_unpack_inverts_pack():
    x = reply(11)
    metas, total = layout(x)
    buf = torch.full((total,), SENTINEL, dtype=torch.uint8)
    pack.pack(list(x.values()), metas, buf, native=False)
    outs = [torch.empty(m.shape, dtype=m.torch_dtype) for m in metas]
    pack.unpack(buf, metas, outs, native=False)
    for o, (k, v) in zip(outs, x.items()):
        assert torch.equal(o, v), k
        assert torch.equal(from_bytes(buf, metas[list(x).index(k)]), v)


def test_copy_bytes_and_errors():
    src = torch.randn(33)
    dst = torch.empty(33 * 4, dtype=torch.uint8)
    pack.copy_bytes(dst, src, native=False)
    assert torch.equal(dst.view(torch.float32), src)
    metas, total = layout({"a": src})
    with pytest.raises(ValueError, match="past"):
        pack.pack([src], metas, torch.empty(total - 256, dtype=torch.uint8), native=False)
    with pytest.raises(ValueError, match="metas"):
        pack.pack([src, src], metas, torch.empty(total, dtype=torch.uint8), native=False)
    with pytest.raises(ValueError, match="contiguous"):
        pack.unpack(torch.empty(total, dtype=torch.uint8), *layout({"a": torch.empty(4, 4)})[:1],
                    [torch.empty(4, 4).t()], native=False)
    with pytest.raises(ValueError, match="same byte size"):
        pack.copy_bytes(torch.empty(3), src, native=False)


def test_has_native_is_a_bool_and_fallback_needs_no_cuda():
    assert isinstance(pack.HAS_NATIVE, bool)
    if not torch.cuda.is_available():  # CPU tensors never take the native path
        x = reply(0)
        metas, total = layout(x)
        pack.pack(list(x.values()), metas, torch.empty(total, dtype=torch.uint8))


@pytest.mark.parametrize("sizes", [[1], [5 << 20], [40 << 20, 3, 10 << 20], [300 << 20], [1 << 30, 1 << 30, 7]])
def test_chunk_ranges_cover_every_byte_once(sizes):
    """cuda_ipc pipelines a reply in chunks: each byte in exactly one chunk, cuts 16-byte aligned."""
    metas, off = [], 0
    for i, n in enumerate(sizes):
        metas.append(TensorMeta(name=f"t{i}", dtype="uint8", shape=(n,), offset=off, nbytes=n))
        off += -(-n // 256) * 256
    chunk, n = chunking(off)
    assert 1 <= n <= MAX_CHUNKS and chunk * n >= off
    seen = {i: 0 for i in range(len(sizes))}
    for k, ranges in enumerate(chunk_ranges(metas, chunk, n)):
        for i, a, b in ranges:
            lo, hi = metas[i].offset + a, metas[i].offset + b
            assert k * chunk <= lo < hi <= (k + 1) * chunk
            assert a == seen[i] and lo % 16 == 0
            seen[i] = b
    assert [seen[i] for i in range(len(sizes))] == sizes
