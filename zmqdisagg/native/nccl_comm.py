"""A two-rank NCCL communicator on a dedicated stream, through cupy's ``NcclCommunicator``.

Rank 0 (the server) makes the unique id (``rendezvous``); it travels to rank 1 over our own ZeroMQ
channel, and both call ``join``, which blocks until the other side arrives (run it off the serving
thread). ``send``/``recv`` post one NCCL group for a whole reply on the dedicated stream and return a
non-blocking completion check that also surfaces ``ncclCommGetAsyncError``. ``abort`` is
``ncclCommAbort`` on a helper thread with a bounded wait, so it can never hang its caller.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from zmqdisagg.errors import TransportUnavailable

logger = logging.getLogger(__name__)

SERVER_RANK, CLIENT_RANK = 0, 1


def nccl_missing() -> str | None:
    try:
        from cupy.cuda import nccl  # noqa: F401
    except Exception as e:  # ImportError, or cupy built without NCCL
        return f"cupy with NCCL is not importable ({e}); install cupy-cuda12x/13x"
    return None


class NcclPair:
    """A cupy ``NcclCommunicator`` of two ranks and its dedicated stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self.comm: Any = None
        self._aborted = False

    def rendezvous(self) -> dict[str, Any]:
        from cupy.cuda import nccl

        uid = nccl.get_unique_id()  # bytes in cupy >= 13, a tuple of chars before
        return {"uid": (uid if isinstance(uid, bytes) else bytes(b & 0xFF for b in uid)).hex()}

    def join(self, rank: int, offer: Mapping[str, Any]) -> None:
        import cupy
        from cupy.cuda import nccl

        raw = bytes.fromhex(str(offer["uid"]))
        torch.cuda.set_device(self.device)
        t0 = time.perf_counter()
        with cupy.cuda.Device(self.device.index):
            try:
                comm = nccl.NcclCommunicator(2, raw, rank)
            except TypeError:  # older cupy: a tuple of signed chars
                comm = nccl.NcclCommunicator(2, tuple(b - 256 if b > 127 else b for b in raw), rank)
        if self._aborted:
            comm.abort()
            raise TransportUnavailable("connection closed while joining")
        self.comm = comm
        logger.info("nccl communicator rank %d on %s ready in %.0f ms", rank, self.device,
                    (time.perf_counter() - t0) * 1e3)

    def _group(self, tensors: Sequence[torch.Tensor], ready: torch.cuda.Event, send: bool) -> Callable[[], bool]:
        from cupy.cuda import nccl

        peer = CLIENT_RANK if send else SERVER_RANK
        with torch.cuda.device(self.device):
            self.stream.wait_event(ready)
            nccl.groupStart()
            try:
                for t in tensors:
                    n = t.numel() * t.element_size()
                    if n:
                        op = self.comm.send if send else self.comm.recv
                        op(t.data_ptr(), n, nccl.NCCL_UINT8, peer, self.stream.cuda_stream)
            finally:
                nccl.groupEnd()
            done = torch.cuda.Event()
            done.record(self.stream)
        for t in tensors:
            t.record_stream(self.stream)

        def check() -> bool:
            if done.query():
                return True
            self.comm.check_async_error()
            return False

        return check

    def send(self, tensors: Sequence[torch.Tensor], ready: torch.cuda.Event) -> Callable[[], bool]:
        return self._group(tensors, ready, send=True)

    def recv(self, tensors: Sequence[torch.Tensor], ready: torch.cuda.Event) -> Callable[[], bool]:
        return self._group(tensors, ready, send=False)

    def abort(self) -> None:
        self._aborted = True
        comm, self.comm = self.comm, None
        if comm is not None:  # ncclCommAbort can itself stall on old NCCL: never let it hold us
            t = threading.Thread(target=comm.abort, daemon=True, name="zmqdisagg-nccl-abort")
            t.start()
            t.join(5.0)

    def close(self, abort: bool) -> None:
        # Always ncclCommAbort: ncclCommDestroy in NCCL 2.28 waits for the peer to destroy too, so a
        # server closing first (bye) and a client closing after the bye reply deadlocked (seen on H200).
        if not abort and self.comm is not None:
            self.stream.synchronize()
        self.abort()
