"""The DFlash draft: a block-diffusion drafter that fills ``block_size - 1`` masked tokens in one forward.

Shapes (``H`` target hidden size, ``K`` target layers, ``V`` target vocab, ``S`` context length, ``A``
blocks per sequence, ``L`` block size)::

    fc           Linear(K*H -> H, no bias)   target features -> context;   hidden_norm RMSNorm(H)
    layers[i]    input_layernorm, self_attn (q/k/v/o_proj, per-head q_norm/k_norm), post_attention_layernorm,
                 mlp (SwiGLU H -> I -> H)     i = 0 .. num_layers-1
    norm         RMSNorm(H)
    embed        [V, H] frozen buffer: the target's input embedding (never trained or checkpointed)
    lm_head      [V, H] frozen buffer: the target's full-vocab output head

One forward. The context ``c = hidden_norm(fc(features))`` is the same for every layer. The block stream
starts as ``x = embed([anchor token, MASK, ..., MASK])`` and each layer does::

    h = x + attn(q = input_layernorm(x),  k/v = [c ; input_layernorm(x)])
    x = h + mlp(post_attention_layernorm(h))                 logits = norm(x) @ lm_head.T

Queries come from the block only; keys and values from the context *and* the block. Rotary positions:
context token ``s`` sits at ``s``, block ``a``'s position ``k`` at ``anchor_a + k``.

The mask. Block ``a`` (anchor ``p_a``) sees the context strictly before its anchor and all of its own
block, in both directions; nothing of the other blocks. For ``S = 6``, anchors ``(2, 4)``, ``L = 2``
(rows: queries ``(block, k)``; ``x`` = attended)::

                        context s        block 0    block 1
                        0 1 2 3 4 5      k=0 1      k=0 1
        block 0  k=0    x x . . . .      x   x      .   .
        block 0  k=1    x x . . . .      x   x      .   .
        block 1  k=0    x x x x . .      .   .      x   x
        block 1  k=1    x x x x . .      .   .      x   x

``block_attention`` computes this without the dense mask: one ``[A*L, S]`` score matrix with the prefix
bias, plus one ``[L, L]`` block per anchor, softmaxed together. ``dflash_mask`` builds the dense mask
above; a test checks that dense masked attention equals ``block_attention`` and that the mask equals one
built element by element. Guarantees: deterministic (plain matmuls, softmax in fp32, no fused kernels);
GQA by repeating key/value heads; a block always sees itself, so no row of the softmax is empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zmqdisagg.errors import ConfigError
from zmqdisagg.train.eagle3_draft import MLP, RMSNorm, apply_rotary, rotary

ARCHITECTURE = "DFlashDraftModel"


@dataclass(frozen=True, kw_only=True, slots=True)
class DFlashConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # target vocab (embedding and lm_head rows)
    target_layer_ids: tuple[int, ...]  # target layers whose outputs are concatenated (K of them)
    num_target_layers: int
    block_size: int
    mask_token_id: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_positions: int = 2048

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(f"mask_token_id={self.mask_token_id} must be a row of the target's embedding "
                              f"(0..{self.vocab_size - 1})")
        if self.block_size < 2 or self.num_layers < 1 or not self.target_layer_ids:
            raise ConfigError("DFlash needs block_size >= 2, num_layers >= 1 and at least one target layer")


def dflash_mask(anchors: list[int], seq_len: int, block_size: int) -> torch.Tensor:
    """Dense bool ``[A*L, S + A*L]``: may query ``(a, k)`` see context ``s`` / block key ``(a', k')``."""
    n = len(anchors)
    query_block = torch.arange(n).repeat_interleave(block_size)[:, None]  # [A*L, 1]
    anchor = torch.tensor(anchors, dtype=torch.int64)[query_block]  # [A*L, 1]
    context = torch.arange(seq_len)[None, :] < anchor  # strictly before the anchor
    own_block = query_block == torch.arange(n).repeat_interleave(block_size)[None, :]
    return torch.cat([context, own_block], dim=1)


def block_attention(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor, k_blk: torch.Tensor,
                    v_blk: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Attention of block queries ``q [B,h,A,L,d]`` over the context ``[B,h,S,d]`` and their own block.

    ``anchors [B, A]``: context position ``s`` is visible to block ``a`` iff ``s < anchors[b, a]``.
    """
    b, h, a, l, d = q.shape
    seq_len, scale = k_ctx.shape[-2], 1.0 / math.sqrt(d)
    flat = q.reshape(b, h, a * l, d)
    visible = torch.arange(seq_len, device=q.device)[None, None, :] < anchors[:, :, None]  # [B, A, S]
    bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))
    ctx = flat @ k_ctx.transpose(-1, -2) * scale + bias.repeat_interleave(l, dim=1)[:, None]  # [B,h,A*L,S]
    own = (q @ k_blk.transpose(-1, -2) * scale).reshape(b, h, a * l, l)  # [B,h,A*L,L]
    probs = torch.cat([ctx, own], dim=-1).softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32))
    probs = probs.to(q.dtype)
    out = probs[..., :seq_len] @ v_ctx
    own_out = probs[..., seq_len:].reshape(b, h, a, l, l) @ v_blk  # [B,h,A,L,d]
    return out + own_out.reshape(b, h, a * l, d)


