"""Pilot helpers shared by the app tests."""
import asyncio
import html
import re
import time
from pathlib import Path
from types import SimpleNamespace

from hybridmoe import Done, Stats, Text
from hybridmoe_tui.chat import PromptInput
from hybridmoe_tui.probe import GpuReading, Reading

GIB = 2 ** 30


async def wait_until(pilot, condition, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.02)


def visible_text(app) -> str:
    """The characters on the screen (from the SVG screenshot), for asserting on what a user would read."""
    body = re.sub(r"<style.*?</style>", "", app.export_screenshot(), flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", "", body)).replace("\xa0", " ")


async def send(pilot, text: str) -> None:
    """Type a prompt and press Enter, as a user would."""
    pilot.app.query_one(PromptInput).focus()
    await pilot.press(*text)
    await pilot.press("enter")


async def exchange(pilot, text: str) -> None:
    """Send a prompt and wait until its answer is complete and drawn."""
    turns = pilot.app.turns
    await send(pilot, text)
    await wait_until(pilot, lambda: pilot.app.turns > turns)
    await pilot.pause(0.15)  # the stats redraw runs on a 0.1 s timer


class FixedProbe:
    """Machine readings that never change, so screens can be compared."""

    def __init__(self, gpus: tuple[GpuReading, ...] = ()):
        self.gpus = gpus

    def read(self) -> Reading:
        return Reading(12 * GIB, 64 * GIB, 25.0, self.gpus)


class Paced:
    """A real engine whose text arrives at most every `delay` seconds, so a test can see an answer mid-stream
    and stop it there, however fast the model is."""

    def __init__(self, engine, delay: float = 0.01):
        self._engine, self.delay = engine, delay

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def chat(self, messages, config=None, **overrides):
        for event in self._engine.chat(messages, config, **overrides):
            if isinstance(event, Text):
                time.sleep(self.delay)
            yield event


class Scripted:
    """A stand-in engine that replays a fixed exchange, offload counters included, with fixed speeds: screens
    of it are the same on every machine, which a real model's timings and float rounding cannot promise."""

    path = Path("demo_model")
    device, dtype, model_type, max_context = "cpu", "float32", "deepseek_v3", 4096
    args = SimpleNamespace(n_layers=6, n_routed_experts=16, n_shared_experts=1, dim=256, vocab_size=4096,
                           expert_shape=(128, 256), router=SimpleNamespace(top_k=2))
    model = SimpleNamespace(moe_layers=lambda: [1, 2, 3, 4, 5], parameters=lambda: [])
    REASONING = "The user asks about json.dumps. Explain it and show a call."
    ANSWER = ("`json.dumps` serialises a Python object to a JSON **string**:\n\n"
              "```python\njson.dumps({\"a\": 1})  # '{\"a\": 1}'\n```\n\n"
              "- `indent=2` pretty-prints\n- `sort_keys=True` sorts the keys\n")

    def chat(self, messages, config=None):
        prompt = 12 + 4 * len(messages)
        yield Stats("prefill", 0, prompt, 850.0, 0.0, 0.02, {"expert_tokens": self.routing(0, prompt)})
        pieces = [(w, "reasoning") for w in re.findall(r"\S+\s*", self.REASONING)]
        pieces += [(w, "answer") for w in re.findall(r"\S*\s*", self.ANSWER) if w]
        for step, (text, channel) in enumerate(pieces, 1):
            yield Text(text, channel)
            extra = {"expert_tokens": self.routing(step, 1), "cache_hits": {1: 2, 2: 1, 3: 2, 4: 2, 5: 1},
                     "cache_misses": {3: 1, 5: 1}, "prefetch_recall": 0.8, "bytes_copied": 6_000_000}
            yield Stats("decode", step, prompt, 850.0, 20.0 + step % 5, 0.02 + step / 20, extra)
        text = self.REASONING + self.ANSWER
        yield Done("eos", prompt, len(pieces), text, tuple(range(len(pieces))))

    @staticmethod
    def routing(step: int, tokens: int) -> dict:
        return {layer: {(3 * step + 5 * layer) % 16: tokens, (7 * step + layer) % 16: tokens} for layer in range(1, 6)}

    def stop(self):
        pass
