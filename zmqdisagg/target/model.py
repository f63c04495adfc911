"""The target model in-process: a Hugging Face causal LM that returns EAGLE3 and DFlash features.

Guarantees:
- ``compute(op, batch, settings, t2d)`` is pure: it reads no per-connection state, so one server can
  hold one ``TargetModel`` and serve many connections with different settings, from several threads.
  Layer outputs are captured by forward hooks installed once on every decoder layer; a per-call
  ``ContextVar`` tells them which layers to keep, so concurrent calls never see each other's choices.
- "aux_hidden" / "hidden" hold the raw residual stream after decoder layer ``i`` for every ``i``,
  including ``N-1`` (HF's ``hidden_states[-1]`` is the post-norm output instead, so we hook).
  "last_hidden" is the final-norm output. Nothing is shifted. See ``types.py`` for the layouts.
- DFlash stops the forward after its deepest requested layer, since later layers are not needed.
- The forward runs under ``torch.inference_mode()``. Outputs are then materialised as ordinary,
  contiguous tensors (not inference tensors) on the model's device, so an in-process trainer can feed
  them into autograd just like tensors that arrived from a server. Hidden states are in the model
  dtype, masks are bool, "target_p" is fp32 or bf16 as the teacher mode says.
- Deterministic: the forward has no randomness and the attention kernel is fixed when the model is
  loaded (``sdpa`` by default, see ``build.py``), so the same inputs give bit-identical outputs in
  any two processes with the same device, dtype, torch build and CPU thread count.
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from zmqdisagg.errors import BadRequest, ConfigError, ZmqDisaggError
from zmqdisagg.target.types import (
    ModelInfo, TargetBatch, TargetSettings, check_batch, check_t2d, default_aux_layers, default_dflash_layers,
)

logger = logging.getLogger(__name__)

OPS = ("eagle3", "dflash")
_TARGET_P_DTYPES = {"target_p_fp32": torch.float32, "target_p_bf16": torch.bfloat16}


class _StopForward(Exception):
    """Raised by a hook once every requested layer is captured, to skip the rest of the forward."""


@dataclass(slots=True)
class _Capture:
    """What one forward call wants from the layer hooks, and what they collected."""

    want: frozenset[int]
    stop_after: int | None  # raise _StopForward after this layer (None: run to the end)
    out: dict[int, torch.Tensor] = field(default_factory=dict)


class TargetModel:
    """A causal LM plus hooks; implements the ``Target`` protocol in-process.

    Build one with :func:`zmqdisagg.target.build.load_target`, or wrap an already loaded
    ``*ForCausalLM`` (its attention implementation should be ``sdpa`` or ``eager``).
    """

    def __init__(self, model: Any) -> None:
        decoder = model.get_decoder()
        if not hasattr(decoder, "layers") or not hasattr(decoder, "norm"):
            raise ConfigError(f"{type(model).__name__} has no decoder .layers/.norm; zmqdisagg supports "
                              "decoder-only causal LMs laid out like Llama/Qwen")
        self._model = model.eval().requires_grad_(False)
        self._decoder = decoder
        self._capture: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar("capture", default=None)
        self._hooks = [layer.register_forward_hook(self._hook_for(i)) for i, layer in enumerate(decoder.layers)]
        param = next(model.parameters())
        text = model.config.get_text_config()
        self._softcap = getattr(text, "final_logit_softcapping", None)
        self._info = ModelInfo(
            model_type=str(text.model_type), num_layers=len(decoder.layers), hidden_size=int(text.hidden_size),
            vocab_size=int(model.get_input_embeddings().weight.shape[0]),
            dtype=str(param.dtype).removeprefix("torch."), device=str(param.device),
            max_positions=int(text.max_position_embeddings))
        self._device = param.device
        self._settings, self._t2d = self.resolve(TargetSettings())
        logger.info("target %s: %d layers, hidden %d, vocab %d, %s on %s, attention %s", self._info.model_type,
                    self._info.num_layers, self._info.hidden_size, self._info.vocab_size, self._info.dtype,
                    self._info.device, getattr(model.config, "_attn_implementation", "?"))

    @property
    def model(self) -> Any:
        """The wrapped Hugging Face ``*ForCausalLM`` (e.g. to ``save_pretrained`` it or compare against it)."""
        return self._live()

    # ---- the Target protocol -------------------------------------------------------------------
    def info(self) -> ModelInfo:
        self._live()
        return self._info

    def head_weights(self) -> dict[str, torch.Tensor]:
        """Copies of ``embed_tokens`` [V, H], ``lm_head`` [V, H] and the final ``norm`` [H].

        Copies, so a trainer cannot change the target through them; with tied embeddings
        ``lm_head`` holds the same values as ``embed_tokens`` in its own storage.
        """
        model = self._live()
        weights = {"embed_tokens": model.get_input_embeddings().weight,
                   "lm_head": model.get_output_embeddings().weight, "norm": self._decoder.norm.weight}
        return {k: w.detach().clone(memory_format=torch.contiguous_format) for k, w in weights.items()}

    def configure(self, settings: TargetSettings, t2d: torch.Tensor | None = None) -> TargetSettings:
        """Validate and store the settings used by :meth:`eagle3` / :meth:`dflash`; return them filled in."""
        self._settings, self._t2d = self.resolve(settings, t2d)
        return self._settings

    def eagle3(self, batch: TargetBatch) -> dict[str, torch.Tensor]:
        return self.compute("eagle3", batch, self._settings, self._t2d)

    def dflash(self, batch: TargetBatch) -> dict[str, torch.Tensor]:
        return self.compute("dflash", batch, self._settings, self._t2d)

    def close(self) -> None:
        """Remove the hooks and drop the model; safe to call more than once."""
        for hook in getattr(self, "_hooks", ()):
            hook.remove()
        self._hooks, self._model, self._decoder, self._t2d = [], None, None, None

    def __enter__(self) -> "TargetModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- stateless API used by the server ------------------------------------------------------
    def resolve(self, settings: TargetSettings, t2d: torch.Tensor | None = None
                ) -> tuple[TargetSettings, torch.Tensor | None]:
        """Check settings and the draft-vocab mask against this model; fill in default layers.

        Raises ``ConfigError`` for layer ids out of range, a malformed ``t2d`` or a ``target_p``
        teacher without ``t2d``. Returns the effective settings and ``t2d`` on the model's device.
        """
        self._live()
        n = self._info.num_layers
        settings.check_layers(n)
        t2d = check_t2d(t2d, self._info.vocab_size)
        if settings.teacher != "hidden" and t2d is None:
            raise ConfigError(f"teacher={settings.teacher!r} returns softmax over the draft vocab, so it needs "
                              "t2d (bool[V] draft-vocab mask); pass t2d or use teacher='hidden'")
        filled = TargetSettings(aux_layer_ids=settings.aux_layer_ids or default_aux_layers(n),
                                dflash_layer_ids=settings.dflash_layer_ids or default_dflash_layers(n),
                                teacher=settings.teacher)
        return filled, None if t2d is None else t2d.to(self._device)

    def compute(self, op: str, batch: TargetBatch, settings: TargetSettings,
                t2d: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Run ``op`` ("eagle3" or "dflash") on ``batch`` with these settings; reads no stored state."""
        if op not in OPS:
            raise BadRequest(f"unknown op {op!r}; the target computes one of {OPS}")
        settings, t2d = self.resolve(settings, t2d)
        batch = check_batch(batch, vocab_size=self._info.vocab_size, max_positions=self._info.max_positions)
        ids, mask = batch.input_ids.to(self._device), batch.attention_mask.to(self._device)
        if op == "dflash":
            hidden, _ = self._forward(ids, mask, settings.dflash_layer_ids, stop_early=True)
            with torch.no_grad():
                return {"hidden": torch.cat(hidden, dim=-1)}
        hidden, last = self._forward(ids, mask, settings.aux_layer_ids, stop_early=False)
        with torch.no_grad():  # outside inference mode: the results become ordinary tensors
            return self._eagle3_outputs(hidden, last, settings.teacher, t2d)

    # ---- internals -----------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, layer_ids: tuple[int, ...], *, stop_early: bool
                 ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Run the decoder; return the residuals after ``layer_ids`` (in that order) and the final-norm output."""
        decoder = self._decoder
        capture = _Capture(want=frozenset(layer_ids), stop_after=max(layer_ids) if stop_early else None)
        token = self._capture.set(capture)
        last = None
        try:
            with torch.inference_mode():
                last = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        except _StopForward:
            pass
        finally:
            self._capture.reset(token)
        return [capture.out[i] for i in layer_ids], last

    def _eagle3_outputs(self, hidden: list[torch.Tensor], last: torch.Tensor, teacher: str,
                        t2d: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out = {"aux_hidden": torch.cat(hidden, dim=-1)}
        if teacher == "hidden":
            out["last_hidden"] = last.clone(memory_format=torch.contiguous_format)
        if t2d is None:
            return out
        logits = self._model.get_output_embeddings()(last)  # [B, S, V], model dtype
        if self._softcap:  # Gemma-style soft-capping: cap * tanh(logits / cap)
            logits = torch.tanh(logits / self._softcap) * self._softcap
        out["position_mask"] = t2d[logits.argmax(dim=-1)]  # target's top-1 over the FULL vocab is in the draft
        if teacher != "hidden":
            out["target_p"] = torch.softmax(logits[..., t2d].float(), dim=-1).to(_TARGET_P_DTYPES[teacher])
        return out

    def _hook_for(self, index: int):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            capture = self._capture.get()
            if capture is None or index not in capture.want:
                return
            capture.out[index] = output[0] if isinstance(output, tuple) else output  # residual after layer
            if index == capture.stop_after:
                raise _StopForward
        return hook

    def _live(self) -> Any:
        if self._model is None:
            raise ZmqDisaggError("this TargetModel is closed; build a new one with load_target()")
        return self._model

    def __repr__(self) -> str:
        state = "closed" if self._model is None else f"{self._info.model_type} on {self._info.device}"
        return f"TargetModel({state})"
