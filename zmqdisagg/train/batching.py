"""Which sequences form each step's batch, and how a micro-batch is padded.

Guarantees:
  * the batch of global step ``s`` is a pure function of ``(seed, s)``: epoch ``e = s // steps_per_epoch``
    uses the permutation ``randperm(n, generator=seed + e)``, so resuming at step ``s`` needs no sampler
    state and sees exactly the batches an uninterrupted run would;
  * the global batch splits into ``world_size * micro_batches`` equal, contiguous chunks; rank ``r``
    gets chunks ``r*M .. r*M+M-1``. One process with ``micro_batches = W`` therefore sees the same
    micro-batches, in the same order, as ``W`` ranks with one micro-batch each;
  * the held-out split is a fixed function of ``(n, eval_samples, seed)`` and never overlaps training;
  * ``collate`` right-pads to the micro-batch's longest sequence (pad id, attention 0, loss mask 0) and
    keeps each row's dataset index (``index``), for anything seeded per sequence (DFlash's anchors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zmqdisagg.errors import ConfigError
from zmqdisagg.train.data import TokenizedDataset

SPLIT_SALT = 0x5EED  # keeps the held-out permutation independent of the epoch permutations


def split_indices(n: int, eval_samples: int, seed: int) -> tuple[list[int], list[int]]:
    """``(train, eval)`` index lists; ``eval`` holds ``eval_samples`` sequences picked by ``seed``."""
    if eval_samples >= n:
        raise ConfigError(f"eval_samples={eval_samples} must be smaller than the dataset ({n} sequences)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed ^ SPLIT_SALT)).tolist()
    return sorted(perm[eval_samples:]), sorted(perm[:eval_samples])


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchPlan:
    """The deterministic schedule of global batches over ``indices`` (drop-last within each epoch)."""

    indices: tuple[int, ...]
    batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if len(self.indices) < self.batch_size:
            raise ConfigError(f"batch_size={self.batch_size} is larger than the training split "
                              f"({len(self.indices)} sequences); lower batch_size or add data")

    @property
    def steps_per_epoch(self) -> int:
        return len(self.indices) // self.batch_size

    def global_batch(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(len(self.indices), generator=torch.Generator().manual_seed(self.seed + epoch))
        return [self.indices[i] for i in perm[k * self.batch_size:(k + 1) * self.batch_size].tolist()]

    def rank_micro_batches(self, step: int, rank: int, world_size: int, micro_batches: int) -> list[list[int]]:
        """This rank's micro-batches of ``step``, in the order it runs them."""
        return shard(self.global_batch(step), rank, world_size, micro_batches)


def shard(batch: list[int], rank: int, world_size: int, micro_batches: int) -> list[list[int]]:
    parts = world_size * micro_batches
    if len(batch) % parts:
        raise ConfigError(f"a batch of {len(batch)} does not split into {world_size} ranks x "
                          f"{micro_batches} micro-batches")
    size = len(batch) // parts
    return [batch[(rank * micro_batches + m) * size:(rank * micro_batches + m + 1) * size]
            for m in range(micro_batches)]


def eval_micro_batches(indices: list[int], size: int, rank: int, world_size: int) -> list[list[int]]:
    """The held-out split in batches of ``size``, dealt round-robin over ranks (no sequence twice)."""
    batches = [indices[i:i + size] for i in range(0, len(indices), size)]
    return batches[rank::world_size]


def collate(ds: TokenizedDataset, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad the sequences ``indices`` of ``ds`` to their longest length."""
    items = [ds[i] for i in indices]
    width = max(ids.numel() for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.int64)
    attention = torch.zeros((len(items), width), dtype=torch.int64)
    loss_mask = torch.zeros((len(items), width), dtype=torch.int64)
    for row, (ids, mask) in enumerate(items):
        input_ids[row, :ids.numel()] = ids
        attention[row, :ids.numel()] = 1
        loss_mask[row, :ids.numel()] = mask
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask,
            "index": torch.tensor(indices, dtype=torch.int64)}
