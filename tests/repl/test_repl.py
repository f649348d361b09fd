"""`hybridmoe repl`: as a subprocess fed through stdin, and in-process for what a pipe cannot do (Ctrl-C, a TTY)."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybridmoe import Text
from hybridmoe.cli import build_parser
from hybridmoe.repl import Conversation, Repl, parse_setting

ROOT = Path(__file__).resolve().parents[2]


def repl(model, stdin: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "hybridmoe", "repl", str(model), *args], input=stdin, text=True,
                          capture_output=True, env=env, cwd=ROOT, timeout=120)


def test_piped_session_commands_multiline_save_and_load(repl_model, tmp_path):
    chat = tmp_path / "chat.json"
    script = "\n".join([
        "/set temperature 0", "/set max_tokens 6", "/set seed 3",
        "Hello there",
        '"""first line', "second line", '"""',
        "/set top_p 7",  # rejected: top_p must be in (0, 1]
        "/bogus",
        "/stats",
        f"/save {chat}",
    ]) + "\n"
    r = repl(repl_model, script, "--system", "Be brief.")
    assert r.returncode == 0, r.stderr
    assert ">>>" not in r.stdout and "..." not in r.stdout  # no prompts in a pipe
    assert "top_p must be in (0, 1]" in r.stderr and "unknown command /bogus" in r.stderr
    assert "decode" in r.stdout and "tok/s" in r.stdout  # /stats
    data = json.loads(chat.read_text())
    users = [m["content"] for m in data["messages"] if m["role"] == "user"]
    assert users == ["Hello there", "first line\nsecond line"]
    assert data["system"] == "Be brief."
    assert data["settings"] | {"top_p": 0.95} == data["settings"]  # the rejected value did not stick
    assert data["settings"]["temperature"] == 0 and data["settings"]["seed"] == 3

    # A new process picks the conversation up: history, system prompt and settings.
    r2 = repl(repl_model, f"/load {chat}\n/set\n/system\n/bye\nnever read\n")
    assert r2.returncode == 0, r2.stderr
    assert "loaded 4 messages" in r2.stderr
    assert "temperature = 0.0" in r2.stdout and "max_tokens = 6" in r2.stdout and "Be brief." in r2.stdout


def test_missing_model_is_one_line_and_exit_1(tmp_path):
    r = repl(tmp_path / "nope", "Hi\n")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "nope" in r.stderr


def run_repl(engine, text: str, tty: bool = False, **kw) -> tuple[Repl, str, str]:
    out, err = io.StringIO(), io.StringIO()
    r = Repl(engine, stdin=io.StringIO(text), stdout=out, stderr=err, tty=tty, **kw)
    assert r.run() == 0
    return r, out.getvalue(), err.getvalue()


class Interrupted:
    """Ctrl-C arrives after a few pieces of text, as if the user pressed it mid-answer."""

    def __init__(self, engine, after: int = 3):
        self._engine, self.after, self.stopped = engine, after, False

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stop(self):
        self.stopped = True
        self._engine.stop()

    def chat(self, messages, config=None):
        seen = 0
        for event in self._engine.chat(messages, config):
            yield event
            seen += isinstance(event, Text)
            if seen == self.after:
                raise KeyboardInterrupt


def test_ctrl_c_stops_the_answer_not_the_repl(repl_engine):
    engine = Interrupted(repl_engine)
    r, out, err = run_repl(engine, "/set max_tokens 50\n/set temperature 0\nTell me a story\n/stats\n")
    assert engine.stopped and "(stopped)" in err
    partial = r.conv.messages[-1]
    assert partial["role"] == "assistant" and partial["content"] and partial["content"] in out
    assert "cancelled" in out  # /stats ran after the interrupt


def test_tty_prompts_and_dim_reasoning(r1_repl_engine):
    r, out, err = run_repl(r1_repl_engine, "/set max_tokens 4\nThink\n", tty=True)
    assert "\x1b[2m" in out and "\x1b[0m" in out and "<think>" not in out
    r, out, err = run_repl(r1_repl_engine, "/set max_tokens 4\nThink\n", tty=False)
    assert "\x1b[" not in out and out.startswith("<think>\n") and "</think>" in out
    assert r.conv.messages[-1]["reasoning"]


@pytest.fixture(scope="session")
def r1_repl_engine(tmp_path_factory):
    import tiny

    import hybridmoe
    return hybridmoe.load(tiny.deepseek_v3(tmp_path_factory.mktemp("r1"), template=tiny.R1_TEMPLATE))


class Broken:
    path, device = Path("broken"), "cpu"

    def chat(self, messages, config=None):
        yield Text("partial ")
        raise RuntimeError("device lost")

    def stop(self):
        pass


def test_an_engine_failure_ends_the_answer_not_the_session():
    r, out, err = run_repl(Broken(), "Hi\n/stats\nAgain\n")
    assert err.count("error: RuntimeError: device lost") == 2
    assert [m["content"] for m in r.conv.messages] == ["Hi", "partial ", "Again", "partial "]


def test_unclosed_multiline_at_eof_is_still_sent(repl_engine):
    r, out, err = run_repl(repl_engine, '/set max_tokens 2\n"""one\ntwo\n')
    assert r.conv.messages[0]["content"] == "one\ntwo"


def test_commands_without_a_model_answer(repl_engine, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [{"role": "robot", "content": "x"}]}')
    r, out, err = run_repl(repl_engine, f"/help\n/save\n/load {bad}\n/load {tmp_path / 'none.json'}\n"
                                        "/system Be kind.\n/system\n/stats\n/clear\n/set seed none\n/set top_k x\n")
    assert "/set NAME VALUE" in out and "Be kind." in out and "no answer yet" in out
    assert "usage: /save FILE" in err and "message 0 needs a role" in err and "No such file" in err
    assert "top_k must be an integer" in err
    assert r.config.seed is None and r.conv.system == "Be kind."
    assert all(line.startswith(("error:", "system prompt", "conversation", "seed")) for line in err.splitlines())


def test_conversation_file_round_trip_and_bare_lists(tmp_path):
    conv = Conversation([{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello", "reasoning": "greet back"}],
                        system="S", settings={"temperature": 0.5})
    path = tmp_path / "c.json"
    conv.save(path)
    assert Conversation.load(path) == conv
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # the temporary file was renamed, not left behind
    assert conv.for_engine() == [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello"}]
    path.write_text(json.dumps([{"role": "system", "content": "T"}, {"role": "user", "content": "Yo"}]))
    bare = Conversation.load(path)
    assert bare.system == "T" and bare.messages == [{"role": "user", "content": "Yo"}]


def test_settings_parse_and_args():
    assert parse_setting("seed", "none") is None and parse_setting("top_k", "7") == 7
    with pytest.raises(ValueError, match="unknown setting"):
        parse_setting("warmth", "1")
    args = build_parser().parse_args(["repl", "model", "--device", "cpu", "--ctx", "256", "--system", "S"])
    assert (args.model, args.ctx, args.system, args.profile) == ("model", 256, "S", None)


class Noticing:
    """An answer that carries an engine notice (the offload engine's "cache shrunk", "CUDA graphs off", ...)."""
    path, device = Path("noticing"), "cpu"

    def chat(self, messages, config=None):
        from hybridmoe import Done, Notice
        yield Notice("CUDA graphs off: capture failed")
        yield Text("ok")
        yield Done("length", 1, 1, "ok")

    def stop(self):
        pass


def test_engine_notices_reach_the_user():
    r, out, err = run_repl(Noticing(), "Hi\n")
    assert "note: CUDA graphs off: capture failed" in err and out.strip() == "ok"
