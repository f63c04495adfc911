"""Shard a Hugging Face decoder in place for tensor parallelism, following the model's own TP plan.

transformers declares, per architecture, which linear layers split by output features ("colwise":
q/k/v, gate/up) and which by input features ("rowwise": o_proj, down_proj). We read that plan
(``model.tp_plan``, else ``config.base_model_tp_plan``) and apply it with plain tensors::

    colwise   W[out, in] -> W[r*out/T : (r+1)*out/T, :]    bias sliced the same way; no communication
    rowwise   W[out, in] -> W[:, r*in/T : (r+1)*in/T]      y = all_reduce(x_r @ W_r^T) + bias

transformers' own ``apply_tensor_parallelism`` is built for ``from_pretrained``'s loading path (it
wraps parameters as DTensors before the weights arrive); applied to an already built model it fails
on tied embeddings (``KeyError: 'lm_head.weight'`` for Qwen3 with transformers 5.24) and needs the
private ``_resolve_parallel_plans``. The arithmetic here is the same as its inference fast path.

Guarantees:
- Rank ``r`` keeps its slice of the identical full weights every rank built (same seed, same files),
  so the group computes the unsharded function up to the summation order of the all-reduce after
  each rowwise layer (measured in ``docs/server_tp.md``).
- Embeddings, norms and ``lm_head`` stay whole on every rank: the plan's ``embedding_*``,
  ``colwise_gather_output`` and ``colwise_rep`` entries are deliberately not applied, so
  ``head_weights()`` needs no collective and rank 0 alone computes logits.
- Anything this module cannot apply exactly raises ``ConfigError`` naming the layer, style or size.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zmqdisagg.errors import ConfigError

logger = logging.getLogger(__name__)

# Plan styles left unapplied: these modules stay replicated on every rank (see the module docstring).
REPLICATED = frozenset({"colwise_gather_output", "colwise_rep", "embedding_rowwise", "embedding_colwise",
                        "replicated_with_grad_allreduce", "replicate"})


def tp_plan(model: Any) -> dict[str, str]:
    """The model's TP plan with full module names (``*`` stands for a layer number)."""
    plan = dict(getattr(model, "tp_plan", None) or {})
    if not plan:
        base = getattr(model.config.get_text_config(), "base_model_tp_plan", None) or {}
        prefix = getattr(model, "base_model_prefix", "model")
        plan = {f"{prefix}.{name}": style for name, style in base.items()}
    if not plan:
        raise ConfigError(f"{type(model).__name__} declares no tensor-parallel plan in transformers; "
                          "serve it with --tp 1")
    return plan


def shard_model(model: Any, rank: int, world: int) -> int:
    """Shard ``model``'s linear layers for rank ``rank`` of ``world``; return how many were sharded."""
    check_divisible(model.config.get_text_config(), world)
    modules = dict(model.named_modules())
    count = 0
    for pattern, style in tp_plan(model).items():
        if style in REPLICATED:
            continue
        if style not in ("colwise", "rowwise"):
            raise ConfigError(f"TP plan entry {pattern!r} uses style {style!r}; zmqdisagg's server TP applies "
                              "colwise/rowwise linear layers only. Serve this model with --tp 1")
        rx = re.compile(re.escape(pattern).replace(r"\*", r"\d+"))
        names = [name for name in modules if rx.fullmatch(name)]
        if not names:
            raise ConfigError(f"TP plan entry {pattern!r} matches no module of {type(model).__name__}; "
                              "serve it with --tp 1")
        for name in names:
            (_colwise if style == "colwise" else _rowwise)(name, modules[name], rank, world)
            count += 1
    logger.info("rank %d/%d: sharded %d linear layers; embeddings, norms and lm_head replicated",
                rank, world, count)
    return count


def check_divisible(text_config: Any, world: int) -> None:
    """Raise ``ConfigError`` unless ``world`` splits the attention heads and the MLP evenly."""
    sizes = {name: getattr(text_config, name, None)
             for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size")}
    bad = {k: v for k, v in sizes.items() if v is not None and v % world}
    if bad:
        heads = [sizes[k] for k in ("num_attention_heads", "num_key_value_heads") if sizes[k]]
        ok = [t for t in range(1, max(heads, default=1) + 1) if all(h % t == 0 for h in heads)]
        raise ConfigError(f"--tp {world} does not divide {bad} of this model; use --tp in {ok}")


def _linear(name: str, module: Any) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"TP plan shards {name!r}, a {type(module).__name__}, but only nn.Linear can be "
                          "sharded here (quantized layers are not supported); serve it with --tp 1")
    return module


def _slice(n: int, rank: int, world: int, name: str) -> slice:
    if n % world:
        raise ConfigError(f"--tp {world} does not divide {name}'s {n} features")
    return slice(rank * n // world, (rank + 1) * n // world)


def _keep(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(memory_format=torch.contiguous_format), requires_grad=False)


def _colwise(name: str, module: Any, rank: int, world: int) -> None:
    linear = _linear(name, module)
    rows = _slice(linear.out_features, rank, world, name)
    linear.weight = _keep(linear.weight[rows])
    if linear.bias is not None:
        linear.bias = _keep(linear.bias[rows])
    linear.out_features = rows.stop - rows.start


def _rowwise(name: str, module: Any, rank: int, world: int) -> None:
    linear = _linear(name, module)
    cols = _slice(linear.in_features, rank, world, name)
    linear.weight = _keep(linear.weight[:, cols])
    bias = linear.bias
    linear.register_parameter("bias", None)  # added once, after the sum over ranks
    linear.register_buffer("tp_bias", None if bias is None else bias.detach().clone(), persistent=False)
    linear.in_features = cols.stop - cols.start
    linear.register_forward_hook(_all_reduce)


def _all_reduce(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """y = sum over ranks of x_r @ W_r^T, plus the bias once (a forward hook on a rowwise layer)."""
    dist.all_reduce(output)
    bias = module.tp_bias
    return output if bias is None else output + bias
