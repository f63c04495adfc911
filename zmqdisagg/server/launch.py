"""How the processes of a tensor-parallel server start: by ``zmqdisagg-serve --tp T`` itself, or by torchrun.

This module imports no torch on purpose: rank 0 starts its followers before it imports torch and
transformers, so every rank pays those seconds at the same time.

- ``zmqdisagg-serve --tp T``: this process is rank 0. It starts T-1 copies of itself,
  ``python -m zmqdisagg.cli.serve ARGS --tp-rank r``, each with a pipe as stdin. Once rank 0 has
  opened its private TCPStore it writes ``HOST:PORT`` to every follower's stdin (``ranks.py``); a
  follower whose stdin closes before that line arrives (rank 0 died) exits.
- ``torchrun --nproc-per-node T -m zmqdisagg.cli.serve ...``: ``RANK``, ``WORLD_SIZE`` and
  ``LOCAL_RANK`` come from torchrun, the group forms with ``env://``, and torchrun owns the processes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

from zmqdisagg.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class RankPlan:
    """This process's place in the group, decided from flags and environment before anything loads."""

    rank: int
    world: int
    local_rank: int
    launcher: str  # "single", "spawn" (zmqdisagg-serve --tp) or "torchrun"

    def device(self, device: str) -> str:
        """The device this rank computes on: ``cuda`` becomes ``cuda:LOCAL_RANK`` in a group."""
        if self.world == 1 or device == "cpu":
            return device
        if device != "cuda":
            raise ConfigError(f"--device {device} with --tp {self.world}: pass --device cuda, and each rank "
                              "takes cuda:LOCAL_RANK (pick the GPUs with CUDA_VISIBLE_DEVICES)")
        return f"cuda:{self.local_rank}"


def plan_ranks(tp: int, tp_rank: int | None, environ: Mapping[str, str] = os.environ) -> RankPlan:
    """Decide the launch from ``--tp``, the internal ``--tp-rank`` and torchrun's variables."""
    if tp < 1:
        raise ConfigError(f"--tp={tp} must be at least 1 (1: no tensor parallelism)")
    if tp_rank is not None:
        if not 0 < tp_rank < tp:
            raise ConfigError("--tp-rank is internal to zmqdisagg-serve --tp; start the server with --tp T only")
        return RankPlan(rank=tp_rank, world=tp, local_rank=tp_rank, launcher="spawn")
    world = int(environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if tp not in (1, world):
            raise ConfigError(f"--tp {tp} disagrees with torchrun's WORLD_SIZE={world}; drop --tp under torchrun")
        return RankPlan(rank=int(environ["RANK"]), world=world, local_rank=int(environ.get("LOCAL_RANK", "0")),
                        launcher="torchrun")
    return RankPlan(rank=0, world=tp, local_rank=0, launcher="single" if tp == 1 else "spawn")


def start_followers(plan: RankPlan, argv: Sequence[str]) -> list[subprocess.Popen]:
    """On a spawning rank 0, start ranks 1..T-1 with the same arguments; elsewhere, start nothing."""
    if plan.launcher != "spawn" or plan.rank != 0:
        return []
    children = []
    for rank in range(1, plan.world):
        cmd = [sys.executable, "-m", "zmqdisagg.cli.serve", *argv, "--tp-rank", str(rank)]
        children.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, text=True))
    logger.info("started tensor-parallel ranks 1..%d as pids %s", plan.world - 1, [c.pid for c in children])
    return children
