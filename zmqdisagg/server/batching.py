"""Server-side batching: run compatible eagle3/dflash requests that arrived together as one forward.

The server loop drains what is already queued on its ROUTER socket (it never waits for more) and
turns each fresh eagle3/dflash request into a :class:`Job`: validated, and carrying its
connection's settings and draft-vocab mask *as they were when it arrived*. ``Batcher.run`` then::

    jobs -> group by (op, the settings that op reads, t2d) -> sort each group longest first
         -> cut into packs of at most --batch-tokens padded positions
         -> right-pad to the pack's longest sequence -> one forward -> split rows and positions

Guarantees:
- A job gets its own rows and its own first ``S_i`` positions, with its own dtypes and shapes, exactly
  as a lone forward returns them. Rows never mix in a decoder forward (attention stays inside a row and
  padded keys are masked), so values can differ from a lone forward only through kernel summation
  order: matmuls and attention blocked for another batch shape. That is measured in
  ``docs/server_batching.md`` and is why batching is off unless ``--batch-tokens`` is set.
- Errors stay per request: every job is validated before packing, and if a packed forward fails,
  its jobs run one by one, so one bad request never fails the others. ``RankFailed`` (a broken
  tensor-parallel group) is never swallowed.
- A pack is only formed when it is likely to be faster than separate forwards: its padded size stays
  within the token budget and at least ``MIN_FILL`` of its positions are real tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from zmqdisagg.protocol.messages import Header
from zmqdisagg.server.connection import Connection
from zmqdisagg.server.tp import RankFailed
from zmqdisagg.server.utilisation import Utilisation
from zmqdisagg.target.types import TargetBatch, TargetSettings

logger = logging.getLogger(__name__)

MIN_FILL = 0.5  # a pack with more padding than real tokens would cost more than it saves


@dataclass(kw_only=True, slots=True)
class Job:
    """One eagle3/dflash request waiting for its forward, and then its outputs or its error."""

    envelope: list[bytes]
    header: Header
    conn: Connection
    batch: TargetBatch  # validated, on the model's device
    settings: TargetSettings  # the connection's settings when the request arrived
    t2d: torch.Tensor | None
    outputs: dict[str, torch.Tensor] | None = None
    error: Exception | None = None

    @property
    def op(self) -> str:
        return self.header.op

    @property
    def rows(self) -> int:
        return int(self.batch.input_ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.batch.input_ids.shape[1])

    def compatible(self, other: "Job") -> bool:
        """True if one forward with ``other``'s settings computes exactly what this job asked for."""
        if self.op != other.op:
            return False
        a, b = self.settings, other.settings
        if self.op == "dflash":
            return a.dflash_layer_ids == b.dflash_layer_ids
        return a.aux_layer_ids == b.aux_layer_ids and a.teacher == b.teacher and _same_mask(self.t2d, other.t2d)


@dataclass(kw_only=True)
class Batcher:
    """Packs jobs under a token budget and runs each pack as one forward of ``model``."""

    budget: int  # --batch-tokens: most padded positions (rows x longest length) in one forward
    utilisation: Utilisation
    packed_failures: int = field(default=0)

    def plan(self, jobs: list[Job]) -> list[list[Job]]:
        """Group compatible jobs, longest first, and cut each group into packs that fit the budget."""
        groups: list[list[Job]] = []
        for job in jobs:
            home = next((g for g in groups if job.compatible(g[0])), None)
            if home is None:
                groups.append([job])
            else:
                home.append(job)
        packs: list[list[Job]] = []
        for group in groups:
            group.sort(key=lambda j: j.length, reverse=True)  # stable: arrival order within a length
            current: list[Job] = []
            for job in group:
                if current and self._fits([*current, job]):
                    current.append(job)
                else:
                    if current:
                        packs.append(current)
                    current = [job]
            packs.append(current)
        return packs

    def run(self, model: Any, jobs: list[Job]) -> None:
        """Fill every job's ``outputs`` or ``error``; raise only ``RankFailed``."""
        for pack in self.plan(jobs):
            if len(pack) > 1 and self._run_packed(model, pack):
                continue
            for job in pack:
                self._run_alone(model, job)

    def _fits(self, pack: list[Job]) -> bool:
        padded = sum(j.rows for j in pack) * max(j.length for j in pack)
        real = sum(j.rows * j.length for j in pack)
        return padded <= self.budget and real >= MIN_FILL * padded

    def _run_packed(self, model: Any, pack: list[Job]) -> bool:
        batch = pad_and_stack([j.batch for j in pack])
        try:
            outputs = model.compute(pack[0].op, batch, pack[0].settings, pack[0].t2d)
        except RankFailed:
            raise
        except Exception as e:  # noqa: BLE001 - each job is retried alone and gets its own error
            self.packed_failures += 1
            logger.warning("a packed forward of %d requests failed (%s: %s); running them one by one",
                           len(pack), type(e).__name__, e)
            return False
        for job, out in zip(pack, split_rows(outputs, [(j.rows, j.length) for j in pack])):
            job.outputs = out
        tokens = sum(j.rows * j.length for j in pack)
        self.utilisation.forward(requests=len(pack), tokens=tokens, padded_tokens=batch.input_ids.numel())
        return True

    def _run_alone(self, model: Any, job: Job) -> None:
        try:
            job.outputs = model.compute(job.op, job.batch, job.settings, job.t2d)
        except RankFailed:
            raise
        except Exception as e:  # noqa: BLE001 - becomes this request's error reply
            job.error = e
            return
        n = job.batch.input_ids.numel()
        self.utilisation.forward(requests=1, tokens=n, padded_tokens=n)


def pad_and_stack(batches: list[TargetBatch]) -> TargetBatch:
    """Right-pad every batch to the longest sequence (token 0, mask 0) and stack them along rows."""
    longest = max(b.input_ids.shape[1] for b in batches)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, longest - t.shape[1]), value=0)

    return TargetBatch(input_ids=torch.cat([pad(b.input_ids) for b in batches]),
                       attention_mask=torch.cat([pad(b.attention_mask) for b in batches]))


def split_rows(outputs: dict[str, torch.Tensor], shapes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """Cut ``[B, S, ...]`` outputs back into per-request ``[rows_i, S_i, ...]`` contiguous tensors."""
    parts, row = [], 0
    for rows, length in shapes:
        parts.append({k: v[row:row + rows, :length].contiguous() for k, v in outputs.items()})
        row += rows
    return parts


def _same_mask(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))
