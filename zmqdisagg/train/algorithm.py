"""What the training loop asks of a draft algorithm: the small interface EAGLE3 and DFlash implement.

The loop (``loop.py``) owns everything the algorithms share: data and batches, the target and its
connections, prefetch, data parallelism, the optimizer and its schedule, checkpoints, metrics and the
progress bar. An ``Algorithm`` owns the rest: what to ask the target for, the draft network, how a
micro-batch becomes a loss, what its statistics mean, and how the draft is exported. ``build_algorithm``
picks one by ``TrainConfig.algorithm`` and imports only that one.

Contract for bitwise reproducibility. ``inputs`` and ``denominator`` may depend only on the config, the
data, the target's outputs and the ``salt`` they are given (the optimizer step in training, ``EVAL_SALT``
in evaluation), never on the global RNG, the rank or how the batch was split. That is what lets a resumed
run, a run with another prefetch depth and a data-parallel run reproduce one another's losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from zmqdisagg.errors import ConfigError
from zmqdisagg.target.types import ModelInfo, TargetSettings
from zmqdisagg.train.config import TrainConfig
from zmqdisagg.train.data import TokenizedDataset

EVAL_SALT = -1  # the salt of every evaluation: the held-out split is scored the same way each time


@dataclass(frozen=True, kw_only=True, slots=True)
class Setup:
    """What the loop knows when the algorithm is built."""

    cfg: TrainConfig
    info: ModelInfo  # the target's shape
    tokenizer: Any
    ds: TokenizedDataset
    train_idx: list[int]  # the training split (e.g. for EAGLE3's draft vocab)
    data_key: str  # the dataset's cache key (for caches derived from it)
    device: torch.device


class Algorithm(Protocol):
    """One draft-training algorithm, as the loop sees it."""

    op: str
    """The ``Target`` method whose outputs this algorithm trains on (``"eagle3"``, ``"dflash"``);
    the prefetcher calls it, locally or on a server."""

    stat_rows: int
    """Rows of the ``[stat_rows, 3]`` statistics a forward returns, so the loop can sum them over
    micro-batches and ranks without knowing what a row is (a TTT step, a block position)."""

    headline: tuple[str, ...]
    """Metric keys the progress bar and the final log line show next to the loss."""

    def target_settings(self) -> tuple[TargetSettings, torch.Tensor | None]:
        """Settings and draft-vocab mask to ``configure`` on every target connection: the layers to
        capture belong to the draft, not to the server, which serves many trainers."""
        ...

    def build(self, settings: TargetSettings, head: dict[str, torch.Tensor]) -> tuple[nn.Module, nn.Module]:
        """``(draft, objective)`` on ``Setup.device``. ``settings`` are the effective ones the target
        returned; ``head`` is ``Target.head_weights()`` (frozen pieces the draft borrows). The draft
        holds every trainable weight (the loop checkpoints and optimizes it); the objective's forward is
        one micro-batch's loss (the loop wraps it for DDP)."""
        ...

    def denominator(self, indices: list[int], salt: int) -> float:
        """The loss normaliser of a whole global batch, from the data alone: every micro-batch on every
        rank divides by it, so summed gradients are the global batch's gradient with no collective."""
        ...

    def inputs(self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
               salt: int) -> dict[str, torch.Tensor]:
        """Keyword arguments of the objective's forward (besides ``denom``) for one micro-batch:
        ``batch`` is the collated micro-batch, ``outputs`` the target's answer to it."""
        ...

    def metrics(self, stats: torch.Tensor, denom: float) -> dict[str, float]:
        """Named metrics from statistics summed over a step (or an evaluation): ``[stat_rows, 3]``."""
        ...

    def export(self, out_dir: Path) -> Path:
        """Write the trained draft where inference engines load it from; return the directory."""
        ...


def build_algorithm(setup: Setup) -> Algorithm:
    """The ``Algorithm`` named by ``setup.cfg.algorithm`` (its module is imported here, lazily)."""
    name = setup.cfg.algorithm
    if name == "eagle3":
        from zmqdisagg.train.eagle3_loss import Eagle3Algorithm

        return Eagle3Algorithm(setup)
    if name == "dflash":
        from zmqdisagg.train.dflash_loss import DFlashAlgorithm

        return DFlashAlgorithm(setup)
    raise ConfigError(f"algorithm={name!r} must be 'eagle3' or 'dflash'")
