"""Tokenizer (the `tokenizers` library) and the chat template of an HF model directory."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from ..errors import ConfigError, ModelFileError
from .chat_template import ChatTemplate  # noqa: F401 (also imported from here)


def _token_text(tok, key: str, where: Path) -> str | None:
    text = tok.get("content") if isinstance(tok, dict) else tok
    if text is not None and not isinstance(text, str):
        raise ModelFileError(f"{where}: {key} must be a string or an object with a string content")
    return text


def _ids(x, where: Path) -> list[int]:
    items = [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ModelFileError(f"{where}: eos_token_id must be a token id or a list of token ids, not {x!r}")
    return items


def check_text(text: str) -> bytes:
    """The UTF-8 bytes of a prompt. Bytes that are not UTF-8 reach Python as lone surrogates (command-line
    arguments, files read with surrogateescape); they are refused with a one-line error, not passed on as garbage."""
    if not isinstance(text, str):
        raise ValueError(f"the prompt must be text (str), not {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"code point U+{ord(bad):04X}"
        raise ValueError(f"the prompt is not valid UTF-8 ({byte} at character {e.start}); pass UTF-8 text") from None


class Tokenizer:
    """Text <-> ids, special tokens, end-of-sequence ids, and the chat template of an HF model directory."""

    def __init__(self, directory: str | Path, config: dict | None = None):
        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.exists():
            raise ModelFileError(f"{path}: not found; the model directory needs tokenizer.json to generate text")
        try:
            self.tk = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exceptions for corrupt files
            raise ModelFileError(f"{path}: cannot be read ({e})") from None
        tc = self._json(d / "tokenizer_config.json")
        gc = self._json(d / "generation_config.json")
        config = config or {}
        where = d / "tokenizer_config.json"
        self.bos_token = _token_text(tc.get("bos_token"), "bos_token", where)
        self.eos_token = _token_text(tc.get("eos_token"), "eos_token", where)
        self.add_bos = bool(tc.get("add_bos_token", False))
        eos = set(_ids(gc.get("eos_token_id"), d / "generation_config.json") + _ids(config.get("eos_token_id"),
                                                                                   d / "config.json"))
        if self.eos_token is not None and self.tk.token_to_id(self.eos_token) is not None:
            eos.add(self.tk.token_to_id(self.eos_token))
        self.eos_ids = eos
        self.bos_id = self.tk.token_to_id(self.bos_token) if self.bos_token else None
        template = tc.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        jinja = d / "chat_template.jinja"
        if template is None and jinja.exists():
            try:
                template = jinja.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ModelFileError(f"{jinja}: cannot be read ({e})") from None
        if template is not None and not isinstance(template, str):
            raise ModelFileError(f"{where}: chat_template must be a string, not {type(template).__name__}")
        self.chat_template = ChatTemplate(template, str(where)) if template else None

    @staticmethod
    def _json(path: Path) -> dict:
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as e:
            raise ModelFileError(f"{path}: invalid JSON ({type(e).__name__}: {e})") from None
        if not isinstance(data, dict):
            raise ModelFileError(f"{path}: expected a JSON object")
        return data

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_text(text)
        ids = self.tk.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ConfigError("this model has no chat_template in tokenizer_config.json; use a plain prompt instead")
        return self.chat_template.render(messages, add_generation_prompt, bos_token=self.bos_token or "",
                                         eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], str]:
        text = self.render_chat(messages)
        return self.encode(text, add_special_tokens=False), text


class StreamDecoder:
    """Turns a growing list of ids into text pieces, holding back bytes of an incomplete UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids before this only serve as context for the decoder's spacing rules
        self.read = 0  # ids up to here have been emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]
