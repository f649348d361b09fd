"""The chat app driven through Textual's Pilot, with a real engine (the demo model when built, else a tiny one)."""
import asyncio
import json

import pytest
from tui_helpers import FixedProbe, Paced, exchange, send, visible_text, wait_until

from hybridmoe import Error, GenerationConfig, Stats
from hybridmoe_tui.app import ChatApp, EngineEvent
from hybridmoe_tui.chat import AssistantMessage, PromptInput, UserMessage
from hybridmoe_tui.heatmap import Heatmap
from hybridmoe_tui.monitor import Monitor
from hybridmoe_tui.screens import ModelInfoScreen, PathScreen, SettingsScreen
from textual.widgets import Collapsible, Markdown, Static

GREEDY = GenerationConfig(temperature=0, seed=0, max_tokens=24, ignore_eos=True)


def make_app(engine, config=GREEDY, **kw) -> ChatApp:
    return ChatApp(engine, config=config, probe=FixedProbe(), **kw)


def answer_source(msg: AssistantMessage) -> str:
    return msg.query_one(".answer", Markdown).source


def run(coro):
    asyncio.run(coro)


def test_prompt_streams_into_the_chat(engine):
    async def body():
        # Paced: Pilot's key presses wait up to 1 s for a busy process, longer than a tiny model's whole answer.
        app = make_app(Paced(engine, delay=0.05), config=GREEDY.updated(max_tokens=40))
        async with app.run_test(size=(100, 30)) as pilot:
            await send(pilot, "Hello there")
            await wait_until(pilot, lambda: app.current is not None and answer_source(app.current))
            partial = answer_source(app.current)
            assert app.generating, "text showed up while the answer was still streaming"
            await wait_until(pilot, lambda: app.turns == 1)
            msg = app.query(AssistantMessage).last()
            final = answer_source(msg)
            assert final.startswith(partial) and len(final) > len(partial)
            assert [m["role"] for m in app.conv.messages] == ["user", "assistant"]
            assert app.conv.messages[1]["content"].strip() == final.strip()
            assert app.done.reason == "length" and app.done.completion_tokens == 40
            assert "ready" in str(app.query_one("#status", Static).render())
    run(body())


def test_escape_stops_and_keeps_the_partial_answer(engine):
    async def body():
        app = make_app(Paced(engine, delay=0.02), config=GREEDY.updated(max_tokens=400))
        async with app.run_test(size=(100, 30)) as pilot:
            await send(pilot, "Tell me a long story")
            await wait_until(pilot, lambda: app.current is not None and len(answer_source(app.current)) > 5)
            await pilot.press("escape")
            await wait_until(pilot, lambda: app.turns == 1)
            assert app.done.reason == "cancelled" and app.done.completion_tokens < 400
            kept = app.conv.messages[-1]
            assert kept["role"] == "assistant" and kept["content"]
            assert "cancelled" in str(app.query(AssistantMessage).last().query_one(".note", Static).render())
    run(body())


def test_quitting_mid_answer_stops_the_engine_and_exits_cleanly(engine):
    async def body():
        app = make_app(Paced(engine, delay=0.02), config=GREEDY.updated(max_tokens=400))
        async with app.run_test(size=(80, 24)) as pilot:
            await send(pilot, "Tell me a long story")
            await wait_until(pilot, lambda: app.current is not None and answer_source(app.current))
            await pilot.press("ctrl+q")
        assert app.return_code == 0 and engine.cancel.is_set()
    run(body())


def test_monitor_updates_from_stats(engine):
    async def body():
        app = make_app(engine)
        async with app.run_test(size=(100, 30)) as pilot:
            monitor = app.query_one(Monitor)
            assert "n/a" in str(monitor.query_one("#decode", Static).render())
            await exchange(pilot, "Hi")
            state = monitor.state
            assert state.decode_tok_s > 0 and state.prefill_tok_s > 0 and len(state.decode_rates) > 5
            assert "n/a" not in str(monitor.query_one("#decode", Static).render())
            assert sum(n for row in state.heat.values() for n in row.values()) > 0
            assert "L1" in str(app.query_one(Heatmap).render())
            assert str(monitor.query_one("#offload", Static).render()).count("n/a") == 3  # no offload counters
            # An offload engine adds counters to the same events; they show up as soon as they arrive.
            app.post_message(EngineEvent(Stats("decode", 2, 5, 100.0, 10.0, 0.5,
                                               {"cache_hits": {1: 3, 2: 3}, "cache_misses": 2,
                                                "prefetch_recall": 0.5, "bytes_copied": 2e9})))
            await pilot.pause(0.2)
            offload = str(monitor.query_one("#offload", Static).render())
            assert "75%" in offload and "50%" in offload and "GB/s" in offload
            assert "no GPU" in str(monitor.query_one("#machine", Static).render())
    run(body())


