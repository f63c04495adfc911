"""The ``nccl`` transport's moving parts that are not the communicator: a transfer's ``Work`` handle
and the per-connection worker thread.

* ``Transfer``: one reply's send or receive in flight, with a deadline. ``NcclTransport._post`` makes
  one; its watchdog thread (``NcclTransport._watch``) polls ``is_completed`` so a dead peer aborts the
  communicator even when nobody waits. On failure it calls ``NcclTransport._abort``.
* ``Worker``: runs joins and first sends, which may block on the peer, off the caller's thread.
* ``run_into``: runs a post inline (a warm NCCL communicator only enqueues) and fills its future.

The transport itself (offer/accept, put/get) lives in ``nccl``; the gloo link in ``nccl_gloo``.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable

from zmqdisagg.errors import PeerTimeout, TransportUnavailable

if TYPE_CHECKING:
    from zmqdisagg.transports.nccl import NcclTransport


class Transfer:
    """One reply's send or receive in flight; implements ``Work``.

    ``is_completed`` never raises: it is True once the bytes moved *or* the transfer failed, and then
    ``error`` says which (None on success). ``wait`` raises the failure.
    """

    __slots__ = ("_owner", "_posted", "_done", "_deadline", "_what", "error", "_finished", "keep")

    def __init__(self, owner: "NcclTransport", posted: Future, what: str) -> None:
        self._owner, self._posted, self._what = owner, posted, what
        self._done: Callable[[], bool] | None = None  # set by the poster: link-level completion check
        self._deadline = time.monotonic() + owner.ctx.transfer_timeout_s
        self.error: BaseException | None = None
        self._finished = False
        self.keep: Any = None  # tensors that must stay alive until the bytes have moved

    def is_completed(self) -> bool:
        try:
            return self._poll()
        except Exception:
            return True  # failed; ``error`` holds why

    def wait(self, timeout: float | None = None) -> None:
        """Block until done (spinning for 2 ms, then 0.2 ms sleeps); raise if the transfer failed."""
        until = None if timeout is None else time.monotonic() + timeout
        start = time.monotonic()
        while not self._poll():
            if until is not None and time.monotonic() > until:
                raise PeerTimeout(f"{self._what} still running after {timeout:g}s")
            if time.monotonic() - start > 0.002:
                time.sleep(0.0002)

    def _poll(self) -> bool:
        if self._finished:
            return True
        if self.error is not None:
            raise self.error
        try:
            if self._posted.done():
                self._posted.result()  # re-raises a posting error
                if self._done is not None and self._done():
                    self._finished, self.keep = True, None
                    self._owner._warm = True
                    return True
        except Exception as e:  # the link reported an error (gloo's own deadline reads "Timed out")
            kind = PeerTimeout if any(w in str(e).lower() for w in ("timed out", "timeout")) else TransportUnavailable
            self._fail(kind(f"{self._what} failed: {e}; the connection was aborted, close it and "
                            "handshake again"))
        if time.monotonic() > self._deadline:
            self._fail(PeerTimeout(
                f"{self._what} did not finish within {self._owner.ctx.transfer_timeout_s:g}s: the peer is "
                "gone or not receiving; the communicator was aborted. Raise ZMQDISAGG_TRANSFER_TIMEOUT_S "
                "if the link is just slow"))
        return False

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
            self.keep = None
            self._owner._abort(str(error))
        raise self.error


class Worker:
    """One daemon thread running jobs in order: joins and first sends, which may block on the peer.

    A daemon, so a join whose peer never comes (a client that died between hello and accept) can
    never keep the process from exiting.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        self._jobs.put((fut, fn, args))
        return fut

    def stop(self) -> None:
        self._jobs.put(None)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn, args = job
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:
                    fut.set_exception(e)


def run_into(fut: Future, fn: Callable[[], None]) -> None:
    try:
        fn()
        fut.set_result(None)
    except BaseException as e:  # surfaced by Transfer.is_completed
        fut.set_exception(e)


__all__ = ["Transfer", "Worker", "run_into"]
