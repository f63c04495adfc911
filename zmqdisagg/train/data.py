"""Training data: JSONL dialogues -> token ids and a loss mask on assistant content, cached on disk.

Input records (one JSON object per line):

  {"conversations": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
  {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}   (ShareGPT)
  {"text": "<a dialogue already rendered with the tokenizer's chat template>"}          (preformatted)

Guarantees:
  * the chat template is the tokenizer's own; ``loss_mask[j] == 1`` exactly for tokens of assistant
    content (with whatever the template closes the turn with, e.g. ``<|end|>``);
  * templates with ``{% generation %}`` tags use ``return_assistant_tokens_mask``. Templates without
    them use the **prefix fallback**: assistant turn k spans the characters between the rendering of
    ``messages[:k]`` with ``add_generation_prompt=True`` and the rendering of ``messages[:k+1]``, mapped
    to tokens by their offsets. Preformatted text uses the same idea: a probe dialogue rendered with
    the template yields the assistant header and the turn end, and each span between them is masked;
  * sequences are truncated to ``max_length``; records without any loss token are dropped (and counted);
  * the result is cached under ``cache_dir/data/<key>.pt``, ``key`` = sha256 of the data file's bytes,
    the tokenizer (vocab, template, class) and ``max_length``, so a changed input never reuses a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zmqdisagg.errors import ConfigError

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
_ROLES = {"user": "user", "human": "user", "system": "system", "assistant": "assistant", "gpt": "assistant",
          "chatgpt": "assistant", "bot": "assistant", "model": "assistant"}
_PROBE_USER, _PROBE_ASSISTANT = "\u2581USER\u2581", "\u2581ASSISTANT\u2581"


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenizedDataset:
    """All sequences, stored flat: sample ``i`` is ``ids[offsets[i]:offsets[i+1]]``."""

    ids: torch.Tensor  # int32 [total_tokens]
    loss_mask: torch.Tensor  # uint8 [total_tokens]
    offsets: torch.Tensor  # int64 [n + 1]

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b].long(), self.loss_mask[a:b].long()

    def token_counts(self, indices: list[int]) -> tuple[int, int]:
        """``(tokens, loss tokens)`` of the sequences ``indices``."""
        idx = torch.tensor(indices, dtype=torch.int64)
        tokens = int((self.offsets[idx + 1] - self.offsets[idx]).sum())
        return tokens, int(sum(int(self.loss_mask[self.offsets[i]:self.offsets[i + 1]].sum()) for i in indices))

    @classmethod
    def from_samples(cls, samples: list[tuple[list[int], list[int]]]) -> "TokenizedDataset":
        lengths = torch.tensor([0] + [len(ids) for ids, _ in samples], dtype=torch.int64)
        return cls(ids=torch.tensor([t for ids, _ in samples for t in ids], dtype=torch.int32),
                   loss_mask=torch.tensor([m for _, mask in samples for m in mask], dtype=torch.uint8),
                   offsets=torch.cumsum(lengths, 0))


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Parse a JSONL file into ``{"messages": [...]}`` or ``{"text": str}`` records."""
    out = []
    with Path(path).open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{line_no} is not valid JSON ({e})") from e
            if not isinstance(rec, dict):
                raise ConfigError(f"{path}:{line_no} must be a JSON object")
            out.append(_normalise_record(rec, f"{path}:{line_no}"))
    return out


def _normalise_record(rec: dict[str, Any], where: str) -> dict[str, Any]:
    if isinstance(rec.get("text"), str):
        return {"text": rec["text"]}
    conv = rec.get("conversations", rec.get("messages"))
    if not isinstance(conv, list):
        raise ConfigError(f"{where} needs a 'conversations' list or a 'text' string")
    msgs = []
    for m in conv:
        if not isinstance(m, dict):
            raise ConfigError(f"{where}: each message must be an object with role/content, got {m!r}")
        role = _ROLES.get(str(m.get("role", m.get("from", ""))).lower())
        content = m.get("content", m.get("value"))
        if role is None or not isinstance(content, str):
            raise ConfigError(f"{where}: message {m!r} needs role user/system/assistant (or ShareGPT from/value)")
        msgs.append({"role": role, "content": content})
    return {"messages": msgs}


