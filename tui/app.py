"""The chat app: conversation on the left, monitor on the right. `hybridmoe chat [MODEL]` runs main(args).

Generation runs in a worker thread and reaches the UI only as posted messages, so a slow model never freezes the
screen and a failing one never takes the app down."""
from __future__ import annotations

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Footer, Header, Static

from hybridmoe import Conversation, Done, Error, GenerationConfig, Notice, Stats, Text
from hybridmoe.engine.conversation import settings_of

from .chat import AssistantMessage, PromptInput, UserMessage
from .info import moe_layers, n_experts
from .monitor import Monitor, rate
from .probe import SystemProbe
from .screens import ModelInfoScreen, PathScreen, SettingsScreen

# Actions that act on the conversation; they wait while a dialog is open or an answer is streaming.
CONVERSATION_ACTIONS = {"regenerate", "save", "load", "new_chat", "settings"}


class EngineEvent(Message):
    """One event of the engine's stream, carried from the worker thread to the UI."""

    def __init__(self, event):
        super().__init__()
        self.event = event


class GenerationEnded(Message):
    """The worker is done, whatever happened (Done, an Error event, or an exception)."""


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class ChatApp(App):
    TITLE = "hybridmoe"
    CSS = """
    #body { height: 1fr; }
    #chat { width: 2fr; min-width: 40; }
    #log { height: 1fr; padding: 0 1; scrollbar-size-vertical: 1; }
    #status { height: 1; padding: 0 1; color: $text-muted; }
    """
    BINDINGS = [
        Binding("escape", "stop", "Stop", key_display="esc"),
        Binding("ctrl+r", "regenerate", "Regen"),
        Binding("ctrl+s", "save", "Save"),
        Binding("ctrl+o", "load", "Load"),
        Binding("ctrl+n", "new_chat", "New"),
        Binding("f2", "model_info", "Model"),
        Binding("f3", "settings", "Settings"),
        Binding("f4", "toggle_monitor", "Monitor"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
        # Not shown: Ctrl+C copies a selection in the prompt box, else stops an answer, clears the prompt, or quits.
        Binding("ctrl+c", "interrupt", show=False, system=True),
    ]

    def __init__(self, engine, *, system: str | None = None, config: GenerationConfig | None = None,
                 probe=None, probe_interval: float = 1.0, save_path: str = "chat.json"):
        super().__init__()
        self.engine = engine
        self.conv = Conversation(system=system)
        self.config = config or GenerationConfig()
        self.probe = probe if probe is not None else SystemProbe()
        self.probe_interval, self.save_path = probe_interval, save_path
        self.sub_title = str(getattr(engine.path, "name", engine.path))
        self.generating = False
        self.current: AssistantMessage | None = None
        self.parts: dict[str, list[str]] = {}
        self.done: Done | None = None
        self.turns = 0  # answers finished, whatever their ending; lets callers wait for one
        self._stats_dirty = False

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="body"):
            with Vertical(id="chat"):
                yield VerticalScroll(id="log")
                yield Static("ready", id="status")
                yield PromptInput(id="prompt", placeholder="Message  (Enter sends, Ctrl+J new line, ↑ history)")
            self.monitor = Monitor(moe_layers(self.engine), n_experts(self.engine), id="monitor")
            yield self.monitor
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.query_one("#log").anchor()  # follow new text while the user is at the bottom, not after they scroll up
        self.read_machine()
        self.set_interval(self.probe_interval, self.read_machine)
        self.set_interval(0.1, self.redraw_stats)  # stats come every token; redrawing 10 times a second is enough
        self.query_one(PromptInput).focus()

    @property
    def live(self) -> bool:
        """False once the app is shutting down; timers and the worker's last messages may still arrive then."""
        return self.monitor.is_attached

    def read_machine(self) -> None:
        if self.live:
            self.monitor.show_reading(self.probe.read())

    def redraw_stats(self) -> None:
        if self._stats_dirty and self.live:
            self._stats_dirty = False
            self.monitor.show_stats()

    def set_status(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action in CONVERSATION_ACTIONS or action in ("model_info", "toggle_monitor"):
            if isinstance(self.screen, ModalScreen):
                return False
        # The footer has room for what can be done now: Stop while answering, the conversation keys otherwise.
        if action in CONVERSATION_ACTIONS:
            return not self.generating
        if action == "stop":
            return self.generating
        return True

    # --- a turn ---
    async def on_prompt_input_submitted(self, message: PromptInput.Submitted) -> None:
        if self.generating:
            self.notify("still answering; Esc stops it", severity="warning")
            return
        self.query_one(PromptInput).clear()
        self.conv.messages.append({"role": "user", "content": message.text})
        await self.query_one("#log").mount(UserMessage(message.text))
        await self.start_turn()

    async def start_turn(self) -> None:
        self.current = AssistantMessage()
        await self.query_one("#log").mount(self.current)
        self.parts, self.done = {"reasoning": [], "answer": []}, None
        self.generating = True
        self.refresh_bindings()
        self.set_status("answering…  Esc stops")
        self.generate(self.conv.for_engine(), self.config)

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def generate(self, messages: list[dict], config: GenerationConfig) -> None:
        try:
            for event in self.engine.chat(messages, config):
                self.post_message(EngineEvent(event))
        except Exception as e:  # reported like an Error event; the app outlives any engine failure
            self.post_message(EngineEvent(Error(one_line(e))))
        finally:
            self.post_message(GenerationEnded())

    async def on_engine_event(self, message: EngineEvent) -> None:
        ev = message.event
        if not self.live:
            return
        if isinstance(ev, Text) and ev.text and self.current is not None:
            self.parts.setdefault(ev.channel, []).append(ev.text)
            await self.current.add(ev.text, ev.channel)
        elif isinstance(ev, Stats):
            self.monitor.state.push(ev)
            self._stats_dirty = True
        elif isinstance(ev, Notice):  # e.g. the offload engine shrank its cache to fit
            self.notify(ev.message, severity="warning", timeout=8)
        elif isinstance(ev, Error):
            self.notify(ev.message, title="engine error", severity="error", timeout=8)
        elif isinstance(ev, Done):
            self.done = ev

    async def on_generation_ended(self, message: GenerationEnded) -> None:
        if not self.live:
            return
        answer, reasoning = "".join(self.parts.get("answer", [])), "".join(self.parts.get("reasoning", []))
        d = self.done
        note = ""
        if d is not None:
            speed = self.monitor.state.decode_tok_s
            note = f"{d.completion_tokens} tokens · {d.reason} · {rate(speed)} tok/s"
        self.redraw_stats()
        if self.current is not None:
            await self.current.finish(note)
        if answer or reasoning:
            msg = {"role": "assistant", "content": answer}
            self.conv.messages.append(msg | {"reasoning": reasoning} if reasoning else msg)
        elif self.conv.messages and self.conv.messages[-1]["role"] == "user":
            # Nothing came back: take the question out again and hand it back to the prompt box to retry or edit.
            text = self.conv.messages.pop()["content"]
            await self.query(UserMessage).last().remove()
            if self.current is not None:
                await self.current.remove()
            prompt = self.query_one(PromptInput)
            if not prompt.text:
                prompt.load_text(text)
        self.current, self.generating = None, False
        self.turns += 1
        self.refresh_bindings()
        self.set_status(f"ready · {len(self.conv.messages)} messages" + (f" · last: {d.reason}" if d else ""))

    def action_stop(self) -> None:
        if self.generating:
            self.engine.stop()
            self.set_status("stopping…")

    async def action_interrupt(self) -> None:
        """Ctrl+C as in a terminal: stop the answer; else clear what is typed; else quit."""
        prompt = self.query_one(PromptInput)
        if self.generating:
            self.action_stop()
        elif prompt.text and not isinstance(self.screen, ModalScreen):
            prompt.clear()
        else:
            await self.action_quit()

    async def action_regenerate(self) -> None:
        if self.conv.messages and self.conv.messages[-1]["role"] == "assistant":
            self.conv.messages.pop()
            await self.query(AssistantMessage).last().remove()
        if not self.conv.messages:
            self.notify("nothing to regenerate yet", severity="warning")
            return
        await self.start_turn()

    # --- conversations ---
    async def action_new_chat(self) -> None:
        self.conv.messages.clear()
        await self.query_one("#log").remove_children()
        self.monitor.state.reset_heat()
        self.monitor.show_stats()
        self.set_status("new conversation")

    def action_save(self) -> None:
        self.push_screen(PathScreen("Save conversation to", self.save_path), self.save_to)

    def save_to(self, path: str | None) -> None:
        if not path:
            return
        self.conv.settings = settings_of(self.config)
        try:
            self.conv.save(path)
        except OSError as e:
            self.notify(f"could not save {path}: {e.strerror or e}", severity="error")
            return
        self.save_path = path
        self.notify(f"saved {len(self.conv.messages)} messages to {path}")

    def action_load(self) -> None:
        self.push_screen(PathScreen("Load conversation from", self.save_path), self.load_from)

    async def load_from(self, path: str | None) -> None:
        if not path:
            return
        try:
            conv = Conversation.load(path)
            config = self.config.updated(**conv.settings)
        except (OSError, ValueError) as e:
            self.notify(f"could not load {path}: {getattr(e, 'strerror', None) or e}", severity="error")
            return
        self.conv, self.config, self.save_path = conv, config, path
        log = self.query_one("#log")
        await log.remove_children()
        await log.mount_all([UserMessage(m["content"]) if m["role"] == "user"
                             else AssistantMessage(m["content"], m.get("reasoning", "")) for m in conv.messages])
        log.scroll_end(animate=False)
        self.set_status(f"loaded {len(conv.messages)} messages from {path}")

    # --- other screens ---
    def action_model_info(self) -> None:
        self.push_screen(ModelInfoScreen(self.engine))

    def action_settings(self) -> None:
        self.push_screen(SettingsScreen(self.config, self.conv.system), self.apply_settings)

    def apply_settings(self, result) -> None:
        if result is not None:
            self.config, self.conv.system = result
            self.notify("settings applied")

    def action_toggle_monitor(self) -> None:
        self.monitor.display = not self.monitor.display

    async def action_quit(self) -> None:
        self.engine.stop()  # a running answer ends after its current step, so the worker thread can finish
        self.exit()

    def on_unmount(self) -> None:
        self.engine.stop()
        close = getattr(self.probe, "close", None)
        if close:
            close()


def run_chat(engine, system: str | None = None) -> int:
    """`hybridmoe chat` on a loaded engine: run the app until the user quits."""
    app = ChatApp(engine, system=system)
    app.run()
    return app.return_code or 0
