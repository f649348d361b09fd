"""Tokenizer (the `tokenizers` library) and chat templates rendered in a sandboxed jinja2 environment."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from ..errors import ConfigError, ModelFileError


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _raise(message: str):
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str, where: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                    ensure_ascii=ensure_ascii)
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ConfigError(f"{where}: chat_template does not parse ({e})") from None
        self.where = where

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
        except TemplateError as e:
            raise ConfigError(f"{self.where}: chat_template failed: {e}") from None


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
        self.bos_token = _token_text(tc.get("bos_token"))
        self.eos_token = _token_text(tc.get("eos_token"))
        self.add_bos = bool(tc.get("add_bos_token", False))
        eos = set(_as_list(gc.get("eos_token_id")) + _as_list(config.get("eos_token_id")))
        if self.eos_token is not None and self.tk.token_to_id(self.eos_token) is not None:
            eos.add(self.tk.token_to_id(self.eos_token))
        self.eos_ids = {int(i) for i in eos}
        self.bos_id = self.tk.token_to_id(self.bos_token) if self.bos_token else None
        template = tc.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja = d / "chat_template.jinja"
        if template is None and jinja.exists():
            template = jinja.read_text()
        self.chat_template = ChatTemplate(template, str(d / "tokenizer_config.json")) if template else None

    @staticmethod
    def _json(path: Path) -> dict:
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelFileError(f"{path}: invalid JSON ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
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
