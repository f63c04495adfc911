"""Export: the EAGLE3 draft directory SGLang/vLLM load; reloaded and checked tensor by tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from zmqdisagg.train.eagle3_draft import DraftConfig, Eagle3Draft
from zmqdisagg.train.export import export_draft, load_export

CFG = DraftConfig(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=4, intermediate_size=40, vocab_size=50,
                  draft_vocab_size=10, aux_layer_ids=(1, 3, 4), rms_norm_eps=1e-5, rope_theta=5e5,
                  max_positions=256)
# the names SGLang's LlamaForCausalLMEagle3.load_weights maps onto its modules
SGLANG_NAMES = {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d",
                "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
                "midlayer.post_attention_layernorm.weight", "midlayer.self_attn.q_proj.weight",
                "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight",
                "midlayer.self_attn.o_proj.weight", "midlayer.mlp.gate_proj.weight",
                "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight"}


@pytest.fixture
def draft() -> Eagle3Draft:
    torch.manual_seed(0)
    d = Eagle3Draft(CFG)
    d.load_target_embedding(torch.randn(CFG.vocab_size, CFG.hidden_size))
    used = torch.tensor([0, 3, 4, 9, 17, 20, 21, 33, 40, 49])
    t2d = torch.zeros(CFG.vocab_size, dtype=torch.bool)
    t2d[used] = True
    d.load_vocab(used - torch.arange(10), t2d)
    return d


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_export_has_engine_names_shapes_and_config_keys(draft, tmp_path):
    out = export_draft(draft, CFG, tmp_path / "draft")
    tensors = _tensors(out)
    assert set(tensors) == SGLANG_NAMES
    assert tensors["midlayer.self_attn.q_proj.weight"].shape == (4 * 4, 2 * 16)  # 2H input
    assert tensors["midlayer.self_attn.k_proj.weight"].shape == (2 * 4, 2 * 16)
    assert tensors["fc.weight"].shape == (16, 3 * 16) and tensors["lm_head.weight"].shape == (10, 16)
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert torch.equal(tensors["d2t"] + torch.arange(10), tensors["t2d"].nonzero().flatten())
    for name, param in draft.named_parameters():
        assert tensors[name].dtype == torch.bfloat16
        assert torch.equal(tensors[name], param.detach().to(torch.bfloat16)), name
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["LlamaForCausalLMEagle3"]
    assert conf["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
    assert "eagle_aux_hidden_state_layer_ids" not in conf  # SGLang flavour: only eagle_config
    expected = {"hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 40,
                "vocab_size": 50, "draft_vocab_size": 10, "rms_norm_eps": 1e-5, "rope_theta": 5e5,
                "max_position_embeddings": 256, "num_hidden_layers": 1, "tie_word_embeddings": False}
    assert {k: conf[k] for k in expected} == expected


def test_transformers_reads_the_config(draft, tmp_path):
    from transformers import AutoConfig

    out = export_draft(draft, CFG, tmp_path / "draft")
    conf = AutoConfig.from_pretrained(str(out), local_files_only=True)
    assert conf.model_type == "llama" and conf.draft_vocab_size == 10 and conf.num_key_value_heads == 2
    assert conf.eagle_config["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]


def test_float32_export_reloads_bit_identical_and_vllm_shifts_layer_ids(draft, tmp_path):
    out = export_draft(draft, CFG, tmp_path / "draft", dtype="float32", engine="vllm", include_embeddings=True)
    conf = json.loads((out / "config.json").read_text())
    assert conf["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]  # vLLM counts the layer whose input it is
    assert conf["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert torch.equal(_tensors(out)["embed_tokens.weight"], draft.embed)
    again = load_export(out)
    assert again.cfg == CFG
    for (name, a), (_, b) in zip(draft.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 50, (1, 5))
    hidden = torch.randn(1, 5, 16)
    with torch.no_grad():
        assert torch.equal(draft.logits(draft.step(ids, hidden, torch.arange(5), [])),
                           again.logits(again.step(ids, hidden, torch.arange(5), [])))
