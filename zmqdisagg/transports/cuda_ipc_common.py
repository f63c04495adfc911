"""Pieces both ``cuda_ipc`` modes share: raw device views, chunk arithmetic, copies, event polling.

Nothing here imports cupy at module level, so ``import zmqdisagg.transports.cuda_ipc`` works on a
machine without CUDA; the functions that need cupy import it when called.

Guarantees:

* ``chunking``/``chunk_ranges`` cut a reply into at most ``MAX_CHUNKS`` whole-MiB chunks (so every cut
  stays 16-byte aligned) and give every byte to exactly one chunk (``tests/test_pack.py``).
* ``RawRange`` exposes ``[ptr, ptr + nbytes)`` through ``__cuda_array_interface__`` (version 2: no
  stream key, so torch adds no synchronisation). torch keeps a reference to the object for as long as
  any tensor made from it lives and drops it when the storage is freed, so a subclass with ``__del__``
  learns exactly when the last view is gone (``cuda_ipc_recv.Lease`` relies on this).
* ``wait_event`` never blocks the GPU: it polls ``Event.query()`` from the host against a deadline.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import torch

from zmqdisagg.errors import PeerTimeout
from zmqdisagg.protocol.tensor_meta import TensorMeta

logger = logging.getLogger(__name__)

MIN_SLOT_BYTES = 1 << 20
MAX_CHUNKS = 8  # events per slot; the offer carries max_slots x MAX_CHUNKS event handles
MIN_CHUNK_BYTES = 16 << 20  # payloads up to 2x this go in one chunk
SM_COPY_MAX_BYTES = 64 << 20  # client copies up to this on SMs (native kernel), above on the copy engine
PACK_SM_MAX_BYTES = 64 << 20  # server packs up to this with one kernel launch, above with the copy engine
HANDLE_HEX = 128  # a cudaIpcMemHandle_t / cudaIpcEventHandle_t is 64 bytes
SPIN_S = 0.005  # wait_event spins this long before it starts yielding the CPU


class RawRange:
    """A raw device byte range in ``__cuda_array_interface__`` form, so torch can view it without copying."""

    __slots__ = ("__cuda_array_interface__", "__weakref__")

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 2}


def view(ptr: int, nbytes: int, index: int, owner: RawRange | None = None) -> torch.Tensor:
    """A ``uint8`` tensor over ``[ptr, ptr + nbytes)`` on GPU ``index``; it keeps ``owner`` alive."""
    return torch.as_tensor(owner if owner is not None else RawRange(ptr, nbytes),
                           device=torch.device("cuda", index))


def pow2_at_least(nbytes: int, floor: int = MIN_SLOT_BYTES) -> int:
    """Slot sizes are powers of two of at least ``floor`` bytes, so a few slots serve any size mix."""
    return max(floor, 1 << (max(nbytes, 1) - 1).bit_length())


def chunking(total: int, min_chunk: int = MIN_CHUNK_BYTES) -> tuple[int, int]:
    """(chunk bytes, chunk count) for a ``total``-byte reply: one chunk up to 2x ``min_chunk``."""
    if total <= 2 * min_chunk:
        return max(total, 1), 1
    chunk = max(min_chunk, -(-total // MAX_CHUNKS))
    chunk = -(-chunk // (1 << 20)) * (1 << 20)  # whole MiB: every cut stays 16-byte aligned
    return chunk, -(-total // chunk)


def chunk_ranges(metas: Sequence[TensorMeta], chunk: int, n: int) -> list[list[tuple[int, int, int]]]:
    """For each chunk k, the (tensor index, start, end) byte ranges of tensors that fall inside it."""
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
    for i, m in enumerate(metas):
        a = 0
        while a < m.nbytes:
            k = (m.offset + a) // chunk
            b = min(m.nbytes, (k + 1) * chunk - m.offset)
            out[k].append((i, a, b))
            a = b
    return out


def copy_ranges(entries: Sequence[tuple[int, int, int]], stream: torch.cuda.Stream, use_sm: bool) -> None:
    """Copy (src, dst, n) ranges on ``stream``: one SM-kernel launch, or one copy-engine call each.

    An SM launch must run with ``stream``'s device current (the caller's guard); copy-engine calls name
    their stream, and ``cudaMemcpyDefault`` lets UVA work out the direction and the peer path.
    """
    entries = [e for e in entries if e[2]]
    if not entries:
        return
    if use_sm:
        from zmqdisagg.native import pack as native

        native.copy_list(entries, stream)
        return
    import cupy

    rt, handle = cupy.cuda.runtime, stream.cuda_stream
    for src, dst, n in entries:
        rt.memcpyAsync(dst, src, n, rt.memcpyDefault, handle)


def wait_event(event: torch.cuda.Event, timeout_s: float, what: str) -> None:
    """Poll ``event`` until it completes or ``timeout_s`` passes (spin 5 ms, then yield, then 0.1 ms sleeps).

    The first ``query()`` usually succeeds (the reply header travels slower than a small copy), so the
    common case costs one driver call and no GPU-side wait behind an interprocess event.
    """
    if event.query():
        return
    start = time.monotonic()
    while not event.query():
        waited = time.monotonic() - start
        if waited > timeout_s:
            raise PeerTimeout(f"{what} did not finish within {timeout_s:g}s; the server is gone or stuck")
        if waited > 10 * SPIN_S:
            time.sleep(0.0001)
        elif waited > SPIN_S:
            time.sleep(0)


def enable_peer_access(a: int, b: int) -> None:
    """Peer access both ways, clearing CUDA's 'already enabled' error so torch never trips on it."""
    if a == b:
        return
    import cupy

    rt = cupy.cuda.runtime
    ensure = getattr(rt, "_deviceEnsurePeerAccess", None)  # cupy >= 13: idempotent, clears the error
    for src, dst in ((a, b), (b, a)):
        with cupy.cuda.Device(src):
            try:
                if ensure is not None:
                    ensure(dst)
                elif rt.deviceCanAccessPeer(src, dst):
                    rt.deviceEnablePeerAccess(dst)
            except rt.CUDARuntimeError as e:
                logger.warning("peer access %d->%d: %s (copies may bounce through the host)", src, dst, e)
