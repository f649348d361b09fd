"""`hybridmoe repl`: a line-based chat on stdin/stdout that works on a terminal and in a pipe.

    python -m hybridmoe.repl [MODEL] [--device cuda] [--system TEXT] < questions.txt

Conversation files written here are the same JSON the chat UI saves and loads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from . import Done, Error, GenerationConfig, HybridMoEError, Stats, Text

FORMAT = "hybridmoe-conversation"
ROLES = ("system", "user", "assistant")
# Settings a user may change with /set (and that conversation files carry), with their parsers.
SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "seed": int, "max_tokens": int,
            "repetition_penalty": float}
# C0/C1 control characters other than tab and newline.
CONTROL = dict.fromkeys([*range(0x00, 0x09), *range(0x0b, 0x20), 0x7f, *range(0x80, 0xa0)], None)
HELP = """commands:
  /set NAME VALUE   change a setting: temperature, top_p, top_k, min_p, seed (none for random), max_tokens
  /set              show the settings
  /system TEXT      set the system prompt (/system alone shows it)
  /stats            speed and counters of the last answer
  /save FILE        save the conversation as JSON
  /load FILE        load a conversation saved by /save or by the chat UI
  /clear            forget the conversation (the system prompt stays)
  /bye              quit (Ctrl-D too)
  \"\"\"               start and end multi-line input; Ctrl-C stops an answer"""


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


