"""Tests of the in-process target: outputs against direct HF computations, validation, loading, tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from zmqdisagg.errors import BadRequest, ConfigError, ZmqDisaggError
from zmqdisagg.target.build import bundled_configs, load_target, load_tokenizer
from zmqdisagg.target.model import TargetModel
from zmqdisagg.target.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer, special_token_ids
from zmqdisagg.target.types import Target, TargetBatch, TargetSettings, default_aux_layers, default_dflash_layers

REPO = Path(__file__).resolve().parents[1]
TINY = ["tiny-llama", "tiny-qwen3"]


@pytest.fixture(scope="module", params=TINY)
def target(request):
    model = load_target(request.param)
    yield model
    model.close()


def make_batch(vocab: int = 264, rows: tuple[int, ...] = (12, 7), seed: int = 0) -> TargetBatch:
    """Right-padded random batch; row r has rows[r] real tokens."""
    g = torch.Generator().manual_seed(seed)
    seq = max(rows)
    ids = torch.randint(0, vocab, (len(rows), seq), generator=g)
    mask = (torch.arange(seq)[None, :] < torch.tensor(rows)[:, None]).to(torch.int64)
    return TargetBatch(input_ids=ids, attention_mask=mask)


def half_vocab_mask(vocab: int, seed: int = 1) -> torch.Tensor:
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[: vocab // 2]] = True
    return t2d


def hf_forward(target: TargetModel, batch: TargetBatch):
    """The reference: HF's own forward with all hidden states and full logits."""
    with torch.no_grad():
        return target.model(**batch.tensors(), output_hidden_states=True, use_cache=False)


# ---- outputs ---------------------------------------------------------------------------------------
def test_is_a_target_and_info(target):
    info = target.info()
    assert isinstance(target, Target)
    assert (info.vocab_size, info.hidden_size, info.max_positions, info.dtype) == (320, 64, 2048, "float32")
    assert info.num_layers == target.model.config.num_hidden_layers


