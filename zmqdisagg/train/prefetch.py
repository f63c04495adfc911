"""``Prefetcher``: keep N target requests in flight while the trainer works on the current one.

Timeline with ``depth = 2`` (R_k = request k in flight, T_k = training on result k)::

    submit R0 R1 | wait R0 | submit R2 | T0 | wait R1 | submit R3 | T1 | wait R2 | T2 | ...

Guarantees:
  * results come back in submission order, each exactly once, whatever order the requests finish in;
  * at most ``depth`` requests are in flight while the consumer holds a result; the next one is
    submitted right after each consume ("refilled after each consume");
  * ``depth = 0`` is synchronous: each request runs in the caller's thread when its result is needed;
  * one ``run`` covers a bounded stretch of batches (up to the next checkpoint, eval or the last step):
    when it is exhausted nothing is in flight, and if the consumer stops early or a request fails the
    queued requests are cancelled and the running ones are waited for before ``run`` returns;
  * ``close()`` is idempotent and stops the worker threads.

Failover is the target's business (``RemoteTarget`` retries a request on another server), so a batch
whose server dies is neither lost nor duplicated here: its future simply resolves later.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Iterator

import torch

from zmqdisagg.errors import ConfigError
from zmqdisagg.target.types import TargetBatch

logger = logging.getLogger(__name__)


class Prefetcher:
    """Run ``getattr(target, op)(batch)`` ahead of the consumer, ``depth`` requests deep.

    ``workers`` bounds how many requests run at once (default ``depth``). Use 1 for a target that
    must not run concurrently with itself (the in-process ``TargetModel``).
    """

    def __init__(self, target: Any, op: str = "eagle3", depth: int = 0, workers: int | None = None) -> None:
        if depth < 0:
            raise ConfigError(f"prefetch_depth={depth} must be >= 0")
        self._call = getattr(target, op)
        self.depth = depth
        self._pool = ThreadPoolExecutor(max(1, min(workers or depth, depth)), "zmqdisagg-prefetch") if depth else None
        self._closed = False

    def run(self, batches: Iterable[TargetBatch]) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
        """Yield ``(outputs, wait_s)`` for each batch, in order; ``wait_s`` is the time spent blocked."""
        if self._closed:
            raise RuntimeError("Prefetcher is closed")
        if self._pool is None:
            for batch in batches:
                t0 = time.perf_counter()
                out = self._call(batch)
                yield out, time.perf_counter() - t0
            return
        yield from self._run_async(iter(batches))

    def _run_async(self, it: Iterator[TargetBatch]) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
        pending: deque[Future] = deque()
        try:
            self._submit(it, pending, self.depth)
            while pending:
                t0 = time.perf_counter()
                out = pending.popleft().result()
                wait = time.perf_counter() - t0
                self._submit(it, pending, 1)
                yield out, wait
        finally:
            self._drain(pending)

    def _submit(self, it: Iterator[TargetBatch], pending: deque[Future], n: int) -> None:
        for _ in range(n):
            batch = next(it, None)
            if batch is None:
                return
            pending.append(self._pool.submit(self._call, batch))

    @staticmethod
    def _drain(pending: deque[Future]) -> None:
        """Cancel what has not started and wait for what has, so no request outlives ``run``."""
        for fut in pending:
            fut.cancel()
        for fut in pending:
            if not fut.cancelled():
                try:
                    fut.result()
                except Exception:  # the consumer already stopped; the error has nowhere to go
                    logger.debug("a prefetched request failed after the consumer stopped", exc_info=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
