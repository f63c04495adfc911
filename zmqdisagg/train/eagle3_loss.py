"""The EAGLE3 objective: align the target's outputs with the draft's positions, unroll TTT, score it.

Target outputs are not shifted: target position ``p`` has read tokens ``x_0..x_p`` and its distribution
``P_p`` predicts ``x_{p+1}``. The draft at TTT step ``i``, position ``t``:

    reads    fc(aux_t) (step 0) or its own step i-1 output at t,  and embed(x_{t+i+1})
    predicts x_{t+i+2}, supervised by P_{t+i+1} over the draft vocab
    counts   iff position_mask_{t+i+1} (target argmax is in the draft vocab) and loss_mask_{t+i+2}

``teacher_inputs`` builds the step-0 alignment (``ids[t] = x_{t+1}``, ``target_p[t] = P_{t+1}``,
``valid[t]``); step ``i`` reads them shifted left by ``i`` more (zeros past the end, never counted).

Loss. With ``q`` the draft's softmax over the draft vocab and ``N`` the number of loss-mask tokens in
the *global* batch (all ranks, all micro-batches; known from the data alone, no collective needed)::

    loss_i = sum_{b,t} valid_i * ( -sum_v P[v] * log q[v] ) / N
    loss   = sum_i step_decay**i * loss_i
    acc_i  = sum valid_i * [argmax q == argmax P] / sum valid_i

Because every micro-batch divides by the same ``N``, summing micro-batch gradients (by accumulation in
one process or by a summing all-reduce across ranks) gives the gradient of the global batch's loss.

``Eagle3Algorithm`` is EAGLE3's side of the loop's ``Algorithm`` interface (``algorithm.py``): the draft
vocab, the target settings, the draft, this objective, its metrics and the SGLang/vLLM export.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zmqdisagg.target.types import TargetSettings
from zmqdisagg.train.algorithm import Setup
from zmqdisagg.train.eagle3_draft import DraftConfig, Eagle3Draft
from zmqdisagg.train.export import export_draft
from zmqdisagg.train.vocab import load_vocab_mapping


def shift_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """``y[:, t] = x[:, t + n]``, zero (False) where ``t + n`` is past the end."""
    n = min(n, x.shape[1])
    return x if n == 0 else torch.cat([x[:, n:], torch.zeros_like(x[:, :n])], dim=1)


def teacher_probs(outputs: dict[str, torch.Tensor], lm_head_rows: torch.Tensor | None) -> torch.Tensor:
    """``P`` over the draft vocab, fp32 ``[B,S,Vd]``: shipped by the server, or from the last hidden."""
    if "target_p" in outputs:
        return outputs["target_p"].float()
    hidden = outputs["last_hidden"]  # final norm already applied
    logits = hidden.float() @ lm_head_rows.to(hidden.device).float().t()
    return logits.softmax(dim=-1)


def teacher_inputs(batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
                   lm_head_rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Step-0 aligned draft inputs and targets for one micro-batch (see the module docstring)."""
    device = outputs["aux_hidden"].device
    loss_mask = batch["loss_mask"].to(device).bool()
    position_mask = outputs["position_mask"].to(device).bool()
    return {
        "input_ids": shift_left(batch["input_ids"].to(device), 1),
        "aux_hidden": outputs["aux_hidden"],
        "target_p": shift_left(teacher_probs(outputs, lm_head_rows), 1),
        "valid": shift_left(position_mask, 1) & shift_left(loss_mask, 2),
    }


