"""The DFlash draft and objective: the block mask against a direct construction, anchors, loss, export."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from zmqdisagg.errors import ConfigError
from zmqdisagg.target.tokenizer import byte_tokenizer
from zmqdisagg.target.types import ModelInfo, default_dflash_layers
from zmqdisagg.train.algorithm import EVAL_SALT, Setup
from zmqdisagg.train.config import TrainConfig
from zmqdisagg.train.data import TokenizedDataset
from zmqdisagg.train.dflash_draft import DFlashConfig, DFlashDraft, block_attention, dflash_mask
from zmqdisagg.train.dflash_loss import (
    DFlashAlgorithm, DFlashObjective, anchor_candidates, make_blocks, position_decay, resolve_mask_token,
    sample_anchors,
)
from zmqdisagg.train.export import export_dflash, load_dflash_export

CFG = DFlashConfig(hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, intermediate_size=24,
                   vocab_size=40, target_layer_ids=(1, 3), num_target_layers=5, block_size=4, mask_token_id=39)


def _draft(seed: int = 0) -> DFlashDraft:
    torch.manual_seed(seed)
    draft = DFlashDraft(CFG).double()
    g = torch.Generator().manual_seed(100 + seed)
    draft.load_target_head(torch.randn(40, 16, generator=g, dtype=torch.float64),
                           torch.randn(40, 16, generator=g, dtype=torch.float64))
    return draft


def test_dflash_mask_matches_a_direct_construction():
    for anchors, seq_len, block in (([2, 4], 6, 2), ([0], 3, 3), ([1, 3, 6], 8, 4), ([5, 5], 7, 2)):
        n = len(anchors)
        direct = torch.zeros(n * block, seq_len + n * block, dtype=torch.bool)
        for a, p in enumerate(anchors):
            for k in range(block):
                row = a * block + k
                for s in range(seq_len):
                    direct[row, s] = s < p  # the context strictly before the anchor
                for k2 in range(block):
                    direct[row, seq_len + a * block + k2] = True  # its own block, both directions
        assert torch.equal(dflash_mask(anchors, seq_len, block), direct), (anchors, seq_len, block)


def test_the_documented_mask_example():
    rows = ["".join("x" if v else "." for v in r) for r in dflash_mask([2, 4], 6, 2).tolist()]
    assert rows == ["xx....xx..", "xx....xx..", "xxxx....xx", "xxxx....xx"]


@pytest.mark.parametrize("anchors", [[[0, 2, 5], [1, 1, 6]], [[3], [0]]])
def test_block_attention_equals_dense_masked_attention(anchors):
    g = torch.Generator().manual_seed(len(anchors[0]))
    b, h, s, d, block = len(anchors), 3, 7, 4, 3
    a = len(anchors[0])
    q = torch.randn(b, h, a, block, d, generator=g, dtype=torch.float64)
    k_blk, v_blk = (torch.randn(b, h, a, block, d, generator=g, dtype=torch.float64) for _ in range(2))
    k_ctx, v_ctx = (torch.randn(b, h, s, d, generator=g, dtype=torch.float64) for _ in range(2))
    got = block_attention(q, k_ctx, v_ctx, k_blk, v_blk, torch.tensor(anchors))
    for row in range(b):
        keys = torch.cat([k_ctx[row], k_blk[row].reshape(h, a * block, d)], dim=1)
        values = torch.cat([v_ctx[row], v_blk[row].reshape(h, a * block, d)], dim=1)
        scores = q[row].reshape(h, a * block, d) @ keys.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(~dflash_mask(anchors[row], s, block), float("-inf"))
        torch.testing.assert_close(got[row], scores.softmax(-1) @ values, rtol=1e-12, atol=1e-12)


def test_a_block_sees_its_prefix_and_itself_only():
    """Through the whole draft: features at or after a block's anchor and other blocks' tokens do not
    change its output; a feature before the anchor, or its own tokens, do."""
    draft = _draft()
    g = torch.Generator().manual_seed(1)
    features = torch.randn(1, 9, 2 * 16, generator=g, dtype=torch.float64)
    block_ids = torch.randint(0, 39, (1, 2, 4), generator=g)
    anchors = torch.tensor([[3, 6]])
    with torch.no_grad():
        base = draft(features, block_ids, anchors)
        later = features.clone()
        later[:, 3:] += 1.0  # from block 0's anchor on
        other = block_ids.clone()
        other[0, 1] = (other[0, 1] + 1) % 39
        earlier = features.clone()
        earlier[:, 2] += 1.0
        assert torch.equal(draft(later, block_ids, anchors)[:, 0], base[:, 0])
        assert torch.equal(draft(features, other, anchors)[:, 0], base[:, 0])
        assert not torch.allclose(draft(features, other, anchors)[:, 1], base[:, 1])
        assert not torch.allclose(draft(earlier, block_ids, anchors)[:, 0], base[:, 0])
        for a, p in enumerate(anchors[0].tolist()):  # as at inference: one block, the context before it
            alone = draft(features[:, :p], block_ids[:, a:a + 1], anchors[:, a:a + 1])
            torch.testing.assert_close(alone[:, 0], base[:, a], rtol=1e-12, atol=1e-12)


def test_anchors_are_deterministic_sorted_loss_masked_candidates():
    mask = torch.tensor([0, 1, 1, 1, 0, 1, 1, 0, 1, 1])
    assert anchor_candidates(mask).tolist() == [1, 2, 5, 8]  # m[p] and m[p+1]; the last position never
    assert sample_anchors(mask, 10, seed=0).tolist() == [1, 2, 5, 8]
    picks = {tuple(sample_anchors(mask, 2, seed=s).tolist()) for s in range(40)}
    assert all(len(p) == 2 and list(p) == sorted(p) and set(p) <= {1, 2, 5, 8} for p in picks)
    assert len(picks) > 3  # the seed matters
    padded = torch.cat([mask, torch.zeros(5, dtype=mask.dtype)])
    assert torch.equal(sample_anchors(padded, 2, seed=7), sample_anchors(mask, 2, seed=7))


def test_blocks_hold_the_anchor_then_masks_and_label_the_next_tokens():
    ids = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 0, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    out = make_blocks(ids, mask, [torch.tensor([1, 3]), torch.tensor([1])], block_size=3, mask_token_id=99)
    assert out["anchors"].tolist() == [[1, 3], [1, 0]]
    assert out["block_ids"].tolist() == [[[11, 99, 99], [13, 99, 99]], [[21, 99, 99], [20, 99, 99]]]
    assert out["labels"].tolist() == [[[12, 13], [14, 15]], [[22, 0], [21, 22]]]
    # counted: the label is a loss token inside the sequence, and the block is a real one
    assert out["counted"].tolist() == [[[True, True], [True, False]], [[True, False], [False, False]]]


def _batch(seed: int, b: int = 3, s: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, s, 2 * 16, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 39, (b, s), generator=g)
    mask = (torch.rand(b, s, generator=g) < 0.8).long()
    rows = [sample_anchors(mask[r], 3, seed=seed + r) for r in range(b)]
    return {"features": features, **make_blocks(ids, mask, rows, CFG.block_size, CFG.mask_token_id)}


def test_loss_is_decayed_cross_entropy_over_the_global_weight():
    draft = _draft()
    decay = position_decay(CFG.block_size, gamma=2.0)
    assert decay == [1.0, math.exp(-0.5), math.exp(-1.0)]
    inputs = _batch(0)
    loss, stats = DFlashObjective(draft, decay)(**inputs, denom=7.0)
    logits = draft.logits(draft(inputs["features"], inputs["block_ids"], inputs["anchors"]))
    want, ce_k, right_k, count_k = 0.0, [0.0] * 3, [0] * 3, [0] * 3
    for row in range(inputs["anchors"].shape[0]):
        for blk in range(inputs["anchors"].shape[1]):
            for k in range(1, CFG.block_size):
                if not inputs["counted"][row, blk, k - 1]:
                    continue
                label = inputs["labels"][row, blk, k - 1]
                ce = -F.log_softmax(logits[row, blk, k], -1)[label]
                want = want + decay[k - 1] * ce
                ce_k[k - 1] += float(ce.detach())
                right_k[k - 1] += int(logits[row, blk, k].argmax() == label)
                count_k[k - 1] += 1
    torch.testing.assert_close(loss, want / 7.0, rtol=1e-12, atol=0)
    torch.testing.assert_close(stats[:, 0], torch.tensor(ce_k, dtype=torch.float64), rtol=1e-12, atol=0)
    assert stats[:, 1].tolist() == right_k and stats[:, 2].tolist() == count_k
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in draft.parameters())
    assert not draft.embed.requires_grad and not draft.lm_head.requires_grad
    assert not {"embed", "lm_head"} & set(draft.state_dict())  # frozen target pieces are never checkpointed


def test_micro_batches_sum_to_the_full_batch_gradient():
    inputs = _batch(3, b=4)
    full, halves = _draft(), _draft()
    decay = position_decay(CFG.block_size, None)
    DFlashObjective(full, decay)(**inputs, denom=20.0)[0].backward()
    objective = DFlashObjective(halves, decay)
    for part in (slice(0, 2), slice(2, 4)):
        objective(**{k: v[part] for k, v in inputs.items()}, denom=20.0)[0].backward()
    for a, c in zip(full.parameters(), halves.parameters()):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-10, atol=1e-12)


def _algorithm(**changes) -> DFlashAlgorithm:
    g = torch.Generator().manual_seed(0)
    samples = []
    for n in (12, 7, 15, 9):
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        samples.append((ids, (torch.rand(n, generator=g) < 0.7).long().tolist()))
    ds = TokenizedDataset.from_samples(samples)
    cfg = TrainConfig(algorithm="dflash", block_size=4, num_anchors=3, loss_decay_gamma=3.0, num_draft_layers=2,
                      **changes)
    info = ModelInfo(model_type="llama", num_layers=8, hidden_size=16, vocab_size=320, dtype="float32",
                     device="cpu", max_positions=64)
    return DFlashAlgorithm(Setup(cfg=cfg, info=info, tokenizer=byte_tokenizer(), ds=ds, train_idx=[0, 1, 2, 3],
                                 data_key="test", device=torch.device("cpu")))


def test_the_denominator_is_the_weight_of_the_blocks_the_micro_batches_build():
    from zmqdisagg.train.batching import collate

    algo = _algorithm()
    outputs = {"hidden": torch.zeros(2, 15, 32)}
    for salt in (0, 5, EVAL_SALT):
        total = 0.0
        for part in ([2, 0], [3, 1]):
            batch = collate(algo.setup.ds, part, pad_id=258)
            got = algo.inputs(batch, {"hidden": outputs["hidden"][:, :batch["input_ids"].shape[1]]}, salt)
            total += float((got["counted"].double() * torch.tensor(algo.decay, dtype=torch.float64)).sum())
        assert algo.denominator([0, 1, 2, 3], salt) == pytest.approx(total, rel=1e-15)
    assert algo.denominator([0, 1, 2, 3], 0) != algo.denominator([0, 1, 2, 3], 1)  # anchors change per step


def test_settings_mask_token_and_metrics():
    algo = _algorithm()
    assert algo.target_settings()[0].dflash_layer_ids == default_dflash_layers(8, 2) == (1, 5)
    assert algo.target_settings()[1] is None
    assert _algorithm(dflash_layer_ids=(2, 4, 6)).layer_ids == (2, 4, 6)
    tok = byte_tokenizer()
    assert algo.mask_token_id == tok.mask_token_id == tok.convert_tokens_to_ids("<|mask|>")
    assert resolve_mask_token(7, tok, 320) == 7
    tok.mask_token = None
    assert resolve_mask_token(None, tok, 320) == len(tok)  # the first embedding row past the tokenizer
    with pytest.raises(ConfigError, match="mask_token_id"):
        resolve_mask_token(None, tok, len(tok))
    stats = torch.tensor([[4.0, 3.0, 4.0], [2.0, 1.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    m = algo.metrics(stats, denom=6.0)
    assert (m["acc_1"], m["acc_2"], m["acc_3"], m["loss_1"]) == (0.75, 0.5, 0.0, 1.0)
    assert m["accept_len"] == 1 + 0.75 + 0.75 * 0.5 + 0.0


def test_config_checks():
    with pytest.raises(ConfigError, match="block_size"):
        TrainConfig(algorithm="dflash", block_size=1)
    with pytest.raises(ConfigError, match="loss_decay_gamma"):
        TrainConfig(algorithm="dflash", loss_decay_gamma=0.0)
    with pytest.raises(ConfigError, match="teacher"):
        TrainConfig(algorithm="dflash", teacher="target_p_fp32")
    with pytest.raises(ConfigError, match="algorithm"):
        TrainConfig(algorithm="medusa")
    with pytest.raises(ConfigError, match="mask_token_id"):
        DFlashConfig(**{**{k: getattr(CFG, k) for k in CFG.__slots__}, "mask_token_id": 40})
    with pytest.raises(ConfigError, match="lm_head"):
        DFlashDraft(CFG).load_target_head(torch.zeros(40, 16), torch.zeros(41, 16))


# the names published DFlash drafts (a Qwen3-shaped DFlashDraftModel) store
LAYER_NAMES = {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
               "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
               "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
               "mlp.down_proj.weight"}


def test_export_layout_and_bit_identical_reload(tmp_path):
    draft = _draft().float()
    out = export_dflash(draft, CFG, tmp_path / "draft", dtype="float32")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names == {"fc.weight", "hidden_norm.weight", "norm.weight"} | {
        f"layers.{i}.{n}" for i in range(2) for n in LAYER_NAMES}
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["DFlashDraftModel"] and conf["block_size"] == 4
    assert conf["dflash_config"] == {"block_size": 4, "mask_token_id": 39, "target_layer_ids": [1, 3]}
    assert (conf["num_hidden_layers"], conf["num_target_layers"], conf["hidden_size"], conf["vocab_size"]) == (
        2, 5, 16, 40)
    again = load_dflash_export(out)
    assert again.cfg == CFG
    for (name, a), (_, b) in zip(draft.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    again.load_target_head(draft.embed, draft.lm_head)
    features, ids, anchors = torch.randn(1, 6, 32), torch.randint(0, 40, (1, 2, 4)), torch.tensor([[2, 4]])
    with torch.no_grad():
        assert torch.equal(draft.logits(draft(features, ids, anchors)), again.logits(again(features, ids, anchors)))


def test_transformers_reads_the_exported_config(tmp_path):
    from transformers import AutoConfig

    out = export_dflash(_draft().float(), CFG, tmp_path / "draft")
    conf = AutoConfig.from_pretrained(str(out), local_files_only=True)
    assert conf.model_type == "qwen3" and conf.num_hidden_layers == 2 and conf.num_key_value_heads == 2
    assert conf.dflash_config["target_layer_ids"] == [1, 3] and conf.dflash_config["mask_token_id"] == 39