class Repl:
    def __init__(self, engine, *, system: str | None = None, stdin: TextIO | None = None,
                 stdout: TextIO | None = None, stderr: TextIO | None = None, tty: bool | None = None):
        self.engine = engine
        self.stdin, self.stdout = stdin or sys.stdin, stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        # Prompts and colour only when a person is at a terminal; a pipe gets plain text only.
        self.tty = (self.stdin.isatty() and self.stdout.isatty()) if tty is None else tty
        self.conv = Conversation(system=system)
        self.config = GenerationConfig()
        self.last_done: Done | None = None
        self.last_stats: Stats | None = None
        self.counters: dict[str, float] = {}

    # --- input ---
    def _readline(self, prompt: str) -> str:
        if self.tty and self.stdin is sys.stdin:
            return input(prompt)  # readline editing and history
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    def read(self) -> str:
        """One user input; lines between a pair of \"\"\" are joined. Raises EOFError at the end of input."""
        line = self._readline(">>> ")
        if not line.lstrip().startswith('"""'):
            return line
        rest = line.lstrip()[3:]
        if rest.rstrip().endswith('"""'):
            return rest.rstrip()[:-3]
        lines = [rest] if rest else []
        while True:
            try:
                line = self._readline("... ")
            except EOFError:
                return "\n".join(lines)  # input ended without the closing quotes: send what came
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines).rstrip("\n")
            lines.append(line)

    def run(self) -> int:
        if self.tty:
            self.say(f"{self.engine.path.name} on {self.engine.device}; /help for commands, /bye to quit")
        while True:
            try:
                text = self.read()
            except EOFError:
                if self.tty:
                    self.out("\n")
                return 0
            except KeyboardInterrupt:
                self.say("\n(Ctrl-D or /bye quits)")
                continue
            if text.startswith("/"):
                if self.command(text) == "bye":
                    return 0
            elif text.strip():
                self.ask(text)

    # --- output ---
    def out(self, s: str) -> None:
        self.stdout.write(s)
        self.stdout.flush()

    def say(self, s: str) -> None:
        """Messages about the REPL itself go to stderr, so that a pipe's stdout holds only what was asked for."""
        print(s, file=self.stderr, flush=True)

    def _switch(self, old: str | None, new: str | None) -> None:
        if old == "reasoning":
            gap = "\n\n" if new else ""  # at the end of an answer, ask() adds the final newline
            self.out(("\x1b[0m" if self.tty else "\n</think>") + gap)
        if new == "reasoning":
            self.out("\x1b[2m" if self.tty else "<think>\n")

    def ask(self, text: str) -> None:
        self.conv.messages.append({"role": "user", "content": text})
        parts: dict[str, list[str]] = {"reasoning": [], "answer": []}
        channel, self.counters, self.last_done, self.last_stats = None, {}, None, None
        events = None
        try:
            events = self.engine.chat(self.conv.for_engine(), self.config)
            for ev in events:
                channel = self._handle(ev, parts, channel)
        except KeyboardInterrupt:
            # The interrupt may land inside the generator (it is then closed) or between events: in that case
            # draining after stop() yields the held-back text and Done("cancelled").
            self.engine.stop()
            try:
                for ev in events or ():
                    channel = self._handle(ev, parts, channel)
            except KeyboardInterrupt:
                if events is not None:
                    events.close()
            if self.last_done is None:  # the generator died with the interrupt: rebuild its ending from the stats
                st = self.last_stats
                self.last_done = Done("cancelled", st.prompt_tokens if st else 0, st.step if st else 0,
                                      "".join(parts["reasoning"] + parts["answer"]))
        except (HybridMoEError, ValueError) as e:
            self.say(f"error: {e}")
        except Exception as e:  # a failing engine ends this answer, not the session
            self.say(f"error: {type(e).__name__}: {e}")
        self._switch(channel, None)
        self.out("\n")
        answer, reasoning = "".join(parts["answer"]), "".join(parts["reasoning"])
        if self.last_done is not None and self.last_done.reason == "cancelled":
            self.say("(stopped)")
        if answer or reasoning:
            msg = {"role": "assistant", "content": answer}
            self.conv.messages.append(msg | {"reasoning": reasoning} if reasoning else msg)
        else:
            self.conv.messages.pop()  # nothing came back: keep the history a clean user/assistant alternation

    def _handle(self, ev, parts: dict[str, list[str]], channel: str | None) -> str | None:
        if isinstance(ev, Text) and ev.text:
            if ev.channel != channel:
                self._switch(channel, ev.channel)
                channel = ev.channel
            parts.setdefault(ev.channel, []).append(ev.text)
            # A terminal must not receive control sequences from a model; a pipe gets the text as it came.
            self.out(ev.text.translate(CONTROL) if self.tty else ev.text)
        elif isinstance(ev, Stats):
            self.last_stats = ev
            for key in ("cache_hits", "cache_misses", "bytes_copied", "disk_bytes", "experts_in_memory",
                        "experts_read_ahead", "experts_waited"):
                if key in ev.extra:
                    self.counters[key] = self.counters.get(key, 0) + _total(ev.extra[key])
            if "prefetch_recall" in ev.extra:
                self.counters["prefetch_recall"] = _mean(ev.extra["prefetch_recall"])
            for notice in ev.extra.get("notices", ()):  # e.g. the offload engine shrank its cache to fit
                self.say(f"note: {notice}")
        elif isinstance(ev, Error):
            self.say(f"error: {ev.message}")
        elif isinstance(ev, Done):
            self.last_done = ev
        return channel

    # --- commands ---
    def command(self, line: str) -> str | None:
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        try:
            handler = {"/set": self.cmd_set, "/system": self.cmd_system, "/stats": self.cmd_stats,
                       "/save": self.cmd_save, "/load": self.cmd_load, "/clear": self.cmd_clear,
                       "/help": self.cmd_help, "/?": self.cmd_help}.get(name)
            if name in ("/bye", "/exit", "/quit"):
                return "bye"
            if handler is None:
                raise ValueError(f"unknown command {name}; /help lists them")
            handler(arg)
        except (ValueError, OSError) as e:
            self.say(f"error: {e}")
        return None

    def cmd_help(self, arg: str) -> None:
        self.out(HELP + "\n")

    def cmd_set(self, arg: str) -> None:
        if not arg:
            self.out("".join(f"{k} = {v}\n" for k, v in settings_of(self.config).items()))
            return
        name, _, value = arg.partition(" ")
        self.config = self.config.updated(**{name: parse_setting(name, value.strip())})
        self.say(f"{name} = {getattr(self.config, name)}")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            self.out(f"{self.conv.system or '(no system prompt)'}\n")
            return
        self.conv.system = arg
        self.say("system prompt set")

    def cmd_stats(self, arg: str) -> None:
        d, s = self.last_done, self.last_stats
        if d is None or s is None:
            self.out("no answer yet\n")
            return
        lines = [f"prompt {d.prompt_tokens} tokens, answer {d.completion_tokens} tokens ({d.reason})",
                 f"prefill {s.prefill_tok_s:.1f} tok/s, decode {s.decode_tok_s:.1f} tok/s, {s.elapsed_s:.2f} s"]
        c = self.counters
        if "cache_hits" in c or "cache_misses" in c:
            seen = c.get("cache_hits", 0) + c.get("cache_misses", 0)
            lines.append(f"expert cache hit rate {100 * c.get('cache_hits', 0) / max(seen, 1):.1f}%")
        if "prefetch_recall" in c:
            lines.append(f"prefetch recall {100 * c['prefetch_recall']:.1f}%")
        if "bytes_copied" in c:
            lines.append(f"copied to the GPU {c['bytes_copied'] / 1e9:.3f} GB")
        if "disk_bytes" in c:  # a model larger than RAM
            served = sum(c.get(k, 0) for k in ("experts_in_memory", "experts_read_ahead", "experts_waited"))
            gb = c["disk_bytes"] / 1e9
            lines.append(f"read from disk {gb:.3f} GB ({gb / max(s.elapsed_s, 1e-9):.2f} GB/s); experts served "
                         f"from RAM {100 * c.get('experts_in_memory', 0) / max(served, 1):.1f}%")
        self.out("\n".join(lines) + "\n")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise ValueError("usage: /save FILE")
        self.conv.settings = settings_of(self.config)
        self.conv.save(arg)
        self.say(f"saved {len(self.conv.messages)} messages to {arg}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise ValueError("usage: /load FILE")
        conv = Conversation.load(arg)
        self.config = self.config.updated(**conv.settings)  # validated before anything is replaced
        self.conv = conv
        self.say(f"loaded {len(conv.messages)} messages from {arg}")

    def cmd_clear(self, arg: str) -> None:
        self.conv.messages.clear()
        self.say("conversation cleared")


def _total(value) -> float:
    """Offload counters come as a number or per layer ({layer: n}); the REPL shows the sum."""
    return float(sum(value.values())) if isinstance(value, dict) else float(value)


def _mean(value) -> float:
    return float(sum(value.values()) / max(len(value), 1)) if isinstance(value, dict) else float(value)


def main(args: argparse.Namespace) -> int:
    """Entry point of `hybridmoe repl`: load the model, then read and answer until /bye or the end of input."""
    from .cli import load_from_args  # the same model and offload options as every other subcommand
    try:
        engine = load_from_args(args)
    except (HybridMoEError, ValueError) as e:
        print(f"hybridmoe: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if sys.stdin.isatty() and sys.stdout.isatty():
        import readline  # noqa: F401  (line editing for input(); imported only on a terminal, where it is quiet)
    return Repl(engine, system=getattr(args, "system", None)).run()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """`python -m hybridmoe.repl ARGS` takes what `hybridmoe repl ARGS` takes."""
    from .cli import build_parser
    return build_parser().parse_args(["repl", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main(parse_args()))
