"""Checks of a GGUF file's tokenizer metadata before llama.cpp reads it. llama.cpp's vocabulary loader ends the whole
process on some damaged vocabularies (a failed assertion for a duplicate token text; a C++ exception through its C
API when a SentencePiece vocabulary lacks byte tokens and text needs them), so what it would trip on is refused here
with a one-line error naming the key."""
from __future__ import annotations

from ..errors import ModelFileError

TOKENIZER_MODELS = ("llama", "gpt2")  # SentencePiece-style and byte-level BPE: what the supported families use


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_vocab(meta: dict, where) -> None:
    """Raise ModelFileError for tokenizer metadata that llama.cpp would abort on or cannot use."""
    model = meta.get("tokenizer.ggml.model")
    if model not in TOKENIZER_MODELS:
        raise ModelFileError(f"{where}: tokenizer.ggml.model is {model!r}; supported: {', '.join(TOKENIZER_MODELS)}")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ModelFileError(f"{where}: tokenizer.ggml.tokens is missing or is not a list of strings")
    ids: dict[str, int] = {}
    for i, text in enumerate(tokens):
        first = ids.setdefault(text, i)
        if first != i:
            raise ModelFileError(f"{where}: tokenizer.ggml.tokens holds {text!r} twice (ids {first} and {i}); the "
                                 "vocabulary is damaged, so llama.cpp cannot load it")
    n = len(tokens)
    for key, ok in (("tokenizer.ggml.scores", lambda x: _is_int(x) or isinstance(x, float)),
                    ("tokenizer.ggml.token_type", _is_int)):
        values = meta.get(key)
        if values is not None and not (isinstance(values, list) and len(values) >= n and all(map(ok, values))):
            raise ModelFileError(f"{where}: {key} must be a list of {n} numbers, one per token")
    if model == "gpt2":
        merges = meta.get("tokenizer.ggml.merges")
        if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
            raise ModelFileError(f"{where}: tokenizer.ggml.merges is missing or is not a list of strings")
    else:  # llama.cpp spells text it has no token for as byte tokens, and throws where one is missing
        missing = [b for b in range(256) if f"<0x{b:02X}>" not in ids and not (b < 128 and chr(b) in ids)]
        if missing:
            raise ModelFileError(f"{where}: the SentencePiece vocabulary (tokenizer.ggml.tokens) lacks the byte token "
                                 f"<0x{missing[0]:02X}>{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; "
                                 "llama.cpp cannot tokenize text without them")