def test_save_then_load_restores_the_conversation(engine, tmp_path):
    path = tmp_path / "chat.json"

    async def body():
        app = make_app(engine, system="Be brief.")
        async with app.run_test(size=(100, 30)) as pilot:
            await exchange(pilot, "What is an expert?")
            saved = [dict(m) for m in app.conv.messages]
            await pilot.press("ctrl+s")
            assert isinstance(app.screen, PathScreen)
            app.screen.query_one("#path").value = str(path)
            await pilot.press("enter")
            await pilot.pause()
            data = json.loads(path.read_text())
            assert data["messages"] == saved and data["system"] == "Be brief."
            assert data["settings"]["temperature"] == 0

            await pilot.press("ctrl+n")
            await pilot.pause()
            assert app.conv.messages == [] and not app.query(UserMessage)
            app.config = GenerationConfig()  # loading must bring the saved settings back
            await pilot.press("ctrl+o")
            app.screen.query_one("#path").value = str(path)
            await pilot.press("enter")
            await pilot.pause(0.2)
            assert app.conv.messages == saved and app.conv.system == "Be brief."
            assert app.config.temperature == 0 and app.config.max_tokens == GREEDY.max_tokens
            assert str(app.query_one(UserMessage).render()) == "What is an expert?"
            assert answer_source(app.query_one(AssistantMessage)) == saved[1]["content"]
    run(body())


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_layout_fits_the_terminal(engine, size):
    async def body():
        app = make_app(engine)
        async with app.run_test(size=size) as pilot:
            await exchange(pilot, "Hi")
            screen = app.screen.region
            parts = {name: app.query_one(name).region for name in
                     ("Header", "#log", "#status", "#prompt", "Monitor", "Heatmap", "Footer")}
            for name, region in parts.items():
                assert region.area > 0 and screen.contains_region(region), name
            assert parts["#prompt"].height >= 3 and parts["Heatmap"].height >= 3
            assert parts["Monitor"].width >= 32
            chat = [parts[n] for n in ("#log", "#status", "#prompt")]
            for a in chat:
                assert not a.overlaps(parts["Monitor"])
            for a, b in zip(chat, chat[1:]):
                assert a.bottom <= b.y  # stacked, not overlapping
            assert parts["Footer"].y == size[1] - 1
            assert app.query(AssistantMessage).last().region.area > 0
    run(body())


def test_regenerate_replaces_the_last_answer(engine):
    async def body():
        app = make_app(engine)
        async with app.run_test(size=(100, 30)) as pilot:
            await exchange(pilot, "Hi")
            first = app.conv.messages[-1]["content"]
            await pilot.press("ctrl+r")
            await wait_until(pilot, lambda: app.turns == 2)
            assert len(app.conv.messages) == 2 and len(app.query(AssistantMessage)) == 1
            assert app.conv.messages[-1]["content"] == first  # greedy: the same answer again
    run(body())


def test_input_keys_history_and_newline(engine):
    async def body():
        app = make_app(engine, config=GREEDY.updated(max_tokens=2))
        async with app.run_test(size=(100, 30)) as pilot:
            prompt = app.query_one(PromptInput)
            await exchange(pilot, "first")
            await pilot.press("a", "ctrl+j", "b")
            assert prompt.text == "a\nb" and app.turns == 1  # Ctrl+J adds a line, it does not send
            prompt.clear()
            await pilot.press("up")
            assert prompt.text == "first"
            await pilot.press("down")
            assert prompt.text == ""
    run(body())