def test_eagle3_shapes_and_matches_hf_hidden_states(target):
    n, batch = target.info().num_layers, make_batch()
    settings = target.configure(TargetSettings(aux_layer_ids=(0, n // 2, n - 2)))
    out = target.eagle3(batch)
    assert set(out) == {"aux_hidden", "last_hidden"}
    assert out["aux_hidden"].shape == (2, 12, 3 * 64) and out["last_hidden"].shape == (2, 12, 64)
    ref = hf_forward(target, batch)
    for k, layer in enumerate(settings.aux_layer_ids):  # hidden_states[i + 1] is the output of layer i (< N-1)
        assert torch.equal(out["aux_hidden"][..., k * 64:(k + 1) * 64], ref.hidden_states[layer + 1])
    assert torch.equal(out["last_hidden"], ref.hidden_states[-1])  # HF's last entry is post-norm
    for v in out.values():
        assert v.is_contiguous() and v.dtype == torch.float32 and not v.is_inference()


def test_last_layer_capture_is_raw_residual_not_post_norm(target):
    n, batch = target.info().num_layers, make_batch()
    out = target.compute("eagle3", batch, TargetSettings(aux_layer_ids=(n - 1, 0, 1)), None)
    raw_last = out["aux_hidden"][..., :64].contiguous()
    assert not torch.allclose(raw_last, out["last_hidden"], atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(target.model.get_decoder().norm(raw_last), out["last_hidden"], rtol=0, atol=1e-6)


def test_position_mask_and_target_p(target):
    batch, t2d = make_batch(), half_vocab_mask(320)
    logits = hf_forward(target, batch).logits
    out = target.compute("eagle3", batch, TargetSettings(), t2d)
    assert torch.equal(out["position_mask"], t2d[logits.argmax(-1)])
    assert out["position_mask"].dtype == torch.bool and out["position_mask"].shape == (2, 12)
    for teacher, dtype, tol in (("target_p_fp32", torch.float32, 1e-5), ("target_p_bf16", torch.bfloat16, 2e-2)):
        out = target.compute("eagle3", batch, TargetSettings(teacher=teacher), t2d)
        assert set(out) == {"aux_hidden", "position_mask", "target_p"}
        p = out["target_p"]
        assert p.dtype == dtype and p.shape == (2, 12, int(t2d.sum()))
        torch.testing.assert_close(p.float().sum(-1), torch.ones(2, 12), rtol=0, atol=tol)
        torch.testing.assert_close(p.float(), torch.softmax(logits[..., t2d].float(), -1), rtol=0, atol=tol)


def test_dflash_matches_hf_and_stops_early(target):
    n, batch = target.info().num_layers, make_batch()
    ids = (n - 2, 1)
    out = target.compute("dflash", batch, TargetSettings(dflash_layer_ids=ids), None)
    ref = hf_forward(target, batch)
    assert set(out) == {"hidden"} and out["hidden"].shape == (2, 12, 128) and out["hidden"].is_contiguous()
    assert torch.equal(out["hidden"], torch.cat([ref.hidden_states[i + 1] for i in ids], -1))
    default = target.compute("dflash", batch, TargetSettings(), None)["hidden"]
    assert torch.equal(default, ref.hidden_states[default_dflash_layers(n)[0] + 1])
    calls: list[int] = []
    hook = target.model.get_decoder().layers[n - 1].register_forward_hook(lambda *_: calls.append(1))
    try:
        target.compute("dflash", batch, TargetSettings(dflash_layer_ids=(1,)), None)
        assert calls == []  # layers after the deepest requested one never ran
        target.compute("eagle3", batch, TargetSettings(), None)
        assert calls == [1]
    finally:
        hook.remove()


def test_padding_does_not_change_real_positions(target):
    batch = make_batch(rows=(12, 7))
    alone = TargetBatch(input_ids=batch.input_ids[1:, :7], attention_mask=batch.attention_mask[1:, :7])
    padded = target.eagle3(batch)["aux_hidden"][1, :7]
    torch.testing.assert_close(padded, target.eagle3(alone)["aux_hidden"][0], rtol=1e-5, atol=1e-5)
    bool_mask = TargetBatch(input_ids=batch.input_ids, attention_mask=batch.attention_mask.bool())
    assert torch.equal(target.eagle3(bool_mask)["aux_hidden"], target.eagle3(batch)["aux_hidden"])


def test_outputs_feed_autograd(target):
    out = target.eagle3(make_batch())["aux_hidden"]
    w = torch.zeros(out.shape[-1], 4, requires_grad=True)
    (out @ w).sum().backward()  # an inference tensor could not be saved for backward
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_compute_does_not_leak_state(target):
    n, batch, t2d = target.info().num_layers, make_batch(), half_vocab_mask(320)
    stored = target.configure(TargetSettings(aux_layer_ids=(0, 1, 2)))
    first = target.eagle3(batch)
    other = target.compute("eagle3", batch, TargetSettings(aux_layer_ids=(n - 1, 2, 0), teacher="target_p_fp32"), t2d)
    assert torch.equal(other["aux_hidden"][..., 128:], first["aux_hidden"][..., :64])  # layer 0 is last there
    again = target.eagle3(batch)
    assert set(again) == {"aux_hidden", "last_hidden"} and torch.equal(again["aux_hidden"], first["aux_hidden"])
    assert target.configure(stored) == stored


def test_concurrent_compute_with_different_settings(target):
    n, batch = target.info().num_layers, make_batch()
    choices = [TargetSettings(aux_layer_ids=(0, 1, 2)), TargetSettings(aux_layer_ids=(n - 1, n - 2, n - 3))]
    expected = [target.compute("eagle3", batch, s, None)["aux_hidden"] for s in choices]
    errors: list[str] = []

    def worker(k: int) -> None:
        for _ in range(10):
            got = target.compute("eagle3", batch, choices[k], None)["aux_hidden"]
            if not torch.equal(got, expected[k]):
                errors.append(f"thread {k} got another connection's layers")

    threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_head_weights(target):
    weights, model = target.head_weights(), target.model
    assert {k: tuple(v.shape) for k, v in weights.items()} == {"embed_tokens": (320, 64), "lm_head": (320, 64),
                                                                 "norm": (64,)}
    assert torch.equal(weights["lm_head"], model.get_output_embeddings().weight)
    assert torch.equal(weights["embed_tokens"], model.get_input_embeddings().weight)
    assert weights["lm_head"].data_ptr() != model.get_output_embeddings().weight.data_ptr()  # a copy
    if model.config.tie_word_embeddings:
        assert torch.equal(weights["lm_head"], weights["embed_tokens"])
        assert weights["lm_head"].data_ptr() != weights["embed_tokens"].data_ptr()
    assert all(v.is_contiguous() and not v.requires_grad for v in weights.values())


# ---- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("ids, mask, words", [
    (torch.tensor([[1, 320]]), torch.ones(1, 2, dtype=torch.int64), "[0, 320)"),
    (torch.tensor([[-1, 2]]), torch.ones(1, 2, dtype=torch.int64), "[0, 320)"),
    (torch.tensor([[1, 2]], dtype=torch.int32), torch.ones(1, 2, dtype=torch.int64), "int64"),
    (torch.tensor([1, 2]), torch.ones(2, dtype=torch.int64), "int64 tensor of shape [batch, seq]"),
    (torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0, 3, dtype=torch.int64), "at least one token"),
    (torch.tensor([[1, 2]]), torch.ones(1, 3, dtype=torch.int64), "shape"),
    (torch.tensor([[1, 2]]), torch.ones(1, 2), "int64 (or bool)"),
    (torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), "right-padded"),
    (torch.tensor([[1, 2]]), torch.tensor([[1, 2]]), "only 0 and 1"),
    (torch.ones(1, 2049, dtype=torch.int64), torch.ones(1, 2049, dtype=torch.int64), "max_positions=2048"),
])
def test_bad_inputs_raise_bad_request(target, ids, mask, words):
    with pytest.raises(BadRequest) as info:
        target.eagle3(TargetBatch(input_ids=ids, attention_mask=mask))
    assert words in str(info.value)


