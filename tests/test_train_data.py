"""Data pipeline: loss masks from the chat template (three ways), caching, batching, demo data."""

from __future__ import annotations

import json
import random

import pytest
import torch

from zmqdisagg.errors import ConfigError
from zmqdisagg.target.tokenizer import byte_tokenizer
from zmqdisagg.train import data as D
from zmqdisagg.train.batching import BatchPlan, collate, shard, split_indices
from zmqdisagg.train.demo_data import conversation, write_demo_jsonl

DIALOGUE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "2 + 3 = 5."}, {"role": "user", "content": "Spell 'ox'."},
            {"role": "assistant", "content": "o-x."}]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def tok_without_tags():
    t = byte_tokenizer()
    t.chat_template = t.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert not D.has_generation_tags(t)
    return t


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_mask_covers_exactly_assistant_content_and_turn_end(tok):
    ids, mask = D.tokenize_messages(tok, DIALOGUE)
    assert ids == tok.apply_chat_template(DIALOGUE, tokenize=True, return_dict=True)["input_ids"]
    masked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert masked == "2 + 3 = 5.<|end|>o-x.<|end|>"


def test_prefix_fallback_and_preformatted_text_match_generation_tags(tok, tok_without_tags):
    rng = random.Random(1)
    for _ in range(30):
        msgs = conversation(rng)
        expected = D.tokenize_messages(tok, msgs)
        assert D.tokenize_messages(tok_without_tags, msgs) == expected
        text = tok.apply_chat_template(msgs, tokenize=False)
        assert D.tokenize_text(tok, text, D.template_markers(tok)) == expected


def test_sharegpt_records_and_text_records_normalise(tmp_path, tok):
    share = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
             for m in DIALOGUE]
    path = _write_jsonl(tmp_path / "d.jsonl", [{"conversations": DIALOGUE}, {"conversations": share},
                                                {"text": tok.apply_chat_template(DIALOGUE, tokenize=False)}])
    records = D.read_records(path)
    ds = D.tokenize_records(tok, records, max_length=1000)
    assert len(ds) == 3
    assert all(torch.equal(ds[0][k], ds[i][k]) for i in (1, 2) for k in (0, 1))


def test_bad_records_raise_config_errors_naming_the_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        D.read_records(path)
    path.write_text("{not json\n")
    with pytest.raises(ConfigError, match="not valid JSON"):
        D.read_records(path)


def test_truncation_and_records_without_loss_are_dropped(tok):
    long_user = [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "ok"}]
    ds = D.tokenize_records(tok, [{"messages": DIALOGUE}, {"messages": long_user}], max_length=40)
    assert len(ds) == 1  # the second dialogue's answer starts after token 40
    ids, mask = ds[0]
    full_ids, full_mask = D.tokenize_messages(tok, DIALOGUE)
    assert ids.tolist() == full_ids[:40] and mask.tolist() == full_mask[:40] and 0 < mask.sum() < sum(full_mask)
    with pytest.raises(ConfigError, match="no record"):
        D.tokenize_records(tok, [{"messages": long_user}], max_length=40)


def test_cache_is_reused_and_keyed_by_file_tokenizer_and_length(tmp_path, tok, tok_without_tags):
    path = write_demo_jsonl(tmp_path / "demo.jsonl", 40, seed=3)
    first, key = D.load_dataset(path, tok, 64, tmp_path / "cache")
    assert (tmp_path / "cache" / "data" / f"{key}.pt").exists()
    again, key2 = D.load_dataset(path, tok, 64, tmp_path / "cache")
    assert key2 == key and torch.equal(first.ids, again.ids) and torch.equal(first.offsets, again.offsets)
    other_tok = byte_tokenizer()
    other_tok.chat_template = other_tok.chat_template.replace("<|end|>", "<|eos|>")
    keys = {key, D.cache_key(path, tok, 65), D.cache_key(path, other_tok, 64)}
    write_demo_jsonl(path, 40, seed=4)
    keys.add(D.cache_key(path, tok, 64))
    assert len(keys) == 4


def test_split_and_batch_plan_are_deterministic_and_cover_each_epoch():
    train, held = split_indices(50, 10, seed=7)
    assert not set(train) & set(held) and len(train) == 40 and len(held) == 10
    assert split_indices(50, 10, seed=7) == (train, held)
    plan = BatchPlan(indices=tuple(train), batch_size=8, seed=1)
    epoch0 = [i for s in range(plan.steps_per_epoch) for i in plan.global_batch(s)]
    assert sorted(epoch0) == sorted(train)
    epoch1 = [i for s in range(5, 10) for i in plan.global_batch(s)]
    assert sorted(epoch1) == sorted(train) and epoch1 != epoch0
    again = BatchPlan(indices=tuple(train), batch_size=8, seed=1)
    assert [again.global_batch(s) for s in range(12)] == [plan.global_batch(s) for s in range(12)]


def test_two_ranks_see_the_micro_batches_of_one_process():
    batch = list(range(8))
    one = shard(batch, 0, 1, 2)
    assert [shard(batch, r, 2, 1)[0] for r in range(2)] == one
    assert sum(shard(batch, 0, 2, 2) + shard(batch, 1, 2, 2), []) == batch
    with pytest.raises(ConfigError):
        shard(batch, 0, 3, 1)


def test_collate_right_pads(tok):
    ds = D.TokenizedDataset.from_samples([([5, 6, 7], [0, 1, 1]), ([8], [1])])
    out = collate(ds, [1, 0], pad_id=tok.pad_token_id)
    assert out["input_ids"].tolist() == [[8, tok.pad_token_id, tok.pad_token_id], [5, 6, 7]]
    assert out["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert out["loss_mask"].tolist() == [[1, 0, 0], [0, 1, 1]]
    assert ds.token_counts([0, 1]) == (4, 3)


def test_demo_data_is_deterministic_and_answers_are_right(tmp_path):
    a = write_demo_jsonl(tmp_path / "a.jsonl", 100, seed=5).read_bytes()
    b = write_demo_jsonl(tmp_path / "b.jsonl", 100, seed=5).read_bytes()
    c = write_demo_jsonl(tmp_path / "c.jsonl", 100, seed=6).read_bytes()
    assert a == b and a != c
    checked = 0
    for line in a.decode().splitlines():
        msgs = json.loads(line)["conversations"]
        for q, ans in zip(msgs, msgs[1:]):
            if q["role"] == "user" and q["content"].startswith("What is "):
                x, op, y = q["content"][len("What is "):-1].split()
                assert ans["content"] == f"{x} {op} {y} = {int(x) + int(y) if op == '+' else int(x) - int(y)}."
                checked += 1
    assert checked > 10
