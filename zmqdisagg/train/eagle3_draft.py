"""The EAGLE3 draft: one Llama decoder layer over ``[norm(embed), norm(hidden)]``, in plain torch ops.

Shapes (``H`` target hidden size, ``V`` target vocab, ``Vd`` draft vocab, ``A`` number of aux layers)::

    fc          Linear(A*H -> H, no bias)     target aux hidden -> the draft's hidden stream
    embed       [V, H]   frozen, the target's embedding (a buffer: never trained, never checkpointed)
    midlayer    q/k/v: Linear(2H -> heads*d); o: Linear(heads*d -> H); MLP H -> I -> H (SwiGLU)
    norm        RMSNorm(H);  lm_head Linear(H -> Vd);  buffers d2t int64[Vd], t2d bool[V]

One draft step (``step``) maps ``hidden [B,S,H]`` and the next tokens' embeddings to the next hidden::

    x   = concat(input_layernorm(embed), hidden_norm(hidden))            [B, S, 2H]
    h   = hidden + attn(x)                                               (residual is the hidden stream)
    out = h + mlp(post_attention_layernorm(h))          logits = lm_head(norm(out))

Training-time test (TTT). Step ``i`` re-runs the layer on its own previous output, as it will run at
inference; its queries sit at rotary position ``t + i`` and attend to (the "cache_hidden" scheme):

    step 0 keys/values at positions s <= t   (the prefix, like the draft's KV cache at inference)
    step j keys/values at position  t only, for j = 1..i   (the tokens it drafted itself)

    Mask for S = 4 at step i = 2 (rows: query position t; x = attended):

                 step 0 keys    step 1 keys    step 2 keys
                 s=0 1 2 3      s=0 1 2 3      s=0 1 2 3
        t=0      x . . .        x . . .        x . . .
        t=1      x x . .        . x . .        . x . .
        t=2      x x x .        . . x .        . . x .
        t=3      x x x x        . . . x        . . . x

``ttt_attention`` computes this without building the mask: one causal ``[S, S]`` block for step 0 and one
diagonal score per later step, softmaxed together. ``ttt_mask`` builds the dense mask above; a test checks
that dense masked attention equals ``ttt_attention``. Guarantees: deterministic (no fused kernels, softmax
in fp32), and GQA by repeating key/value heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zmqdisagg.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class DraftConfig:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # target vocab
    draft_vocab_size: int
    aux_layer_ids: tuple[int, ...]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_positions: int = 2048

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise ConfigError(f"draft_vocab_size={self.draft_vocab_size} must be in 1..{self.vocab_size}")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # y = w * x / sqrt(mean(x^2) + eps), computed in fp32
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotary(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[S, head_dim]`` for Llama's rotate-half rotary embedding at ``positions``."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    inv_freq = 1.0 / theta ** exponents
    angles = positions.float()[:, None] * inv_freq[None, :]  # [S, d/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x * cos + rotate_half(x) * sin, rotate_half([a, b]) = [-b, a]
    a, b = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-b, a], dim=-1) * sin.to(x.dtype)


def causal_bias(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((size, size), float("-inf"), device=device, dtype=dtype).triu(1)


def ttt_mask(seq_len: int, step: int) -> torch.Tensor:
    """Dense bool ``[S, (step+1)*S]``: may query ``t`` of step ``step`` see key ``s`` of step ``j``."""
    t = torch.arange(seq_len)[:, None]
    s = torch.arange(seq_len)[None, :]
    blocks = [s <= t] + [s == t] * step
    return torch.cat(blocks, dim=1)


def ttt_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """Attention of step ``len(keys)-1``'s queries ``q [B,h,S,d]`` over all steps' keys/values."""
    seq_len, scale = q.shape[-2], 1.0 / math.sqrt(q.shape[-1])
    first = q @ keys[0].transpose(-1, -2) * scale + causal_bias(seq_len, q.device, q.dtype)  # [B,h,S,S]
    diag = [(q * k).sum(-1, keepdim=True) * scale for k in keys[1:]]  # each [B,h,S,1]
    scores = torch.cat([first, *diag], dim=-1)
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    out = probs[..., :seq_len] @ values[0]
    for j, v in enumerate(values[1:]):
        out = out + probs[..., seq_len + j, None] * v
    return out


class Attention(nn.Module):
    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(2 * h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(2 * h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, heads, self.head_dim).transpose(1, 2)  # [B, heads, S, d]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``cache`` holds earlier TTT steps' (k, v); this step's are appended to it."""
        q = apply_rotary(self._split(self.q_proj(x), self.heads), cos, sin)
        k = apply_rotary(self._split(self.k_proj(x), self.kv_heads), cos, sin)
        v = self._split(self.v_proj(x), self.kv_heads)
        groups = self.heads // self.kv_heads
        cache.append((k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)))
        out = ttt_attention(q, [kv[0] for kv in cache], [kv[1] for kv in cache])
        b, _, s, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        h = hidden + self.self_attn(x, cos, sin, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Draft(nn.Module):
    """The draft network. ``embed`` is the target's, frozen; set it with ``load_target_embedding``."""

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(len(cfg.aux_layer_ids) * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = MidLayer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.register_buffer("embed", torch.zeros(cfg.vocab_size, cfg.hidden_size), persistent=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))

    def load_target_embedding(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != tuple(self.embed.shape):
            raise ConfigError(f"target embed_tokens has shape {tuple(weight.shape)}, the draft expects "
                              f"{tuple(self.embed.shape)}; the draft config must match the target")
        self.embed.copy_(weight)

    def load_vocab(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    def step(self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
             cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One draft step: ``hidden [B,S,H]`` (``fc(aux)`` at step 0) -> the next hidden (pre-norm)."""
        cos, sin = rotary(positions, self.cfg.head_dim, self.cfg.rope_theta)
        embeds = F.embedding(input_ids, self.embed).to(hidden.dtype)
        return self.midlayer(embeds, hidden, cos, sin, cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))
