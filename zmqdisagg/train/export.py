"""Export a trained draft as a directory SGLang and vLLM load as an EAGLE3 draft model.

    <dir>/config.json        architectures ["LlamaForCausalLMEagle3"], Llama shape keys, vocab_size (target),
                             draft_vocab_size, eagle_config.eagle_aux_hidden_state_layer_ids
    <dir>/model.safetensors  midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight,
                             midlayer.self_attn.{q,k,v,o}_proj.weight, midlayer.mlp.{gate,up,down}_proj.weight,
                             fc.weight, norm.weight, lm_head.weight, d2t (int64), t2d (bool),
                             embed_tokens.weight only with include_embeddings=True (engines share the target's)

These are the names SGLang's ``LlamaForCausalLMEagle3.load_weights`` maps (``q/k/v_proj`` -> ``qkv_proj``,
``gate/up_proj`` -> ``gate_up_proj``, a ``model.`` prefix for all but ``lm_head``; ``d2t`` becomes its hot
token ids, ``t2d`` is skipped).

Aux layer ids. zmqdisagg (like SpecForge and SGLang's ``eagle_config``) names a layer by its *output*:
id ``j`` is the residual stream after decoder layer ``j``. vLLM names it by the layer whose *input* it
is, so the same features are ``j + 1`` there. ``engine="vllm"`` writes the ids shifted by one (top level
and in ``eagle_config``); the default ``engine="sglang"`` writes them as trained.

Guarantees: files are written to a temporary directory and renamed into place; ``load_export`` reads
them back into an ``Eagle3Draft`` with bit-identical weights (for ``dtype="float32"``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from zmqdisagg.errors import ConfigError
from zmqdisagg.train.eagle3_draft import DraftConfig, Eagle3Draft

logger = logging.getLogger(__name__)

ENGINES = ("sglang", "vllm")
ARCHITECTURE = "LlamaForCausalLMEagle3"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_config(cfg: DraftConfig, dtype: str = "bfloat16", engine: str = "sglang") -> dict:
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine!r} must be one of {ENGINES}")
    shift = 1 if engine == "vllm" else 0
    aux = [i + shift for i in cfg.aux_layer_ids]
    out = {
        "architectures": [ARCHITECTURE], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": cfg.hidden_size, "target_hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": 1,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "draft_vocab_size": cfg.draft_vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_positions, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": dtype,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": aux, "use_aux_hidden_state": True},
    }
    if engine == "vllm":
        out["eagle_aux_hidden_state_layer_ids"] = aux
    return out


def export_tensors(draft: Eagle3Draft, dtype: str = "bfloat16", include_embeddings: bool = False
                   ) -> dict[str, torch.Tensor]:
    """The safetensors dict: float weights in ``dtype``, ``d2t`` int64, ``t2d`` bool."""
    cast = _DTYPES[dtype]
    out = {name: p.detach().to("cpu", cast).contiguous() for name, p in draft.named_parameters()}
    out["d2t"] = draft.d2t.detach().cpu().to(torch.int64)
    out["t2d"] = draft.t2d.detach().cpu().to(torch.bool)
    if include_embeddings:
        out["embed_tokens.weight"] = draft.embed.detach().to("cpu", cast).contiguous()
    return out


def export_draft(draft: Eagle3Draft, cfg: DraftConfig, out_dir: str | Path, *, dtype: str = "bfloat16",
                 engine: str = "sglang", include_embeddings: bool = False) -> Path:
    """Write ``config.json`` and ``model.safetensors`` to ``out_dir`` (replacing it); return it."""
    from safetensors.torch import save_file

    if dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} must be one of {tuple(_DTYPES)}")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(export_config(cfg, dtype, engine), indent=2) + "\n")
    save_file(export_tensors(draft, dtype, include_embeddings), str(tmp / "model.safetensors"),
              metadata={"format": "pt", "producer": "zmqdisagg"})
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    logger.info("exported EAGLE3 draft (%s, %s) to %s", engine, dtype, out_dir)
    return out_dir


def load_export(path: str | Path) -> Eagle3Draft:
    """Rebuild an ``Eagle3Draft`` from an exported directory (embedding included only if exported)."""
    from safetensors.torch import load_file

    path = Path(path)
    conf = json.loads((path / "config.json").read_text())
    shift = 1 if "eagle_aux_hidden_state_layer_ids" in conf else 0  # the vllm flavour
    cfg = DraftConfig(
        hidden_size=conf["hidden_size"], num_heads=conf["num_attention_heads"],
        num_kv_heads=conf["num_key_value_heads"], head_dim=conf["head_dim"],
        intermediate_size=conf["intermediate_size"], vocab_size=conf["vocab_size"],
        draft_vocab_size=conf["draft_vocab_size"],
        aux_layer_ids=tuple(i - shift for i in conf["eagle_config"]["eagle_aux_hidden_state_layer_ids"]),
        rms_norm_eps=conf["rms_norm_eps"], rope_theta=conf["rope_theta"],
        max_positions=conf["max_position_embeddings"])
    tensors = load_file(str(path / "model.safetensors"))
    draft = Eagle3Draft(cfg)
    if "embed_tokens.weight" in tensors:
        draft.load_target_embedding(tensors.pop("embed_tokens.weight").float())
    draft.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    return draft
