"""The draft vocabulary: the ``N`` most frequent loss-masked target tokens, as ``d2t`` and ``t2d``.

The draft predicts over ``N`` tokens instead of the target's ``V``. Draft id ``i`` stands for target id
``used[i]``, where ``used`` is the selected target ids in increasing order. Two views, the ones SGLang
and vLLM load from an EAGLE3 checkpoint:

    d2t  int64 [N]   offset form: d2t[i] = used[i] - i        (target id = i + d2t[i])
    t2d  bool  [V]   t2d[j] = j is in the draft vocab          (used = t2d.nonzero())

Guarantees:
  * selection is deterministic: tokens are ranked by (count descending, id ascending);
  * when fewer than ``N`` distinct tokens carry loss, the rest are the lowest unused ids, so the draft
    vocab always has exactly ``N`` entries;
  * the mapping is cached under ``cache_dir/vocab/<key>.pt`` (key: dataset cache key, ``N``, ``V``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from zmqdisagg.errors import ConfigError
from zmqdisagg.train.data import TokenizedDataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class VocabMapping:
    d2t: torch.Tensor  # int64 [N]
    t2d: torch.Tensor  # bool [V]

    def __post_init__(self) -> None:
        used = self.d2t + torch.arange(self.d2t.numel())
        if self.t2d.dtype != torch.bool or int(self.t2d.sum()) != self.d2t.numel():
            raise ConfigError("t2d must be a bool mask with exactly len(d2t) entries set")
        if not torch.equal(used, self.t2d.nonzero().flatten()):
            raise ConfigError("d2t and t2d disagree: d2t + arange(N) must list the ids where t2d is set")

    @property
    def draft_ids_to_target(self) -> torch.Tensor:
        """Target id of each draft id, increasing (``arange(N) + d2t``)."""
        return self.d2t + torch.arange(self.d2t.numel())


def token_counts(ds: TokenizedDataset, indices: list[int], vocab_size: int) -> torch.Tensor:
    """How often each target id carries loss in the sequences ``indices``."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for i in indices:
        ids, mask = ds[i]
        counts += torch.bincount(ids[mask.bool()], minlength=vocab_size)[:vocab_size]
    return counts


def mapping_from_counts(counts: torch.Tensor, draft_vocab_size: int) -> VocabMapping:
    vocab_size = counts.numel()
    if not 1 <= draft_vocab_size <= vocab_size:
        raise ConfigError(f"draft_vocab_size={draft_vocab_size} must be in 1..{vocab_size} (target vocab)")
    ids = torch.arange(vocab_size)
    order = sorted(ids[counts > 0].tolist(), key=lambda j: (-int(counts[j]), j))[:draft_vocab_size]
    chosen = set(order)
    if len(order) < draft_vocab_size:
        logger.warning("only %d distinct tokens carry loss; padding the draft vocab to %d with unused ids",
                       len(order), draft_vocab_size)
        order += [j for j in range(vocab_size) if j not in chosen][:draft_vocab_size - len(order)]
    used = torch.tensor(sorted(order), dtype=torch.int64)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[used] = True
    return VocabMapping(d2t=used - torch.arange(draft_vocab_size), t2d=t2d)


def load_vocab_mapping(ds: TokenizedDataset, indices: list[int], vocab_size: int, draft_vocab_size: int,
                       cache_dir: str | Path, data_key: str) -> VocabMapping:
    """Build the mapping from the training split's loss tokens, or load it from the cache."""
    digest = hashlib.sha256(f"{data_key}|{vocab_size}|{draft_vocab_size}|{indices}".encode()).hexdigest()[:24]
    path = Path(cache_dir) / "vocab" / f"{digest}.pt"
    if path.exists():
        return VocabMapping(**torch.load(path, weights_only=True))
    counts = token_counts(ds, indices, vocab_size)
    if int(counts.sum()) == 0:
        raise ConfigError("the training split has no loss tokens; check the data's assistant turns")
    mapping = mapping_from_counts(counts, draft_vocab_size)
    covered = int(counts[mapping.t2d].sum()) / int(counts.sum())
    logger.info("draft vocab: %d of %d target tokens, covering %.1f%% of loss tokens",
                draft_vocab_size, vocab_size, 100 * covered)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"d2t": mapping.d2t, "t2d": mapping.t2d}, tmp)
    tmp.replace(path)
    return mapping
