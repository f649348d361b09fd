"""A long prompt in `repl` and `generate`: its reading progress on stderr, and Ctrl-C stopping it between chunks."""
import io
import signal

import pytest

import hybridmoe
from hybridmoe import Progress
from hybridmoe.cli import main
from hybridmoe.engine import generate
from hybridmoe.repl import Repl

PROMPT = "the quick brown fox jumps over the lazy dog " * 4


@pytest.fixture
def chunked(tiny_models, monkeypatch):
    """A tiny engine that reads prompts 8 tokens at a time and reports progress at once; forwards: tokens per
    forward pass."""
    monkeypatch.setattr(generate, "PROGRESS_AFTER_S", 0.0)
    eng = hybridmoe.load(tiny_models("deepseek_v3"))
    eng.prefill_chunk = 8
    forwards = []
    eng.model.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[1]))
    return eng, forwards


def ask(engine, tty: bool) -> tuple[Repl, str, str]:
    out, err = io.StringIO(), io.StringIO()
    r = Repl(engine, stdin=io.StringIO(f"/set max_tokens 3\n{PROMPT}\n"), stdout=out, stderr=err, tty=tty)
    assert r.run() == 0
    return r, out.getvalue(), err.getvalue()


def test_repl_shows_a_long_prompts_progress(chunked):
    engine, _ = chunked
    _, out, err = ask(engine, tty=False)
    lines = [line for line in err.splitlines() if line.startswith("reading the prompt: ")]
    assert len(lines) >= 2 and lines[0].startswith("reading the prompt: 8/") and "tok/s" in lines[0]
    assert "reading the prompt" not in out  # stdout holds the answer only
    _, _, err = ask(engine, tty=True)
    assert err.count("\r\x1b[K") >= 3 and err.endswith("\r\x1b[K")  # one line rewritten, then cleared


class CtrlC:
    """The user presses Ctrl-C once, while the prompt is being read (at the first progress report)."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def chat(self, messages, config=None):
        for ev in self._engine.chat(messages, config):
            if isinstance(ev, Progress):
                signal.raise_signal(signal.SIGINT)
            yield ev


def test_ctrl_c_while_reading_stops_at_the_next_chunk(chunked):
    engine, forwards = chunked
    before = signal.getsignal(signal.SIGINT)
    r, out, err = ask(CtrlC(engine), tty=False)
    assert "(stopped)" in err and r.last_done.reason == "cancelled"
    assert r.last_done.prompt_tokens > 8  # the loop's own Done: it ended between chunks, no exception cut it
    assert forwards == [8]  # the chunk that was running finished; nothing ran after it
    assert r.conv.messages == []  # no answer: the question is not kept either
    assert signal.getsignal(signal.SIGINT) is before  # the REPL's own Ctrl-C handling is back


def test_generate_shows_progress_on_stderr(tiny_models, monkeypatch, capsys):
    import hybridmoe.engine.engine as engine_module
    monkeypatch.setattr(generate, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 8)
    assert main(["generate", str(tiny_models("deepseek_v3")), "-p", PROMPT, "-n", "3", "--temperature", "0"]) == 0
    got = capsys.readouterr()
    assert "reading the prompt: 8/" in got.err and "reading the prompt" not in got.out
    assert "prompt tokens at" in got.err