class Failing:
    """An engine that fails: an Error event, then an exception, as a broken offload tier might."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def chat(self, messages, config=None):
        yield Error("expert 7 of layer 3 could not be read")
        raise RuntimeError("device lost")


def test_engine_errors_are_shown_and_the_app_lives_on(engine):
    async def body():
        app = make_app(Failing(engine))
        async with app.run_test(size=(100, 30)) as pilot:
            await send(pilot, "Hi")
            await wait_until(pilot, lambda: app.turns == 1)
            messages = [n.message for n in app._notifications]
            assert any("expert 7" in m for m in messages) and any("device lost" in m for m in messages)
            # Nothing came back: the question goes back into the prompt box, and the history stays clean.
            assert app.conv.messages == [] and app.query_one(PromptInput).text == "Hi"
            assert app.is_running and not app.generating
    run(body())


def test_reasoning_goes_into_a_collapsible_block(r1_engine):
    async def body():
        app = make_app(r1_engine)
        async with app.run_test(size=(100, 30)) as pilot:
            await exchange(pilot, "Think first")
            block = app.query_one(AssistantMessage).query_one(Collapsible)
            assert block.title == "reasoning" and block.query_one(Markdown).source
            assert app.conv.messages[-1]["reasoning"]
    run(body())


def test_settings_and_model_screens(engine):
    async def body():
        app = make_app(engine)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("f3")
            screen = app.screen
            assert isinstance(screen, SettingsScreen)
            screen.query_one("#temperature").value = "hot"
            await pilot.click("#apply")
            assert "temperature must be a number" in str(screen.query_one("#error", Static).render())
            screen.query_one("#temperature").value = "0.5"
            screen.query_one("#top_p").value = "2"
            screen.query_one("#top_p").focus()
            await pilot.press("enter")  # Enter in a field applies too
            assert "top_p must be in (0, 1]" in str(screen.query_one("#error", Static).render())
            screen.query_one("#top_p").value = "0.9"
            screen.query_one("#seed").value = ""
            screen.query_one("#system").value = "You are terse."
            await pilot.pause(0.3)  # a button ignores clicks while it shows the last one
            await pilot.click("#apply")
            await pilot.pause()
            assert app.config.temperature == 0.5 and app.config.top_p == 0.9 and app.config.seed is None
            assert app.conv.system == "You are terse."

            await pilot.press("f2")
            assert isinstance(app.screen, ModelInfoScreen)
            shown = visible_text(app)
            assert engine.model_type in shown and "routed experts" in shown and "parameters" in shown
            await pilot.press("escape")
            assert not isinstance(app.screen, ModelInfoScreen)
    run(body())


class WithNotice:
    """The demo engine, with an engine notice ahead of its answer (as the offload engine's "cache shrunk")."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def chat(self, messages, config=None):
        from hybridmoe import Notice
        yield Notice("expert cache shrunk to 5 slots")
        yield from self._engine.chat(messages, config)


def test_engine_notices_show_as_notifications(engine):
    async def body():
        app = make_app(WithNotice(engine))
        async with app.run_test(size=(100, 30)) as pilot:
            await exchange(pilot, "Hi")
            assert any("expert cache shrunk" in n.message for n in app._notifications)
    run(body())


def test_footer_shows_how_to_quit_and_ctrl_c_stops_clears_then_quits(engine):
    async def body():
        app = make_app(Paced(engine, delay=0.05), config=GREEDY.updated(max_tokens=400))
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: "^q Quit" in visible_text(app), timeout=20)  # on the smallest terminal
            await send(pilot, "Tell me a long story")
            await wait_until(pilot, lambda: app.current is not None and len(answer_source(app.current)) > 3)
            await pilot.press("ctrl+c")  # while answering: stops the answer, as in the REPL
            await wait_until(pilot, lambda: app.turns == 1)
            assert app.done.reason == "cancelled" and app.is_running
            await pilot.press(*"draft")
            await pilot.press("ctrl+c")  # a typed prompt: cleared
            await pilot.pause(0.05)
            assert app.query_one(PromptInput).text == "" and app.is_running
            await pilot.press("ctrl+c")  # nothing typed, nothing running: quits
            await pilot.pause(0.2)
            assert not app.is_running
    run(body())
