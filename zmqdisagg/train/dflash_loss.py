"""The DFlash objective: sample anchors, build masked blocks, score every block position against the data.

Anchors. For a sequence with loss mask ``m``, the candidates are the positions ``p`` with ``m[p] = 1`` and
``m[p+1] = 1`` (an assistant token whose block has at least one supervised label). Up to ``num_anchors``
of them are drawn without replacement and sorted. The draw uses a generator seeded by
``anchor_seed(seed, salt, index)`` (``salt`` = the optimizer step, or ``EVAL_SALT``; ``index`` = the
sequence's dataset index), so it is the same in every process, on every rank, after a resume and for any
split of the batch, and it leaves the global RNG alone.

Blocks. Block ``a`` with anchor ``p`` is ``[x_p, MASK, ..., MASK]`` (``block_size`` tokens) at positions
``p .. p+L-1``. It sees the target's features of positions ``< p`` and itself (see ``dflash_draft.py``).

Loss. Position ``k`` (``1 <= k < L``) of block ``a`` predicts ``x_{p+k}``; it counts iff ``p+k`` is inside
the sequence and ``m[p+k] = 1``. With ``w_k = exp(-(k-1)/gamma)`` (``1`` without ``loss_decay_gamma``)::

    loss  = sum_{b,a,k} counted * w_k * CE(logits, x_{p+k})  /  W
    W     = sum of counted * w_k over the *global* batch (all ranks and micro-batches; from the data alone)
    acc_k = sum counted * [argmax = x_{p+k}] / sum counted          loss_k = mean CE at position k

Accepted length. A block's drafted tokens are accepted up to the first wrong one, and the verify step adds
one token of the target's own. Treating positions as independent, with per-position accuracies ``acc_k``::

    accept_len = 1 + sum_{k=1}^{L-1} prod_{j=1}^{k} acc_j

It is an estimate from teacher-forced data (the context is the data, not the draft's own tokens).
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zmqdisagg.errors import ConfigError
from zmqdisagg.target.types import TargetSettings, default_dflash_layers
from zmqdisagg.train.algorithm import Setup
from zmqdisagg.train.dflash_draft import DFlashConfig, DFlashDraft
from zmqdisagg.train.export import export_dflash

logger = logging.getLogger(__name__)


def anchor_seed(seed: int, salt: int, index: int) -> int:
    """A 63-bit generator seed that is a pure function of its arguments."""
    digest = hashlib.blake2b(f"dflash-anchors:{seed}:{salt}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def anchor_candidates(loss_mask: torch.Tensor) -> torch.Tensor:
    """Positions ``p`` of a 1-D loss mask with ``m[p] = m[p+1] = 1`` (past the end counts as 0)."""
    m = loss_mask.bool()
    nxt = torch.cat([m[1:], m.new_zeros(1)])
    return (m & nxt).nonzero().flatten()


def sample_anchors(loss_mask: torch.Tensor, num_anchors: int, seed: int) -> torch.Tensor:
    """Up to ``num_anchors`` candidates of one sequence, drawn without replacement, sorted."""
    cand = anchor_candidates(loss_mask.cpu())
    if cand.numel() <= num_anchors:
        return cand
    pick = torch.randperm(cand.numel(), generator=torch.Generator().manual_seed(seed))[:num_anchors]
    return cand[pick.sort().values]


def position_decay(block_size: int, gamma: float | None) -> list[float]:
    """``w_k`` for ``k = 1 .. block_size-1``."""
    return [1.0 if gamma is None else math.exp(-(k - 1) / gamma) for k in range(1, block_size)]


def label_counts(loss_mask: torch.Tensor, anchors: torch.Tensor, block_size: int) -> torch.Tensor:
    """How many blocks of one sequence supervise position ``k``, for ``k = 1 .. L-1`` (int64 ``[L-1]``)."""
    m = F.pad(loss_mask.cpu().long(), (0, block_size))
    return m[anchors[:, None] + torch.arange(1, block_size)].sum(0)


def make_blocks(input_ids: torch.Tensor, loss_mask: torch.Tensor, anchor_rows: list[torch.Tensor],
                block_size: int, mask_token_id: int) -> dict[str, torch.Tensor]:
    """Blocks of a right-padded batch; rows with fewer anchors are padded with never-counted blocks.

    Returns ``block_ids [B,A,L]``, ``anchors [B,A]``, ``labels [B,A,L-1]`` (``x_{p+k}``) and
    ``counted [B,A,L-1]`` (bool), with ``A`` the most anchors of any row (at least 1).
    """
    b, width = input_ids.shape
    a = max(1, max(r.numel() for r in anchor_rows))
    anchors = torch.zeros(b, a, dtype=torch.int64)
    keep = torch.zeros(b, a, dtype=torch.bool)
    for row, chosen in enumerate(anchor_rows):
        anchors[row, :chosen.numel()] = chosen
        keep[row, :chosen.numel()] = True
    pos = (anchors[:, :, None] + torch.arange(block_size)).view(b, -1)  # [B, A*L]
    tokens = F.pad(input_ids.cpu(), (0, block_size)).gather(1, pos).view(b, a, block_size)
    supervised = F.pad(loss_mask.cpu().bool(), (0, block_size)).gather(1, pos).view(b, a, block_size)
    block_ids = torch.full_like(tokens, mask_token_id)
    block_ids[:, :, 0] = tokens[:, :, 0]
    return {"block_ids": block_ids, "anchors": anchors, "labels": tokens[:, :, 1:],
            "counted": keep[:, :, None] & supervised[:, :, 1:]}


class DFlashObjective(nn.Module):
    """Wraps the draft so one ``forward`` is a micro-batch's loss (what DDP wraps and syncs)."""

    def __init__(self, draft: DFlashDraft, decay: list[float]) -> None:
        super().__init__()
        self.draft = draft
        self.decay = decay

    def forward(self, features: torch.Tensor, block_ids: torch.Tensor, anchors: torch.Tensor,
                labels: torch.Tensor, counted: torch.Tensor, denom: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the weighted loss and ``stats [L-1, 3]`` = (CE sum, correct, count) per block position."""
        hidden = self.draft(features, block_ids, anchors)[:, :, 1:]  # position 0 (the anchor) predicts nothing
        logits = self.draft.logits(hidden)  # [B, A, L-1, V]
        logp = F.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        ce = -logp.gather(-1, labels[..., None]).squeeze(-1)  # [B, A, L-1]
        c = counted.to(ce.dtype)
        w = c * torch.tensor(self.decay, dtype=ce.dtype, device=ce.device)
        loss = (ce * w).sum() / denom
        correct = (logits.argmax(-1) == labels).to(ce.dtype) * c
        stats = torch.stack([(ce * c).detach().sum((0, 1)), correct.sum((0, 1)), c.sum((0, 1))], dim=-1)
        return loss, stats.double()


def resolve_mask_token(cfg_id: int | None, tokenizer, vocab_size: int) -> int:
    """``mask_token_id``, else the tokenizer's mask token, else ``len(tokenizer)`` (the first embedding
    row past the tokenizer's vocab: unused by the data, e.g. 151669 for Qwen3's 151936-row embedding)."""
    token = cfg_id if cfg_id is not None else getattr(tokenizer, "mask_token_id", None)
    token = len(tokenizer) if token is None else token
    if not 0 <= token < vocab_size:
        raise ConfigError(f"mask token id {token} is not a row of the target's {vocab_size}-row embedding; "
                          "set mask_token_id to an id the data never uses (e.g. a reserved token)")
    return int(token)


class DFlashAlgorithm:
    """DFlash for the training loop: ``stats`` rows are block positions 1..L-1."""

    op = "dflash"
    headline = ("acc_1", "accept_len")

    def __init__(self, setup: Setup) -> None:
        cfg = self.cfg = setup.cfg
        self.setup = setup
        self.stat_rows = cfg.block_size - 1
        self.decay = position_decay(cfg.block_size, cfg.loss_decay_gamma)
        self.mask_token_id = resolve_mask_token(cfg.mask_token_id, setup.tokenizer, setup.info.vocab_size)
        self.layer_ids = cfg.dflash_layer_ids or default_dflash_layers(setup.info.num_layers, cfg.num_draft_layers)
        logger.info("dflash: block %d, up to %d anchors, mask token %d, target layers %s", cfg.block_size,
                    cfg.num_anchors, self.mask_token_id, list(self.layer_ids))

    def target_settings(self) -> tuple[TargetSettings, None]:
        return TargetSettings(dflash_layer_ids=tuple(self.layer_ids)), None

    def build(self, settings: TargetSettings, head: dict[str, torch.Tensor]) -> tuple[nn.Module, nn.Module]:
        cfg, info, device = self.cfg, self.setup.info, self.setup.device
        self.draft_cfg = DFlashConfig(
            hidden_size=info.hidden_size, num_layers=cfg.num_draft_layers, num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim or info.hidden_size // cfg.num_heads,
            intermediate_size=cfg.intermediate_size or 4 * info.hidden_size, vocab_size=info.vocab_size,
            target_layer_ids=tuple(settings.dflash_layer_ids), num_target_layers=info.num_layers,
            block_size=cfg.block_size, mask_token_id=self.mask_token_id, rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=cfg.rope_theta, max_positions=info.max_positions)
        self.draft = DFlashDraft(self.draft_cfg).to(device)
        self.draft.load_target_head(head["embed_tokens"].to(device, torch.float32),
                                    head["lm_head"].to(device, torch.float32))
        return self.draft, DFlashObjective(self.draft, self.decay)

    def anchors(self, index: int, loss_mask: torch.Tensor, salt: int) -> torch.Tensor:
        return sample_anchors(loss_mask, self.cfg.num_anchors, anchor_seed(self.cfg.seed, salt, index))

    def denominator(self, indices: list[int], salt: int) -> float:
        counts = torch.zeros(self.stat_rows, dtype=torch.int64)
        for i in indices:
            _, mask = self.setup.ds[i]
            counts += label_counts(mask, self.anchors(i, mask, salt), self.cfg.block_size)
        return sum(n * w for n, w in zip(counts.tolist(), self.decay))  # W, in float64

    def inputs(self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
               salt: int) -> dict[str, torch.Tensor]:
        rows = [self.anchors(int(i), batch["loss_mask"][r], salt) for r, i in enumerate(batch["index"].tolist())]
        blocks = make_blocks(batch["input_ids"], batch["loss_mask"], rows, self.cfg.block_size, self.mask_token_id)
        device = outputs["hidden"].device
        return {"features": outputs["hidden"], **{k: v.to(device) for k, v in blocks.items()}}

    def metrics(self, stats: torch.Tensor, denom: float) -> dict[str, float]:
        out, prefix, accept = {}, 1.0, 1.0
        for k, (ce_sum, correct, count) in enumerate(stats.tolist(), start=1):
            out[f"loss_{k}"] = ce_sum / max(count, 1.0)
            out[f"acc_{k}"] = correct / max(count, 1.0)
            prefix *= out[f"acc_{k}"]
            accept += prefix
        out["accept_len"] = accept
        return out

    def export(self, out_dir: Path) -> Path:
        return export_dflash(self.draft, self.draft_cfg, out_dir, dtype=self.cfg.export_dtype)