class Eagle3Objective(nn.Module):
    """Wraps the draft so one ``forward`` is the whole TTT unroll (what DDP wraps and syncs)."""

    def __init__(self, draft: Eagle3Draft, ttt_length: int, step_decay: float) -> None:
        super().__init__()
        self.draft = draft
        self.ttt_length = ttt_length
        self.step_decay = step_decay

    def forward(self, input_ids: torch.Tensor, aux_hidden: torch.Tensor, target_p: torch.Tensor,
                valid: torch.Tensor, denom: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the weighted loss and ``stats [ttt_length, 3]`` = (loss_i, correct_i, count_i) sums."""
        hidden = self.draft.fc(aux_hidden.to(self.draft.fc.weight.dtype))
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        total = 0.0
        stats = []
        for i in range(self.ttt_length):
            hidden = self.draft.step(shift_left(input_ids, i), hidden, positions + i, cache)
            loss_i, stat = self._score(self.draft.logits(hidden), shift_left(target_p, i), shift_left(valid, i))
            total = total + (self.step_decay ** i) * loss_i / denom
            stats.append(stat)
        return total, torch.stack(stats)

    @staticmethod
    def _score(logits: torch.Tensor, target_p: torch.Tensor, valid: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        logq = F.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        ce = -(target_p * logq).sum(-1)  # [B, S]
        w = valid.float()
        loss_sum = (ce * w).sum()
        correct = ((logits.argmax(-1) == target_p.argmax(-1)).float() * w).sum()
        return loss_sum, torch.stack([loss_sum.detach(), correct, w.sum()]).double()


class Eagle3Algorithm:
    """EAGLE3 for the training loop: ``stats`` rows are TTT steps; metrics ``loss_i``/``acc_i``."""

    op = "eagle3"
    headline = ("acc_0",)

    def __init__(self, setup: Setup) -> None:
        cfg = self.cfg = setup.cfg
        self.setup = setup
        self.stat_rows = cfg.ttt_length
        self.vocab = load_vocab_mapping(setup.ds, setup.train_idx, setup.info.vocab_size, cfg.draft_vocab_size,
                                        cfg.resolved_cache_dir, setup.data_key)

    def target_settings(self) -> tuple[TargetSettings, torch.Tensor]:
        return TargetSettings(aux_layer_ids=self.cfg.aux_layer_ids, teacher=self.cfg.teacher), self.vocab.t2d

    def build(self, settings: TargetSettings, head: dict[str, torch.Tensor]) -> tuple[nn.Module, nn.Module]:
        cfg, info, device = self.cfg, self.setup.info, self.setup.device
        self.draft_cfg = DraftConfig(
            hidden_size=info.hidden_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim or info.hidden_size // cfg.num_heads,
            intermediate_size=cfg.intermediate_size or 4 * info.hidden_size, vocab_size=info.vocab_size,
            draft_vocab_size=cfg.draft_vocab_size, aux_layer_ids=tuple(settings.aux_layer_ids),
            rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, max_positions=info.max_positions)
        self.draft = Eagle3Draft(self.draft_cfg).to(device)
        self.draft.load_target_embedding(head["embed_tokens"].to(device, torch.float32))
        self.draft.load_vocab(self.vocab.d2t, self.vocab.t2d)
        self.lm_head_rows = head["lm_head"][self.vocab.t2d.to(head["lm_head"].device)].to(device)
        return self.draft, Eagle3Objective(self.draft, cfg.ttt_length, cfg.step_decay)

    def denominator(self, indices: list[int], salt: int) -> float:
        return float(self.setup.ds.token_counts(indices)[1])  # N: loss-mask tokens of the global batch

    def inputs(self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
               salt: int) -> dict[str, torch.Tensor]:
        return teacher_inputs(batch, outputs, self.lm_head_rows)

    def metrics(self, stats: torch.Tensor, denom: float) -> dict[str, float]:
        out = {}
        for i, (loss_sum, correct, count) in enumerate(stats.tolist()):
            out[f"loss_{i}"] = loss_sum / denom
            out[f"acc_{i}"] = correct / max(count, 1.0)
        return out

    def export(self, out_dir: Path) -> Path:
        cfg = self.cfg
        return export_draft(self.draft, self.draft_cfg, out_dir, dtype=cfg.export_dtype, engine=cfg.export_engine)
