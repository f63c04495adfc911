"""Export a trained draft as a directory inference engines load: EAGLE3 (SGLang/vLLM) and DFlash.

EAGLE3 (``export_draft``, ``load_export``)::

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

DFlash (``export_dflash``, ``load_dflash_export``), the layout published DFlash drafts use (a Qwen3-shaped
``DFlashDraftModel`` that borrows the target's embedding and ``lm_head``)::

    <dir>/config.json        architectures ["DFlashDraftModel"], model_type "qwen3", the shape keys,
                             num_hidden_layers (draft layers), num_target_layers, block_size,
                             dflash_config {block_size, mask_token_id, target_layer_ids}
    <dir>/model.safetensors  fc.weight, hidden_norm.weight, norm.weight, and for each layer i
                             layers.i.{input_layernorm,post_attention_layernorm}.weight,
                             layers.i.self_attn.{q,k,v,o}_proj.weight, layers.i.self_attn.{q,k}_norm.weight,
                             layers.i.mlp.{gate,up,down}_proj.weight

DFlash's ``target_layer_ids`` name a layer by its output (feature ``j`` is the residual stream after
decoder layer ``j``, Hugging Face's ``hidden_states[j + 1]``), as zmqdisagg does, so no engine shift applies.

Guarantees: files are written to a temporary directory and renamed into place; ``load_export`` and
``load_dflash_export`` read them back with bit-identical weights (for ``dtype="float32"``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from zmqdisagg.errors import ConfigError
from zmqdisagg.train.dflash_draft import ARCHITECTURE as DFLASH_ARCHITECTURE
from zmqdisagg.train.dflash_draft import DFlashConfig, DFlashDraft
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
    _check_dtype(dtype)
    out = write_model_dir(out_dir, export_config(cfg, dtype, engine), export_tensors(draft, dtype, include_embeddings))
    logger.info("exported EAGLE3 draft (%s, %s) to %s", engine, dtype, out)
    return out


def write_model_dir(out_dir: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Atomically replace ``out_dir`` with ``config.json`` and ``model.safetensors``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "producer": "zmqdisagg"})
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _check_dtype(dtype: str) -> None:
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} must be one of {tuple(_DTYPES)}")


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


# -- DFlash --------------------------------------------------------------------------------------
def dflash_export_config(cfg: DFlashConfig, dtype: str = "bfloat16") -> dict:
    dflash = {"block_size": cfg.block_size, "mask_token_id": cfg.mask_token_id,
              "target_layer_ids": list(cfg.target_layer_ids)}
    return {
        "architectures": [DFLASH_ARCHITECTURE], "model_type": "qwen3", "hidden_act": "silu",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "max_position_embeddings": cfg.max_positions, "num_target_layers": cfg.num_target_layers,
        "block_size": cfg.block_size, "dflash_config": dflash, "tie_word_embeddings": False,
        "attention_bias": False, "use_cache": False, "torch_dtype": dtype,
    }


def export_dflash(draft: DFlashDraft, cfg: DFlashConfig, out_dir: str | Path, *, dtype: str = "bfloat16") -> Path:
    """Write the DFlash draft directory (trainable weights only; engines use the target's head)."""
    _check_dtype(dtype)
    cast = _DTYPES[dtype]
    tensors = {name: p.detach().to("cpu", cast).contiguous() for name, p in draft.named_parameters()}
    out = write_model_dir(out_dir, dflash_export_config(cfg, dtype), tensors)
    logger.info("exported DFlash draft (%s, block %d) to %s", dtype, cfg.block_size, out)
    return out


def load_dflash_export(path: str | Path) -> DFlashDraft:
    """Rebuild a ``DFlashDraft`` from an exported directory; load the target head with ``load_target_head``."""
    from safetensors.torch import load_file

    path = Path(path)
    conf = json.loads((path / "config.json").read_text())
    dflash = conf["dflash_config"]
    cfg = DFlashConfig(
        hidden_size=conf["hidden_size"], num_layers=conf["num_hidden_layers"],
        num_heads=conf["num_attention_heads"], num_kv_heads=conf["num_key_value_heads"], head_dim=conf["head_dim"],
        intermediate_size=conf["intermediate_size"], vocab_size=conf["vocab_size"],
        target_layer_ids=tuple(dflash["target_layer_ids"]), num_target_layers=conf["num_target_layers"],
        block_size=dflash["block_size"], mask_token_id=dflash["mask_token_id"], rms_norm_eps=conf["rms_norm_eps"],
        rope_theta=conf["rope_theta"], max_positions=conf["max_position_embeddings"])
    draft = DFlashDraft(cfg)
    draft.load_state_dict({k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()})
    return draft
