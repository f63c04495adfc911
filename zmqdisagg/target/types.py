"""What a target computes, for whom: the types shared by the local model, the server and the client.

``Target`` is the interface the trainer sees. ``TargetModel`` (in-process) and ``RemoteTarget``
(a server over ZeroMQ) both implement it, and for the same inputs both return bit-identical tensors,
so a trainer cannot tell where its target runs.

Outputs are plain ``dict[str, Tensor]`` so that any transport can move them without knowing the op:

    eagle3  -> "aux_hidden"    [B, S, len(aux_layer_ids) * H]  residual stream after each aux layer
               "last_hidden"   [B, S, H]                       after the final norm  (teacher="hidden")
               "position_mask" [B, S] bool                     target argmax (full vocab) in draft vocab,
                                                               present once a vocab mapping is set
               "target_p"      [B, S, Vd] fp32 or bf16         softmax over the draft vocab rows,
                                                               instead of "last_hidden" (teacher="target_p*")
    dflash  -> "hidden"        [B, S, len(dflash_layer_ids) * H]  residual stream after each layer

No output is shifted: position t holds the target's view after reading tokens 0..t. The trainer does
any shifting its algorithm needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from zmqdisagg.errors import BadRequest, ConfigError

TEACHER_MODES = ("hidden", "target_p_fp32", "target_p_bf16")


@dataclass(frozen=True, kw_only=True, slots=True)
class TargetBatch:
    """One request: right-padded token ids and their attention mask (1 = real token)."""

    input_ids: torch.Tensor  # int64 [B, S]
    attention_mask: torch.Tensor  # int64 [B, S]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelInfo:
    """What a trainer needs to know about the target to build its draft."""

    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype: str
    device: str
    max_positions: int

    def to_wire(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "ModelInfo":
        return cls(**{k: d[k] for k in cls.__slots__})


def default_aux_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE3's default aux layers: low, middle and high features, ``[1, N//2-1, N-4]``.

    That formula repeats ids for N < 7 (N=6 gives ``(1, 2, 2)``), so small targets use
    ``(0, N//2, N-1)`` instead. EAGLE3 needs three distinct layers, so N < 3 raises ``ConfigError``.
    """
    if num_layers < 3:
        raise ConfigError(f"EAGLE3 needs 3 distinct aux layers but the target has {num_layers}; "
                          "pass aux_layer_ids explicitly or use a deeper target")
    return (1, num_layers // 2 - 1, num_layers - 4) if num_layers >= 7 else (0, num_layers // 2, num_layers - 1)


def default_dflash_layers(num_layers: int, count: int = 1) -> tuple[int, ...]:
    """DFlash's default target layers: one -> the middle layer; else evenly spaced over 1..N-3.

    When 1..N-3 holds fewer than ``count`` layers, the ids are spread over 0..N-1 instead, so the
    result never repeats an id. ``count`` outside 1..N raises ``ConfigError``.
    """
    if not 1 <= count <= num_layers:
        raise ConfigError(f"cannot pick {count} DFlash target layers from a {num_layers}-layer target; "
                          f"use 1..{num_layers} layers or pass dflash_layer_ids explicitly")
    if count == 1:
        return (num_layers // 2,)
    lo, hi = (1, num_layers - 3) if num_layers - 3 >= count else (0, num_layers - 1)
    # A step >= 1 keeps round() strictly increasing, so the ids are distinct.
    return tuple(int(round(lo + i * (hi - lo) / (count - 1))) for i in range(count))


def check_batch(batch: "TargetBatch", *, vocab_size: int, max_positions: int) -> "TargetBatch":
    """Validate a request and return it with an int64 attention mask; raise ``BadRequest`` if invalid.

    Shared by the server and the client, so a bad batch fails before it crosses the wire.
    Checks: int64 ``input_ids`` of shape [B, S] with B, S >= 1 and S <= ``max_positions``; ids in
    ``[0, vocab_size)``; an int64 or bool ``attention_mask`` of the same shape holding 0/1 and
    right-padded (each row is 1...1 0...0).
    """
    if not isinstance(batch, TargetBatch):
        raise BadRequest(f"expected a TargetBatch, got {type(batch).__name__}")
    ids, mask = batch.input_ids, batch.attention_mask
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 2:
        raise BadRequest(f"input_ids must be an int64 tensor of shape [batch, seq], got {_describe(ids)}")
    if ids.shape[0] < 1 or ids.shape[1] < 1:
        raise BadRequest(f"input_ids must hold at least one token in one row, got shape {tuple(ids.shape)}")
    if ids.shape[1] > max_positions:
        raise BadRequest(f"sequence length {ids.shape[1]} exceeds the target's max_positions={max_positions}; "
                         "truncate or split the sequence")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise BadRequest(f"token ids must lie in [0, {vocab_size}), got min={lo} max={hi}; "
                         "check that the tokenizer matches the target model")
    if not isinstance(mask, torch.Tensor) or mask.dtype not in (torch.int64, torch.bool):
        raise BadRequest(f"attention_mask must be an int64 (or bool) tensor, got {_describe(mask)}")
    if mask.shape != ids.shape:
        raise BadRequest(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
    mask = mask.to(torch.int64)
    if bool(((mask != 0) & (mask != 1)).any()):
        raise BadRequest("attention_mask must hold only 0 and 1")
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise BadRequest("attention_mask must be right-padded (each row 1...1 0...0); left padding shifts "
                         "positions")
    return TargetBatch(input_ids=ids, attention_mask=mask)


def check_t2d(t2d: torch.Tensor | None, vocab_size: int) -> torch.Tensor | None:
    """Validate the draft-vocab mask: a bool tensor of shape [vocab_size] with at least one True."""
    if t2d is None:
        return None
    if not isinstance(t2d, torch.Tensor) or t2d.dtype != torch.bool or tuple(t2d.shape) != (vocab_size,):
        raise ConfigError(f"t2d must be a bool tensor of shape [{vocab_size}] (target vocab size) marking the "
                          f"draft vocab, got {_describe(t2d)}; build it from the vocab mapping's 't2d'")
    if not bool(t2d.any()):
        raise ConfigError("t2d selects no token; the draft vocab must hold at least one target token")
    return t2d


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


@dataclass(frozen=True, kw_only=True, slots=True)
class TargetSettings:
    """Per-connection choices: which layers to capture and what teacher signal to return."""

    aux_layer_ids: tuple[int, ...] | None = None  # None -> default_aux_layers(N)
    dflash_layer_ids: tuple[int, ...] | None = None  # None -> default_dflash_layers(N)
    teacher: str = "hidden"  # one of TEACHER_MODES

    def __post_init__(self) -> None:
        if self.teacher not in TEACHER_MODES:
            raise ConfigError(f"teacher={self.teacher!r} is not one of {TEACHER_MODES}")
        for name in ("aux_layer_ids", "dflash_layer_ids"):
            ids = getattr(self, name)
            if ids is not None and (not ids or len(set(ids)) != len(ids)):
                raise ConfigError(f"{name}={ids!r} must be a non-empty list of distinct layer ids")

    def check_layers(self, num_layers: int) -> None:
        """Raise ``ConfigError`` if any layer id is outside ``0..num_layers-1``."""
        for name in ("aux_layer_ids", "dflash_layer_ids"):
            ids = getattr(self, name) or ()
            bad = [i for i in ids if not 0 <= i < num_layers]
            if bad:
                raise ConfigError(f"{name} has {bad}, outside 0..{num_layers - 1} of this target")

    def to_wire(self) -> dict[str, Any]:
        return {"aux_layer_ids": list(self.aux_layer_ids) if self.aux_layer_ids else None,
                "dflash_layer_ids": list(self.dflash_layer_ids) if self.dflash_layer_ids else None,
                "teacher": self.teacher}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "TargetSettings":
        def ids(v: Any) -> tuple[int, ...] | None:
            if v is None:
                return None
            if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
                raise ConfigError(f"layer ids must be a list of integers, got {v!r}")
            return tuple(v)
        return cls(aux_layer_ids=ids(d.get("aux_layer_ids")), dflash_layer_ids=ids(d.get("dflash_layer_ids")),
                   teacher=str(d.get("teacher", "hidden")))


@runtime_checkable
class Target(Protocol):
    """The trainer's view of a target model, local or remote.

    ``configure`` exists because layer choices and the draft vocab belong to the trainer, not to the
    server: one server serves many trainers with different drafts. ``t2d`` is the bool[V] mask of
    target tokens that are in the draft vocab; passing it enables ``position_mask`` / ``target_p``.
    """

    def info(self) -> ModelInfo: ...

    def head_weights(self) -> dict[str, torch.Tensor]:
        """The frozen pieces a draft borrows: ``embed_tokens`` [V, H], ``lm_head`` [V, H], ``norm`` [H]."""
        ...

    def configure(self, settings: TargetSettings, t2d: torch.Tensor | None = None) -> TargetSettings: ...

    def eagle3(self, batch: TargetBatch) -> dict[str, torch.Tensor]: ...

    def dflash(self, batch: TargetBatch) -> dict[str, torch.Tensor]: ...

    def close(self) -> None: ...
