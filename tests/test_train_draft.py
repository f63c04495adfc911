"""The EAGLE3 draft: TTT attention against a dense mask built directly, alignment, loss, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from zmqdisagg.errors import ConfigError
from zmqdisagg.train.eagle3_draft import DraftConfig, Eagle3Draft, ttt_attention, ttt_mask
from zmqdisagg.train.eagle3_loss import Eagle3Objective, shift_left, teacher_inputs

CFG = DraftConfig(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=32, vocab_size=40,
                  draft_vocab_size=12, aux_layer_ids=(0, 2, 3))


def _draft(seed: int = 0) -> Eagle3Draft:
    torch.manual_seed(seed)
    draft = Eagle3Draft(CFG).double()
    draft.load_target_embedding(torch.randn(CFG.vocab_size, CFG.hidden_size, dtype=torch.float64))
    return draft


def test_ttt_mask_matches_a_direct_construction():
    for seq_len, step in ((1, 0), (4, 2), (6, 5)):
        direct = torch.zeros(seq_len, (step + 1) * seq_len, dtype=torch.bool)
        for t in range(seq_len):
            for s in range(t + 1):
                direct[t, s] = True  # step 0: the causal prefix
            for j in range(1, step + 1):
                direct[t, j * seq_len + t] = True  # step j: only its own position
        assert torch.equal(ttt_mask(seq_len, step), direct)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_ttt_attention_equals_dense_masked_attention(steps):
    g = torch.Generator().manual_seed(steps)
    b, h, s, d = 2, 3, 7, 4
    q = torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
    keys = [torch.randn(b, h, s, d, generator=g, dtype=torch.float64) for _ in range(steps)]
    values = [torch.randn(b, h, s, d, generator=g, dtype=torch.float64) for _ in range(steps)]
    scores = q @ torch.cat(keys, dim=2).transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~ttt_mask(s, steps - 1), float("-inf"))
    dense = scores.softmax(-1) @ torch.cat(values, dim=2)
    torch.testing.assert_close(ttt_attention(q, keys, values), dense, rtol=1e-12, atol=1e-12)


def test_teacher_inputs_align_step_zero_with_the_next_target_position():
    b, s, vd = 2, 6, CFG.draft_vocab_size
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.arange(b * s).view(b, s), "loss_mask": torch.tensor([[0, 0, 1, 1, 1, 0]] * b)}
    rows = torch.randn(vd, CFG.hidden_size, generator=g)
    outputs = {"aux_hidden": torch.randn(b, s, 3 * CFG.hidden_size, generator=g),
               "last_hidden": torch.randn(b, s, CFG.hidden_size, generator=g),
               "position_mask": torch.tensor([[1, 1, 0, 1, 1, 1]] * b, dtype=torch.bool)}
    got = teacher_inputs(batch, outputs, rows)
    assert got["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 0]
    # valid[t] = position_mask[t+1] and loss_mask[t+2]
    assert got["valid"][0].tolist() == [True, False, True, False, False, False]
    expected_p = (outputs["last_hidden"][:, 1:] @ rows.t()).softmax(-1)
    torch.testing.assert_close(got["target_p"][:, :-1], expected_p, rtol=0, atol=0)
    shipped = teacher_inputs(batch, {**outputs, "target_p": expected_p.new_ones(b, s, vd)}, None)
    assert torch.equal(shipped["target_p"][:, :-1], torch.ones(b, s - 1, vd))
    assert shift_left(torch.arange(4)[None], 9).tolist() == [[0, 0, 0, 0]]


def _inputs(seed: int, b: int, s: int, keep: float) -> tuple[torch.Tensor, ...]:
    """Random draft inputs: token ids, aux hidden, a teacher distribution, and ``keep`` of positions valid."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (b, s), generator=g)
    aux = torch.randn(b, s, 3 * CFG.hidden_size, generator=g, dtype=torch.float64)
    p = torch.rand(b, s, CFG.draft_vocab_size, generator=g, dtype=torch.float64).softmax(-1)
    return ids, aux, p, torch.rand(b, s, generator=g) < keep


def test_single_step_loss_is_masked_soft_cross_entropy_over_global_tokens():
    draft = _draft()
    s = 5
    ids, aux, p, valid = _inputs(1, 2, s, keep=0.6)
    loss, stats = Eagle3Objective(draft, ttt_length=1, step_decay=0.8)(ids, aux, p, valid, 7.0)
    logits = draft.logits(draft.step(ids, draft.fc(aux), torch.arange(s), []))
    ce = -(p * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(loss, (ce * valid).sum() / 7.0, rtol=1e-12, atol=0)
    correct = ((logits.argmax(-1) == p.argmax(-1)) & valid).sum()
    assert stats[0, 1:].tolist() == [float(correct), float(valid.sum())]


def test_ttt_weights_steps_and_trains_only_the_draft():
    draft = _draft()
    n = 3
    ids, aux, p, valid = _inputs(2, 2, 6, keep=1.0)
    loss, stats = Eagle3Objective(draft, ttt_length=n, step_decay=0.5)(ids, aux, p, valid, 4.0)
    weighted = sum(0.5 ** i * stats[i, 0] for i in range(n)) / 4.0
    torch.testing.assert_close(loss.double(), weighted, rtol=1e-6, atol=0)
    assert stats[:, 2].tolist() == [12.0, 10.0, 8.0]  # step i sees s - i positions
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in draft.parameters())
    assert not draft.embed.requires_grad and "embed" not in draft.state_dict()


def test_micro_batches_sum_to_the_full_batch_gradient():
    ids, aux, p, valid = _inputs(3, 4, 6, keep=0.7)
    full, halves = _draft(), _draft()
    Eagle3Objective(full, 3, 0.8)(ids, aux, p, valid, 20.0)[0].backward()
    objective = Eagle3Objective(halves, 3, 0.8)
    for part in (slice(0, 2), slice(2, 4)):
        objective(ids[part], aux[part], p[part], valid[part], 20.0)[0].backward()
    for a, c in zip(full.parameters(), halves.parameters()):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-10, atol=1e-12)


def test_config_and_embedding_checks():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        DraftConfig(**{**_fields(CFG), "num_kv_heads": 3})
    with pytest.raises(ConfigError, match="draft_vocab_size"):
        DraftConfig(**{**_fields(CFG), "draft_vocab_size": 41})
    with pytest.raises(ConfigError, match="embed_tokens"):
        Eagle3Draft(CFG).load_target_embedding(torch.zeros(CFG.vocab_size, 8))


def _fields(cfg: DraftConfig) -> dict:
    return {k: getattr(cfg, k) for k in cfg.__slots__}
