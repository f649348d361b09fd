"""`hybridmoe repl`: a line-based chat on stdin/stdout that works on a terminal and in a pipe.

    hybridmoe repl [MODEL] [--device cuda] [--system TEXT] < questions.txt

Conversation files written here are the same JSON the chat UI saves and loads.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import TextIO

from . import Conversation, Done, Error, GenerationConfig, HybridMoEError, Notice, Progress, Stats, Text
from .engine.conversation import parse_setting, settings_of

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


@contextlib.contextmanager
def stop_on_interrupt(engine):
    """While an answer runs: the first Ctrl-C asks the engine to stop at the next boundary between prompt chunks or
    tokens, so no forward pass is cut in half; a second one interrupts at once. (Signals reach the main thread
    only; elsewhere Ctrl-C keeps its default.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []

    def handler(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)
        engine.stop()

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


class ProgressLine:
    """A long prompt's reading progress on stderr: one line rewritten in place on a terminal, a line per report
    otherwise."""

    def __init__(self, out: TextIO, tty: bool):
        self.out, self.tty, self.shown = out, tty, False

    def show(self, ev: Progress) -> None:
        text = (f"reading the prompt: {ev.done}/{ev.total} tokens ({100 * ev.done // ev.total}%), "
                f"{ev.done / max(ev.elapsed_s, 1e-9):.0f} tok/s")
        self.out.write(f"\r\x1b[K{text}" if self.tty else f"{text}\n")
        self.out.flush()
        self.shown = self.tty

    def clear(self) -> None:
        if self.shown:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.shown = False


def answer_events(events, engine, progress: ProgressLine):
    """An answer's events as a command line shows them: Progress on `progress` (not passed on, and its line cleared
    before any other event), with Ctrl-C asking the engine to stop between chunks (stop_on_interrupt) meanwhile."""
    with stop_on_interrupt(engine):
        for ev in events:
            if isinstance(ev, Progress):
                progress.show(ev)
                continue
            progress.clear()
            yield ev
    progress.clear()


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
        self.progress = ProgressLine(self.stderr, self.tty)

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
            for ev in answer_events(events, self.engine, self.progress):
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
        self.progress.clear()
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
        elif isinstance(ev, Notice):  # e.g. the offload engine shrank its cache to fit
            self.say(f"note: {ev.message}")
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


def run_repl(engine, system: str | None = None) -> int:
    """`hybridmoe repl` on a loaded engine: read and answer until /bye or the end of input."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        import readline  # noqa: F401  (line editing for input(); imported only on a terminal, where it is quiet)
    return Repl(engine, system=system).run()
