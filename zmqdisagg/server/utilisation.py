"""How busy the server is, and how well its requests batch: the ``utilisation`` part of ``stats``.

Guarantees:
- ``busy_fraction`` is the share of the last ``window_s`` seconds (or of the uptime, if shorter) that
  the server loop spent handling messages rather than waiting for them: ~0 when idle, ~1 when
  saturated. It is computed from the recorded busy intervals, so it needs no sampling thread, and in
  time independent of how many intervals the window holds (a running total; only the intervals that
  cross the window's edges are clipped).
- The forward counters are cumulative since start. Every eagle3/dflash forward is counted once,
  with the number of requests it served (1 without batching), its rows, its real tokens and its
  padded size, so ``mean_batch_size`` is exactly requests per forward.

Single-threaded like the server loop that owns it: no locks.
"""

from __future__ import annotations

import collections
import time
from typing import Any

DEFAULT_WINDOW_S = 10.0


class Utilisation:
    """Busy intervals over a sliding window, and counters of forwards and the requests packed into them."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.window_s = window_s
        self.started_at = time.monotonic()
        self._busy: collections.deque[tuple[float, float]] = collections.deque()
        self._busy_total = 0.0  # sum of the lengths of the intervals in ``_busy``
        self.forwards = 0  # model forwards run for eagle3/dflash requests
        self.batches = 0  # forwards that served two or more requests
        self.requests = 0  # requests served by those forwards
        self.batched_requests = 0  # requests that shared their forward with others
        self.tokens = 0  # real (unpadded) token positions computed
        self.padded_tokens = 0  # positions computed, padding included

    def busy(self, start: float, end: float) -> None:
        """Record that the loop worked from ``start`` to ``end`` (``time.monotonic()`` seconds)."""
        self._busy.append((start, end))
        self._busy_total += end - start
        self._trim(end)

    def forward(self, *, requests: int, tokens: int, padded_tokens: int) -> None:
        """Count one forward that served ``requests`` requests holding ``tokens`` real tokens."""
        self.forwards += 1
        self.requests += requests
        self.tokens += tokens
        self.padded_tokens += padded_tokens
        if requests > 1:
            self.batches += 1
            self.batched_requests += requests

    def busy_fraction(self, now: float | None = None) -> float:
        """Share of the window (or of the uptime, if shorter) spent busy."""
        now = time.monotonic() if now is None else now
        self._trim(now)
        lo = max(now - self.window_s, self.started_at)
        span = now - lo
        if span <= 0:
            return 0.0
        # Intervals are appended in time order and never overlap: clip the few at each edge of [lo, now].
        busy = self._busy_total
        for start, end in self._busy:
            if start >= lo:
                break
            busy -= min(end, lo) - start
        for start, end in reversed(self._busy):
            if end <= now:
                break
            busy -= end - max(start, now)
        return min(1.0, max(0.0, busy / span))

    def snapshot(self) -> dict[str, Any]:
        """The JSON-able figures reported by the ``stats`` op."""
        forwards = max(self.forwards, 1)
        return {
            "window_s": self.window_s,
            "busy_fraction": round(self.busy_fraction(), 4),
            "forwards": self.forwards,
            "requests": self.requests,
            "batches": self.batches,
            "batched_requests": self.batched_requests,
            "mean_batch_size": round(self.requests / forwards, 3) if self.forwards else 0.0,
            "mean_forward_tokens": round(self.padded_tokens / forwards, 1) if self.forwards else 0.0,
            "padding_fraction": round(1 - self.tokens / self.padded_tokens, 4) if self.padded_tokens else 0.0,
        }

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        while self._busy and self._busy[0][1] < horizon:
            start, end = self._busy.popleft()
            self._busy_total -= end - start
        if not self._busy:
            self._busy_total = 0.0  # drop the rounding the running sum has gathered
