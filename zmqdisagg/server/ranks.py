"""The process group of a tensor-parallel server: rendezvous, rank watch, and an orderly end.

Rendezvous (see ``launch.py`` for how the processes start): a spawning rank 0 opens a private
``TCPStore`` on 127.0.0.1 (the OS picks the port) and writes ``HOST:PORT`` to each follower's stdin;
followers read it from there. Under torchrun every rank uses ``env://``.

Guarantees:
- The process group exists in these server processes only, never in a client's.
- The model's collectives use the default group (nccl on cuda, gloo on cpu). Rank 0's commands use a
  separate gloo group, so they travel as CPU tensors and a dead peer's closed socket is noticed at
  once. Both time out after ``timeout_s``.
- ``check()`` raises ``RankFailed`` once a spawned follower has exited; ``close()`` waits for the
  followers, kills any that outlive the grace period, and leaves the group unless it is broken.
"""

from __future__ import annotations

import datetime
import logging
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from zmqdisagg.server.launch import RankPlan
from zmqdisagg.server.tp import RankFailed

logger = logging.getLogger(__name__)


class RankGroup:
    """Join (or form) the group; owns the follower processes that a spawning rank 0 started."""

    def __init__(self, plan: RankPlan, device: str, *, timeout_s: float,
                 children: list[subprocess.Popen] | None = None) -> None:
        self.plan = plan
        self.children = list(children or [])
        self._closed = False
        timeout = datetime.timedelta(seconds=timeout_s)
        backend = "nccl" if device.startswith("cuda") else "gloo"
        try:
            if backend == "nccl":
                torch.cuda.set_device(torch.device(device))
            if plan.launcher == "torchrun":
                dist.init_process_group(backend, init_method="env://", timeout=timeout)
            else:
                dist.init_process_group(backend, store=self._store(timeout), rank=plan.rank,
                                        world_size=plan.world, timeout=timeout)
            self.control = dist.new_group(backend="gloo", timeout=timeout)
        except BaseException:
            self.close(grace_s=0.0, broken=True)
            raise
        logger.info("rank %d of %d joined (%s, %s)", plan.rank, plan.world, backend, plan.launcher)

    def _store(self, timeout: datetime.timedelta) -> dist.Store:
        if self.plan.rank > 0:
            host, _, port = sys.stdin.readline().strip().rpartition(":")
            if not port.isdigit():
                raise RankFailed("rank 0 exited before it sent the rendezvous address; see its log")
            return dist.TCPStore(host, int(port), self.plan.world, False, timeout=timeout)
        store = dist.TCPStore("127.0.0.1", 0, self.plan.world, True, timeout=timeout, wait_for_workers=False)
        for rank, child in enumerate(self.children, start=1):
            try:
                child.stdin.write(f"127.0.0.1:{store.port}\n")
                child.stdin.close()
            except OSError as e:  # BrokenPipe: the follower died while starting
                raise RankFailed(f"tensor-parallel rank {rank} (pid {child.pid}) died while starting: {e}") from e
        return store

    def check(self) -> None:
        """Raise ``RankFailed`` if a spawned follower process has exited."""
        for rank, child in enumerate(self.children, start=1):
            code = child.poll()
            if code is not None:
                raise RankFailed(f"tensor-parallel rank {rank} (pid {child.pid}) exited with code {code}; "
                                 "see its log above. Restart zmqdisagg-serve")

    def close(self, grace_s: float = 5.0, *, broken: bool = False) -> None:
        """Leave the group, then reap spawned followers (SIGKILL after ``grace_s``). Idempotent.

        Leaving first lets a follower still waiting on rank 0 fail at once instead of at its timeout.
        ``broken``: a rank failed, so the group is not destroyed (that could wait on the dead rank).
        """
        if self._closed:
            return
        self._closed = True
        if dist.is_initialized() and not broken:
            try:
                dist.destroy_process_group()
            except Exception as e:  # noqa: BLE001 - a broken group may refuse to close; we exit anyway
                logger.info("destroying the process group failed: %s", e)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("tensor-parallel follower pid %d did not exit; killing it", child.pid)
                child.kill()
                child.wait()
