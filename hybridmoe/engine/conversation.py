"""A conversation as the REPL and the chat UI hold it: messages, system prompt and sampling settings, saved to and
loaded from one JSON format (atomic writes), and the settings a user may change by name."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .config import GenerationConfig

FORMAT = "hybridmoe-conversation"
ROLES = ("system", "user", "assistant")
# Settings a user may change with /set (and that conversation files carry), with their parsers.
SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "seed": int, "max_tokens": int,
            "repetition_penalty": float}


def parse_setting(name: str, value: str):
    """'/set seed none' -> None; other values are parsed by the setting's type. Raises ValueError (one line)."""
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; one of {', '.join(SETTINGS)}")
    if name == "seed" and value.lower() in ("none", "random", ""):
        return None
    try:
        return SETTINGS[name](value)
    except ValueError:
        kind = "an integer" if SETTINGS[name] is int else "a number"
        raise ValueError(f"{name} must be {kind}, not {value!r}") from None


def settings_of(cfg: GenerationConfig) -> dict:
    return {name: getattr(cfg, name) for name in SETTINGS}


@dataclass
class Conversation:
    """Messages as the chat template wants them, plus what a saved chat needs to resume: system prompt, settings.
    Assistant messages may carry "reasoning" (shown to the user, never sent back to the model)."""
    messages: list[dict] = field(default_factory=list)
    system: str | None = None
    settings: dict = field(default_factory=dict)

    def for_engine(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def save(self, path: str | Path) -> None:
        """Write atomically: a crash mid-write leaves the old file, never half a file."""
        path = Path(path).expanduser()
        data = {"format": FORMAT, "version": 1, "system": self.system, "settings": self.settings,
                "messages": self.messages}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> "Conversation":
        """Our own files, or a bare JSON list of {"role", "content"} messages. Raises ValueError or OSError."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a JSON conversation ({e})") from None
        if isinstance(data, list):
            data = {"messages": data}
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ValueError(f"{path}: expected an object with a \"messages\" list")
        messages, system = [], data.get("system")
        for i, m in enumerate(data["messages"]):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise ValueError(f"{path}: message {i} needs a role ({', '.join(ROLES)}) and a string content")
            if m["role"] == "system":  # a leading system message in a bare list becomes the system prompt
                system = m["content"]
                continue
            messages.append({k: v for k, v in m.items() if k in ("role", "content", "reasoning")})
        settings = data.get("settings") or {}
        if not isinstance(settings, dict):
            raise ValueError(f"{path}: \"settings\" must be an object")
        return cls(messages, system if isinstance(system, str) else None,
                   {k: v for k, v in settings.items() if k in SETTINGS})