def has_generation_tags(tokenizer: Any) -> bool:
    return bool(re.search(r"\{%-?\s*generation\s*-?%\}", tokenizer.chat_template or ""))


def tokenize_messages(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of the templated dialogue and its assistant-content mask."""
    if has_generation_tags(tokenizer):
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(enc["input_ids"]), list(enc["assistant_masks"])
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (text.startswith(head) and text.startswith(upto) and len(head) <= len(upto)):
            raise ConfigError("the chat template does not render prefixes of a dialogue as prefixes; "
                              "add {% generation %} tags to it or use preformatted text")
        spans.append((len(head), len(upto)))
    return _mask_from_spans(tokenizer, text, spans)


def template_markers(tokenizer: Any) -> tuple[str, str]:
    """The assistant header and the assistant turn end that the chat template renders."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE_USER},
                                          {"role": "assistant", "content": _PROBE_ASSISTANT}], tokenize=False)
    u_end = text.index(_PROBE_USER) + len(_PROBE_USER)
    a_start = text.index(_PROBE_ASSISTANT)
    header, end = text[u_end:a_start], text[a_start + len(_PROBE_ASSISTANT):]  # header: user close + role
    if not header or not end:
        raise ConfigError("cannot find the assistant header/turn end in the chat template; "
                          "use 'conversations' records instead of preformatted 'text'")
    return header, end


def tokenize_text(tokenizer: Any, text: str, markers: tuple[str, str]) -> tuple[list[int], list[int]]:
    """Preformatted text: mask each span from after an assistant header through its turn end."""
    header, end = markers
    spans, pos = [], 0
    while (h := text.find(header, pos)) >= 0:
        start = h + len(header)
        stop = text.find(end, start)
        stop = len(text) if stop < 0 else stop + len(end)
        spans.append((start, stop))
        pos = stop
    return _mask_from_spans(tokenizer, text, spans)


def _mask_from_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= s and e <= b for a, b in spans) and e > s) for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of everything about the tokenizer that changes token ids or masks."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update((tokenizer.chat_template or "").encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()


def cache_key(data_path: str | Path, tokenizer: Any, max_length: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{max_length}|{tokenizer_fingerprint(tokenizer)}|".encode())
    with Path(data_path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:24]


def tokenize_records(tokenizer: Any, records: list[dict[str, Any]], max_length: int) -> TokenizedDataset:
    markers = None
    samples, dropped = [], 0
    for rec in records:
        if "text" in rec:
            markers = markers or template_markers(tokenizer)
            ids, mask = tokenize_text(tokenizer, rec["text"], markers)
        else:
            ids, mask = tokenize_messages(tokenizer, rec["messages"])
        ids, mask = ids[:max_length], mask[:max_length]
        if sum(mask) == 0:
            dropped += 1
            continue
        samples.append((ids, mask))
    if not samples:
        raise ConfigError("no record has an assistant token within max_length; check the data and max_length")
    if dropped:
        logger.warning("dropped %d of %d records with no assistant token within max_length",
                       dropped, len(records))
    return TokenizedDataset.from_samples(samples)


def load_dataset(data_path: str | Path, tokenizer: Any, max_length: int,
                 cache_dir: str | Path) -> tuple[TokenizedDataset, str]:
    """Tokenize ``data_path`` or load it from the cache; return it and its cache key.

    The cache file is written atomically, so ranks that race on it never read a partial file.
    """
    if not Path(data_path).is_file():
        raise ConfigError(f"data_path={str(data_path)!r} is not a file; point it at a JSONL file (or set demo_samples)")
    key = cache_key(data_path, tokenizer, max_length)
    path = Path(cache_dir) / "data" / f"{key}.pt"
    if path.exists():
        logger.info("loading tokenized data from cache %s", path)
        return TokenizedDataset(**torch.load(path, weights_only=True)), key
    ds = tokenize_records(tokenizer, read_records(data_path), max_length)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"ids": ds.ids, "loss_mask": ds.loss_mask, "offsets": ds.offsets}, tmp)
    tmp.replace(path)
    logger.info("tokenized %d sequences (%d tokens, %d loss tokens) from %s -> %s", len(ds),
                ds.ids.numel(), int(ds.loss_mask.sum()), data_path, path)
    return ds, key
