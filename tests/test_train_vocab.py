"""Draft vocab mapping: top-N loss-token frequencies -> d2t (offset form) and t2d, padded and cached."""

from __future__ import annotations

import pytest
import torch

from zmqdisagg.errors import ConfigError
from zmqdisagg.train.data import TokenizedDataset
from zmqdisagg.train.vocab import VocabMapping, load_vocab_mapping, mapping_from_counts, token_counts


def _dataset() -> TokenizedDataset:
    # loss tokens: 9 x3, 4 x2, 7 x2, 2 x1; token 5 appears only without loss
    return TokenizedDataset.from_samples([([9, 9, 4, 5, 5], [1, 1, 1, 0, 0]),
                                          ([7, 9, 2, 4, 7], [1, 1, 1, 1, 1])])


def test_counts_only_loss_tokens():
    counts = token_counts(_dataset(), [0, 1], vocab_size=12)
    assert counts.tolist() == [0, 0, 1, 0, 2, 0, 0, 2, 0, 3, 0, 0]


def test_top_n_with_ties_broken_by_lower_id():
    m = mapping_from_counts(token_counts(_dataset(), [0, 1], 12), 3)
    assert m.draft_ids_to_target.tolist() == [4, 7, 9]  # 9 (x3) then 4 and 7 (x2); 2 (x1) is left out
    assert m.d2t.tolist() == [4 - 0, 7 - 1, 9 - 2]
    assert m.t2d.nonzero().flatten().tolist() == [4, 7, 9] and m.t2d.dtype == torch.bool


def test_pads_with_lowest_unused_ids_when_too_few_tokens_are_seen():
    m = mapping_from_counts(token_counts(_dataset(), [0, 1], 12), 7)
    assert m.draft_ids_to_target.tolist() == [0, 1, 2, 3, 4, 7, 9]
    assert int(m.t2d.sum()) == 7


def test_invalid_sizes_and_inconsistent_maps_are_rejected():
    counts = token_counts(_dataset(), [0, 1], 12)
    with pytest.raises(ConfigError, match="draft_vocab_size"):
        mapping_from_counts(counts, 13)
    t2d = torch.zeros(12, dtype=torch.bool)
    t2d[[1, 2]] = True
    with pytest.raises(ConfigError, match="disagree"):
        VocabMapping(d2t=torch.tensor([1, 2]), t2d=t2d)  # d2t says 1, 3


def test_cached_mapping_is_reused(tmp_path):
    ds = _dataset()
    first = load_vocab_mapping(ds, [0, 1], 12, 3, tmp_path, data_key="k")
    files = list((tmp_path / "vocab").glob("*.pt"))
    assert len(files) == 1
    torch.save({"d2t": torch.tensor([0, 0, 0]), "t2d": torch.arange(12) < 3}, files[0])  # a marker mapping
    assert load_vocab_mapping(ds, [0, 1], 12, 3, tmp_path, data_key="k").draft_ids_to_target.tolist() == [0, 1, 2]
    other = load_vocab_mapping(ds, [0], 12, 3, tmp_path, data_key="k")  # another split: recomputed
    assert other.draft_ids_to_target.tolist() == [0, 4, 9] and first.draft_ids_to_target.tolist() == [4, 7, 9]