class BlockAttention(nn.Module):
    def __init__(self, cfg: DFlashConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(*x.shape[:-1], heads, self.head_dim).movedim(-2, 1)  # [B, heads, ..., d]

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, rope_blk: tuple[torch.Tensor, torch.Tensor],
                rope_ctx: tuple[torch.Tensor, torch.Tensor], anchors: torch.Tensor) -> torch.Tensor:
        """``x [B,A,L,H]`` (normed block stream), ``ctx [B,S,H]``; returns ``[B,A,L,H]``."""
        groups = self.heads // self.kv_heads
        q = apply_rotary(self.q_norm(self._heads(self.q_proj(x), self.heads)), *rope_blk)
        k_blk = apply_rotary(self.k_norm(self._heads(self.k_proj(x), self.kv_heads)), *rope_blk)
        k_ctx = apply_rotary(self.k_norm(self._heads(self.k_proj(ctx), self.kv_heads)), *rope_ctx)
        v_blk, v_ctx = self._heads(self.v_proj(x), self.kv_heads), self._heads(self.v_proj(ctx), self.kv_heads)
        k_blk, v_blk, k_ctx, v_ctx = (t.repeat_interleave(groups, dim=1) for t in (k_blk, v_blk, k_ctx, v_ctx))
        out = block_attention(q, k_ctx, v_ctx, k_blk, v_blk, anchors)  # [B, heads, A*L, d]
        b, _, a, l, _ = q.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, a, l, self.heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DFlashConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = BlockAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, rope_blk: tuple[torch.Tensor, torch.Tensor],
                rope_ctx: tuple[torch.Tensor, torch.Tensor], anchors: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), ctx, rope_blk, rope_ctx, anchors)
        return h + self.mlp(self.post_attention_layernorm(h))


class DFlashDraft(nn.Module):
    """The draft network; set the frozen target pieces with ``load_target_head``."""

    def __init__(self, cfg: DFlashConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(len(cfg.target_layer_ids) * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("embed", torch.zeros(cfg.vocab_size, cfg.hidden_size), persistent=False)
        self.register_buffer("lm_head", torch.zeros(cfg.vocab_size, cfg.hidden_size), persistent=False)

    def load_target_head(self, embed_tokens: torch.Tensor, lm_head: torch.Tensor) -> None:
        """Copy the target's input embedding and output head (both ``[V, H]``) into the frozen buffers."""
        for name, weight in (("embed_tokens", embed_tokens), ("lm_head", lm_head)):
            if tuple(weight.shape) != tuple(self.embed.shape):
                raise ConfigError(f"target {name} has shape {tuple(weight.shape)}, the draft expects "
                                  f"{tuple(self.embed.shape)}; the draft config must match the target")
        self.embed.copy_(embed_tokens)
        self.lm_head.copy_(lm_head)

    def forward(self, features: torch.Tensor, block_ids: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """``features [B,S,K*H]``, ``block_ids [B,A,L]``, ``anchors [B,A]`` -> final hidden ``[B,A,L,H]``."""
        cfg = self.cfg
        ctx = self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))
        b, a, l = block_ids.shape
        positions = anchors[:, :, None] + torch.arange(l, device=anchors.device)  # [B, A, L]
        cos, sin = rotary(positions.reshape(-1), cfg.head_dim, cfg.rope_theta)
        rope_blk = (cos.view(b, 1, a, l, -1), sin.view(b, 1, a, l, -1))
        rope_ctx = rotary(torch.arange(ctx.shape[1], device=ctx.device), cfg.head_dim, cfg.rope_theta)
        x = F.embedding(block_ids, self.embed).to(ctx.dtype)
        for layer in self.layers:
            x = layer(x, ctx, rope_blk, rope_ctx, anchors)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocab logits through the target's frozen ``lm_head``."""
        return F.linear(hidden, self.lm_head.to(hidden.dtype))