def test_bad_op_and_settings(target):
    batch = make_batch()
    with pytest.raises(BadRequest, match="unknown op"):
        target.compute("medusa", batch, TargetSettings(), None)
    with pytest.raises(ConfigError, match="needs t2d"):
        target.compute("eagle3", batch, TargetSettings(teacher="target_p_fp32"), None)
    with pytest.raises(ConfigError, match="outside"):
        target.configure(TargetSettings(aux_layer_ids=(0, 1, 99)))
    for bad in (torch.ones(320, dtype=torch.int64), torch.ones(100, dtype=torch.bool), torch.zeros(320).bool()):
        with pytest.raises(ConfigError, match="t2d"):
            target.configure(TargetSettings(), bad)


def test_default_layers_are_distinct():
    for n in range(3, 80):
        assert len(set(default_aux_layers(n))) == 3 and max(default_aux_layers(n)) < n
        for count in range(1, n + 1):
            ids = default_dflash_layers(n, count)
            assert len(set(ids)) == count and 0 <= min(ids) and max(ids) < n
    assert default_aux_layers(32) == (1, 15, 28) and default_dflash_layers(36, 5) == (1, 9, 17, 25, 33)
    with pytest.raises(ConfigError):
        default_dflash_layers(4, 5)


def test_close_is_idempotent():
    model = load_target("tiny-llama")
    model.close()
    model.close()
    with pytest.raises(ZmqDisaggError, match="closed"):
        model.eagle3(make_batch())


# ---- loading ---------------------------------------------------------------------------------------
# Runs both here and in a fresh interpreter: a digest of the weights and of eagle3 outputs.
_DIGEST_FN = """
import hashlib, torch
from zmqdisagg.target.build import load_target
from zmqdisagg.target.types import TargetBatch

def digest(name, seed):
    model = load_target(name, seed=seed)
    h = hashlib.sha256()
    for key, value in sorted(model.model.state_dict().items()):
        h.update(key.encode())
        h.update(value.contiguous().numpy().tobytes())
    ids = (torch.arange(40, dtype=torch.int64).reshape(2, 20) * 7) % 264
    out = model.eagle3(TargetBatch(input_ids=ids, attention_mask=torch.ones_like(ids)))
    for key in sorted(out):
        h.update(out[key].numpy().tobytes())
    return h.hexdigest()
"""


def test_random_init_identical_across_processes():
    code = _DIGEST_FN + "\nprint(digest('tiny-qwen3', 0))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    namespace: dict = {}
    exec(_DIGEST_FN, namespace)
    here = namespace["digest"]("tiny-qwen3", 0)
    assert result.stdout.strip().splitlines()[-1] == here
    assert namespace["digest"]("tiny-qwen3", 1) != here


