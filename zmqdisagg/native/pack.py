"""Pack a reply's tensors into one byte buffer and unpack them, in one kernel launch when possible.

``pack(tensors, metas, buf)`` writes tensor *i* to ``buf[metas[i].offset : +nbytes]`` (the layout of
``protocol.tensor_meta.layout``); ``unpack(buf, metas, outs)`` is its inverse; ``copy_bytes`` copies one
range. With the native extension (``HAS_NATIVE``) and CUDA tensors, each call is one launch of the copy
kernel in ``csrc/copy.cu`` on the current stream of the current device; otherwise (CPU, no build, or
``native=False``) each tensor is one ``Tensor.copy_``. Both paths write exactly the payload bytes and
leave padding untouched, so they give the same buffer; ``tests/test_pack.py`` and
``tests/gpu/test_native_pack.py`` check that.

Cross-device use (pointers on another GPU) is the caller's business: the kernel runs on the current
device, which needs peer access to every pointer it touches.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Sequence

import torch

from zmqdisagg.protocol.tensor_meta import TensorMeta, as_bytes, from_bytes

logger = logging.getLogger(__name__)

try:
    from zmqdisagg.native import _C  # type: ignore[attr-defined]

    HAS_NATIVE = True
except ImportError:  # not built here (no CUDA/nvcc at install time): the torch fallback is exact too
    _C = None
    HAS_NATIVE = False

BLOCKS_PER_SM = 4  # 512-thread CTAs: four fill an SM's 2048 threads


@functools.lru_cache(maxsize=None)
def _blocks(device: int) -> int:
    return BLOCKS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _native_ok(native: bool, tensors: Sequence[torch.Tensor]) -> bool:
    return native and HAS_NATIVE and all(t.is_cuda for t in tensors)


def _launch(entries: list[tuple[int, int, int]], stream: torch.cuda.Stream | None = None) -> None:
    stream = stream or torch.cuda.current_stream()
    _C.copy_list(entries, _blocks(stream.device.index), stream.cuda_stream)


def copy_list(entries: Sequence[tuple[int, int, int]], stream: torch.cuda.Stream | None = None) -> None:
    """Native only: copy ``(src_ptr, dst_ptr, nbytes)`` ranges in one launch on ``stream``'s device.

    Every pointer must be reachable from that device (local, IPC-mapped, or a peer with access on).
    """
    if not HAS_NATIVE:
        raise RuntimeError("zmqdisagg.native._C is not built; check HAS_NATIVE before calling copy_list")
    _launch(list(entries), stream)


def pack(tensors: Sequence[torch.Tensor], metas: Sequence[TensorMeta], buf: torch.Tensor,
         *, native: bool = True) -> None:
    """Write each tensor's bytes at its meta's offset in the ``uint8`` buffer ``buf``."""
    _check(metas, buf, tensors)
    if _native_ok(native, [buf, *tensors]):
        srcs = [t.contiguous() for t in tensors]  # a no-op for the usual contiguous outputs
        _launch([(s.data_ptr(), buf.data_ptr() + m.offset, m.nbytes) for s, m in zip(srcs, metas)])
        return
    for t, m in zip(tensors, metas):
        buf[m.offset:m.offset + m.nbytes].copy_(as_bytes(t.detach()), non_blocking=True)


def unpack(buf: torch.Tensor, metas: Sequence[TensorMeta], outs: Sequence[torch.Tensor],
           *, native: bool = True) -> None:
    """Fill each (contiguous) output from its meta's bytes in ``buf``."""
    _check(metas, buf, outs)
    if any(not o.is_contiguous() for o in outs):
        raise ValueError("unpack writes into contiguous outputs only")
    if _native_ok(native, [buf, *outs]):
        _launch([(buf.data_ptr() + m.offset, o.data_ptr(), m.nbytes) for o, m in zip(outs, metas)])
        return
    for o, m in zip(outs, metas):
        o.copy_(from_bytes(buf, m), non_blocking=True)


def copy_bytes(dst: torch.Tensor, src: torch.Tensor, *, native: bool = True,
               stream: torch.cuda.Stream | None = None) -> None:
    """``dst.copy_(src)`` for two contiguous tensors of equal byte size, on SMs when native."""
    n = src.numel() * src.element_size()
    if n != dst.numel() * dst.element_size() or not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("copy_bytes needs two contiguous tensors of the same byte size")
    if _native_ok(native, [dst, src]):
        _launch([(src.data_ptr(), dst.data_ptr(), n)], stream)
        return
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        as_bytes(dst).copy_(as_bytes(src), non_blocking=True)


def _check(metas: Sequence[TensorMeta], buf: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise ValueError(f"pack buffer must be 1-D uint8, got {buf.dtype} {tuple(buf.shape)}")
    if len(metas) != len(tensors):
        raise ValueError(f"{len(tensors)} tensors for {len(metas)} metas")
    for m, t in zip(metas, tensors):
        if m.offset + m.nbytes > buf.numel():
            raise ValueError(f"tensor {m.name!r} ends at {m.offset + m.nbytes}, past {buf.numel()} bytes")
        if t.numel() * t.element_size() != m.nbytes:
            raise ValueError(f"tensor {m.name!r} has {t.numel() * t.element_size()} bytes, meta says {m.nbytes}")

