"""Save an SVG of the chat app after a short exchange, for the README:

    python scripts/screenshot.py docs/screenshot.svg [--prompt TEXT] [--size 120x36] [MODEL] [chat options]

Any option of `hybridmoe chat` passes through (e.g. --accelerator cpu --expert-cache-slots 24 to show the
offload counters). Greedy decoding with a fixed seed, so the same model gives the same text. A script, not part
of the chat UI: it takes the command line's options, and the UI imports only hybridmoe's public API."""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import hybridmoe
from hybridmoe.cli import build_parser, load_from_args

from hybridmoe_tui.app import ChatApp


async def exchange(app: ChatApp, prompts: list[str], size: tuple[int, int], out: Path,
                   timeout_s: float = 120.0) -> None:
    """Run the app headless, send the prompts one by one, wait for each answer, and save the screen as SVG."""
    async with app.run_test(size=size) as pilot:
        loop = asyncio.get_running_loop()
        for prompt in prompts:
            turns = app.turns
            app.query_one("#prompt").insert(prompt)
            await pilot.press("enter")
            deadline = loop.time() + timeout_s
            while app.turns == turns and loop.time() < deadline:
                await pilot.pause(0.05)
        await pilot.pause(0.3)
        app.redraw_stats()
        await pilot.pause()
        app.save_screenshot(filename=out.name, path=str(out.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/screenshot.py")
    ap.add_argument("out", help="SVG file to write")
    ap.add_argument("--prompt", action="append", help="a prompt to send (repeatable)")
    ap.add_argument("--size", default="120x36", help="terminal size, COLSxROWS")
    ap.add_argument("--max-tokens", type=int, default=80)
    a, chat_args = ap.parse_known_args(argv)
    cols, rows = (int(x) for x in a.size.lower().split("x"))
    engine = load_from_args(build_parser().parse_args(["chat", *chat_args]))
    config = hybridmoe.GenerationConfig(temperature=0, seed=0, max_tokens=a.max_tokens)
    out = Path(a.out).resolve()
    prompts = a.prompt or ["What does json.dumps do?"]
    asyncio.run(exchange(ChatApp(engine, config=config), prompts, (cols, rows), out))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
