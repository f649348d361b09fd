"""`chat --connect` and `repl --connect`: the chat UI (through Textual's Pilot) and the REPL (a subprocess) use a
running server instead of loading a model, and get the answers the engine gives."""
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybridmoe import GenerationConfig, HybridMoEError
from hybridmoe.server.client import RemoteEngine

ROOT = Path(__file__).resolve().parents[2]
GREEDY = GenerationConfig(temperature=0, max_tokens=12)
HELLO = [{"role": "user", "content": "Hello"}]


def test_remote_engine_events_match_the_engine(server, demo_engine):
    remote = RemoteEngine(server.url)
    events = list(remote.chat(HELLO, GREEDY))
    solo = list(demo_engine.chat(HELLO, GREEDY))[-1]
    done = events[-1]
    assert (done.text, done.completion_tokens, done.prompt_tokens) == (solo.text, solo.completion_tokens,
                                                                      solo.prompt_tokens)
    assert remote.model.moe_layers() == demo_engine.model.moe_layers()
    assert remote.args.n_routed_experts == demo_engine.args.n_routed_experts


def test_remote_stop_cancels_the_request_on_the_server(server):
    remote = RemoteEngine(server.url)
    events = remote.chat(HELLO, GenerationConfig(temperature=0, max_tokens=1000, ignore_eos=True))
    got = [next(events) for _ in range(3)]
    remote.stop()
    rest = list(events)
    assert rest[-1].reason == "cancelled" and rest[-1].completion_tokens < 1000 and got
    deadline = time.time() + 30
    while server.backend.batch.running:
        assert time.time() < deadline
        time.sleep(0.05)


def test_connect_to_nothing_is_a_one_line_error():
    with pytest.raises(HybridMoEError, match="cannot reach the server"):
        RemoteEngine("http://127.0.0.1:9")


def test_chat_ui_connected_to_the_server(server, demo_engine):
    sys.path.insert(0, str(ROOT / "tests" / "tui"))
    from tui_helpers import FixedProbe, exchange
    from hybridmoe_tui.app import ChatApp

    async def body():
        app = ChatApp(RemoteEngine(server.url), config=GREEDY, probe=FixedProbe())
        async with app.run_test(size=(100, 30)) as pilot:
            await exchange(pilot, "Hello")
            assert app.done.reason in ("eos", "length")
            assert app.conv.messages[-1]["content"] == list(demo_engine.chat(HELLO, GREEDY))[-1].text
            assert app.monitor.state.decode_tok_s is not None  # the monitor got stats
    asyncio.run(body())


def test_repl_connected_to_the_server(server, demo_engine):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = "/set temperature 0\n/set max_tokens 12\nHello\n"
    out = subprocess.run([sys.executable, "-m", "hybridmoe", "repl", "--connect", server.url], input=script,
                         text=True, capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == list(demo_engine.chat(HELLO, GREEDY))[-1].text.strip()
    bad = subprocess.run([sys.executable, "-m", "hybridmoe", "repl", "demo", "--connect", server.url], input="",
                         text=True, capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert bad.returncode == 1 and "--connect uses the server's model" in bad.stderr
