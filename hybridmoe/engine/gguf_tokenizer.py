"""The tokenizer stored in a GGUF file's metadata, run by llama.cpp itself (llama-cpp-python, vocabulary only), so
that ids match llama.cpp's exactly. Same interface as tokenizer.Tokenizer; the chat template is the file's
`tokenizer.chat_template`, rendered with our sandboxed ChatTemplate.

llama.cpp ends the process on some damaged vocabularies instead of returning an error. So the metadata is checked
first (formats.gguf_vocab), and each file's vocabulary is then loaded once in a child process that also tokenizes a
sample and detokenizes every id: whatever still aborts there becomes a one-line error instead of exit 134."""
from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

from ..errors import ConfigError, ModelFileError
from ..formats import llama_child
from ..models.convert import quiet_llama_cpp
from ..formats.gguf import GGUFFile, split_parts
from ..formats.gguf_vocab import check_vocab
from .tokenizer import ChatTemplate, check_text

PROBE_SECONDS = 300
_probed: dict[tuple, str | None] = {}  # (path, size, mtime) -> the error, or None for a vocabulary that works


def llama_cpp_available() -> bool:
    from importlib.util import find_spec
    return find_spec("llama_cpp") is not None


def _llama():
    try:
        return quiet_llama_cpp()
    except ImportError:
        raise ConfigError("GGUF tokenizers run through llama.cpp: pip install llama-cpp-python") from None


def probe_vocab(path: Path) -> None:
    """Load the file's vocabulary in llama.cpp in a child process, once per file; raise ModelFileError if that
    fails or kills the child."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _probed:
        _probed[key] = _run_probe(path)
    if _probed[key]:
        raise ModelFileError(_probed[key])


def _run_probe(path: Path) -> str | None:
    try:
        r = llama_child.run(["probe", str(path)], timeout=PROBE_SECONDS)
    except subprocess.TimeoutExpired:
        return f"{path}: llama.cpp did not finish reading the tokenizer in {PROBE_SECONDS} s; the vocabulary is damaged"
    if r.returncode == 0:
        return None
    if r.returncode == llama_child.VOCAB_FAILED:
        return f"{path}: llama.cpp cannot read the tokenizer in this file"
    return f"{path}: llama.cpp fails on this file's tokenizer metadata ({llama_child.failure(r)}); the file is damaged"


class GGUFTokenizer:
    """Text <-> ids, special tokens, end-of-generation ids, and the chat template of a GGUF model file."""

    def __init__(self, path: str | Path, chat_template: str | None = None, file: GGUFFile | None = None):
        self.L = L = _llama()
        self.path = split_parts(Path(path))[0]  # llama.cpp reads a split model from its first part
        check_vocab((file or GGUFFile(self.path)).metadata, self.path)
        probe_vocab(self.path)
        params = L.llama_model_default_params()
        params.vocab_only = True
        self._model = L.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise ModelFileError(f"{self.path}: llama.cpp cannot read the tokenizer in this file")
        self._vocab = L.llama_model_get_vocab(self._model)
        self.vocab_size = L.llama_vocab_n_tokens(self._vocab)
        self.eos_ids = {t for t in range(self.vocab_size) if L.llama_vocab_is_eog(self._vocab, t)}
        bos = L.llama_vocab_bos(self._vocab)
        self.bos_id = bos if bos >= 0 else None
        self.add_bos = bool(L.llama_vocab_get_add_bos(self._vocab)) and self.bos_id is not None
        self.bos_token = self._piece(self.bos_id) if self.bos_id is not None else None
        eos = L.llama_vocab_eos(self._vocab)
        self.eos_token = self._piece(eos) if eos >= 0 else None
        self.chat_template = ChatTemplate(chat_template, f"{self.path} (tokenizer.chat_template)") \
            if isinstance(chat_template, str) else None

    def __del__(self):
        if getattr(self, "_model", None):
            self.L.llama_model_free(self._model)
            self._model = None

    def _piece(self, token: int) -> str:
        return self.decode([token], skip_special_tokens=False)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Special-token text (e.g. "<|im_start|>") is parsed as the special token, as tokenizers does."""
        data = check_text(text)
        n_max = len(data) + 8
        buf = (self.L.llama_token * n_max)()
        n = self.L.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special_tokens and self.add_bos, True)
        if n < 0:  # buffer too small: -n is the count needed
            buf = (self.L.llama_token * -n)()
            n = self.L.llama_tokenize(self._vocab, data, len(data), buf, -n, add_special_tokens and self.add_bos, True)
        return list(buf[:n])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if not ids:
            return ""
        if not all(0 <= i < self.vocab_size for i in ids):  # llama.cpp would end the process
            raise ValueError(f"token id {next(i for i in ids if not 0 <= i < self.vocab_size)} is outside the "
                             f"vocabulary (0..{self.vocab_size - 1})")
        arr = (self.L.llama_token * len(ids))(*ids)
        size = 16 * len(ids) + 64
        for _ in range(2):
            out = ctypes.create_string_buffer(size)
            n = self.L.llama_detokenize(self._vocab, arr, len(ids), out, size, False, not skip_special_tokens)
            if n >= 0:
                return out.raw[:n].decode("utf-8", errors="replace")
            size = -n  # too small: -n bytes are needed
        raise ModelFileError(f"{self.path}: llama.cpp could not detokenize {len(ids)} ids")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ConfigError(f"{self.path}: this model has no tokenizer.chat_template; use a plain prompt instead")
        return self.chat_template.render(messages, add_generation_prompt, bos_token=self.bos_token or "",
                                         eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], str]:
        text = self.render_chat(messages)
        return self.encode(text, add_special_tokens=False), text