def test_random_init_is_seeded_and_keeps_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    a, b = load_target("tiny-llama", seed=5), load_target("tiny-llama", seed=5)
    assert torch.equal(torch.rand(4), expected)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_eager_attention_agrees_with_sdpa():
    batch = make_batch()
    sdpa, eager = load_target("tiny-llama"), load_target("tiny-llama", attn_implementation="eager")
    assert eager.model.config._attn_implementation == "eager"
    torch.testing.assert_close(eager.eagle3(batch)["aux_hidden"], sdpa.eagle3(batch)["aux_hidden"], rtol=1e-5,
                               atol=1e-5)


def test_dtype_and_yaml_config(tmp_path):
    cfg = json.loads((REPO / "configs" / "tiny-llama.json").read_text())
    path = tmp_path / "mini.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))
    model = load_target(str(path), dtype="bfloat16")
    out = model.compute("eagle3", make_batch(), TargetSettings(teacher="target_p_fp32"), half_vocab_mask(320))
    assert model.info().dtype == "bfloat16" and out["aux_hidden"].dtype == torch.bfloat16
    assert out["target_p"].dtype == torch.float32
    assert all(v.dtype == torch.bfloat16 for v in model.head_weights().values())


@pytest.mark.parametrize("value, words", [
    ("does-not-exist", "tiny-llama"),
    ("meta-llama/Llama-3.1-8B", "huggingface-cli download"),
    ("", "config.json"),  # the current directory has no config.json
])
def test_bad_sources_raise_config_error(value, words, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_target(value)
    assert words in str(info.value)
    with pytest.raises(ConfigError):
        load_tokenizer(value)


def test_bad_flags_name_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--dtype"):
        load_target("tiny-llama", dtype="fp8")
    with pytest.raises(ConfigError, match="--device"):
        load_target("tiny-llama", device="tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device"):
            load_target("tiny-llama", device="cuda:1")
    with pytest.raises(ConfigError, match="--attn-implementation"):
        load_target("tiny-llama", attn_implementation="flash_attention_2")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match="model config"):
        load_target(str(tmp_path / "notes.txt"))
    (tmp_path / "x.json").write_text('{"hidden_size": 3}')
    with pytest.raises(ConfigError, match="model_type"):
        load_target(str(tmp_path / "x.json"))


def test_save_and_load_hf_directory(tmp_path):
    original = load_target("tiny-qwen3", seed=3)
    original.model.save_pretrained(tmp_path)
    load_tokenizer("tiny-qwen3").save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) and (tmp_path / "config.json").is_file()
    loaded = load_target(str(tmp_path))
    batch, t2d = make_batch(), half_vocab_mask(320)
    for op in ("eagle3", "dflash"):
        a = original.compute(op, batch, TargetSettings(teacher="target_p_fp32"), t2d)
        b = loaded.compute(op, batch, TargetSettings(teacher="target_p_fp32"), t2d)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tok = load_tokenizer(str(tmp_path))
    assert len(tok) == BYTE_VOCAB_SIZE and tok.decode(tok.encode("héllo")) == "héllo"


# ---- tokenizer -------------------------------------------------------------------------------------
def test_byte_tokenizer_round_trips():
    tok = byte_tokenizer()
    text = "Hello, wörld! 🙂\n\tcode: x = [1, 2]  # ünïcode \x00\x7f"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert tok.mask_token_id == special_token_ids()["<|mask|>"] and tok.mask_token_id < BYTE_VOCAB_SIZE


def test_assistant_mask_covers_exactly_assistant_content():
    tok = byte_tokenizer()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello ü"}, {"role": "user", "content": "more"},
                {"role": "assistant", "content": "ok"}]
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    end = special_token_ids()["<|end|>"]
    assert len(ids) == len(mask) and ids[0] == tok.bos_token_id
    assert [i for i, m in zip(ids, mask) if m] == list("hello ü".encode()) + [end] + list(b"ok") + [end]
    assert tok.decode(ids) == ("<|bos|><|system|>be brief<|end|><|user|>hi<|end|><|assistant|>hello ü<|end|>"
                               "<|user|>more<|end|><|assistant|>ok<|end|>")


@pytest.mark.parametrize("name", TINY)
def test_bundled_configs_fit_the_tokenizer(name):
    assert set(TINY) <= set(bundled_configs())
    cfg = json.loads((REPO / "configs" / f"{name}.json").read_text())
    tok = load_tokenizer(name)
    assert cfg["vocab_size"] >= len(tok) == BYTE_VOCAB_SIZE
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
