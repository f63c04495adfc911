"""A byte-level tokenizer built in code, for bundled configs that ship no tokenizer.

Guarantees:
- No download and no files: :func:`byte_tokenizer` builds a ``PreTrainedTokenizerFast`` from the
  ``tokenizers`` library alone, and it is the same in every process.
- Token id ``b`` (0..255) is the UTF-8 byte ``b``; the special tokens follow from id 256 in the
  order of :data:`SPECIAL_TOKENS`. So ``decode(encode(text)) == text`` for any text, and any vocab
  of at least :data:`BYTE_VOCAB_SIZE` tokens can embed its ids.
- No special token is added implicitly: ``encode`` returns exactly the bytes. The chat template adds
  ``<|bos|>`` itself.
- The chat template wraps each assistant turn's content *and its closing* ``<|end|>`` in
  ``{% generation %}``, so ``apply_chat_template(..., return_dict=True,
  return_assistant_tokens_mask=True)`` gives the training loss mask. ``<|end|>`` is included so a
  draft learns to predict the end of a turn.
- ``<|mask|>`` is registered as ``mask_token`` for DFlash's masked block positions.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                  "<|mask|>")
BYTE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # ids 0..255 bytes, then the specials
TOKENIZER_NAME = "bytes"  # the value of a config's "zmqdisagg_tokenizer" key that selects this tokenizer

# Roles get their own token; an assistant turn's content and <|end|> are the generation (loss) span.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] }}<|end|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _byte_chars() -> list[str]:
    """The printable character that stands for each byte 0..255 in a byte-level vocab.

    Byte-level BPE works on strings, so every byte needs a visible, non-whitespace character: bytes
    that are already printable Latin-1 map to themselves, the others to 256, 257, ... in order.
    This is the mapping ``pre_tokenizers.ByteLevel`` applies, so the vocab below matches its output.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _build_core() -> Tokenizer:
    vocab = {ch: b for b, ch in enumerate(_byte_chars())}
    vocab.update({tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return core


@lru_cache(maxsize=1)
def _core_json() -> str:
    return _build_core().to_str()


def byte_tokenizer():  # -> transformers.PreTrainedTokenizerFast (imported lazily)
    """Return a fresh byte-level ``PreTrainedTokenizerFast`` with the zmqdisagg chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_core_json()),
        bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>", mask_token="<|mask|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        padding_side="right", model_max_length=1 << 30,
    )
    tok.chat_template = CHAT_TEMPLATE
    if len(tok) != BYTE_VOCAB_SIZE:  # guards the id layout the bundled configs rely on
        raise RuntimeError(f"byte tokenizer has {len(tok)} tokens, expected {BYTE_VOCAB_SIZE}")
    return tok


def special_token_ids() -> dict[str, int]:
    """Map each special token to its id (``<|bos|>`` -> 256, ...), e.g. for a model config."""
    return {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}
