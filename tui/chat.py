"""Chat widgets: the prompt box, and user and assistant messages (the latter streamed as Markdown)."""
from __future__ import annotations

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Collapsible, Markdown, Static, TextArea
from textual.widgets.markdown import MarkdownStream

# C0/C1 control characters other than tab and newline: a model can emit them, and a terminal must never get them.
CONTROL = dict.fromkeys([*range(0x00, 0x09), *range(0x0b, 0x20), 0x7f, *range(0x80, 0xa0)], None)


def printable(text: str) -> str:
    return text.translate(CONTROL)


class PromptInput(TextArea):
    """Multi-line prompt. Enter sends; Ctrl+J (every terminal) or Shift+Enter (terminals that report it) adds a
    line. Up on the first line and Down on the last one walk through earlier prompts."""

    DEFAULT_CSS = "PromptInput { height: auto; min-height: 3; max-height: 8; }"
    # For the footer (Enter needs no explanation); the keys are handled in _on_key, before TextArea inserts "\n".
    BINDINGS = [Binding("enter", "submit", "Send", show=False),
                Binding("ctrl+j", "newline", "Newline", key_display="^j")]

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, **kw):
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kw)
        self.prompts: list[str] = []
        self._index = 0  # position in self.prompts; len(self.prompts) is the draft being written
        self._draft = ""

    async def _on_key(self, event: events.Key) -> None:
        if event.key in ("enter", "ctrl+j", "shift+enter"):
            event.stop()
            event.prevent_default()
            self.action_submit() if event.key == "enter" else self.action_newline()

    def action_submit(self) -> None:
        text = self.text.strip()
        if not text:
            return
        if not self.prompts or self.prompts[-1] != text:
            self.prompts.append(text)
        self._index, self._draft = len(self.prompts), ""
        self.post_message(self.Submitted(text))

    def action_newline(self) -> None:
        self.replace("\n", *self.selection)

    def _recall(self, index: int) -> None:
        if self._index == len(self.prompts):
            self._draft = self.text
        self._index = index
        self.load_text(self.prompts[index] if index < len(self.prompts) else self._draft)
        self.move_cursor(self.document.end)

    def action_cursor_up(self, select: bool = False) -> None:
        if not select and self.cursor_location[0] == 0 and self._index > 0:
            self._recall(self._index - 1)
        else:
            super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        last_row = self.cursor_location[0] == self.document.line_count - 1
        if not select and last_row and self._index < len(self.prompts):
            self._recall(self._index + 1)
        else:
            super().action_cursor_down(select)


class UserMessage(Static):
    DEFAULT_CSS = """
    UserMessage { background: $boost; border-left: outer $accent; padding: 0 1; margin: 1 0 0 0; }
    """

    def __init__(self, text: str):
        super().__init__(Text(printable(text)))  # rich Text: what the user typed is never read as markup


class AssistantMessage(Vertical):
    """An answer. While it streams, reasoning shows in an open block that folds once the answer starts."""

    DEFAULT_CSS = """
    AssistantMessage { height: auto; border-left: outer $primary; padding: 0 0 0 1; margin: 1 0 0 0; }
    AssistantMessage Collapsible { padding: 0; border-top: none; background: transparent; }
    AssistantMessage Collapsible Markdown { color: $text-muted; }
    AssistantMessage Markdown { margin: 0; padding: 0; background: transparent; }
    AssistantMessage MarkdownBlock { margin: 0 0 1 0; }
    AssistantMessage > .note { color: $text-muted; }
    """

    def __init__(self, answer: str = "", reasoning: str = "", note: str = ""):
        super().__init__()
        self._answer_text, self._reasoning_text, self._note = printable(answer), printable(reasoning), note
        self._streams: dict[str, MarkdownStream] = {}
        self.reasoning: Collapsible | None = None

    def compose(self) -> ComposeResult:
        if self._reasoning_text:
            self.reasoning = Collapsible(Markdown(self._reasoning_text), title="reasoning", collapsed=True)
            yield self.reasoning
        yield Markdown(self._answer_text, classes="answer")
        if self._note:
            yield Static(self._note, classes="note")

    async def add(self, text: str, channel: str) -> None:
        """Append streamed text. Text events arrive in order through the app's message queue."""
        text = printable(text)
        if channel == "reasoning":
            if self.reasoning is None:
                self.reasoning = Collapsible(Markdown(), title="reasoning", collapsed=False)
                await self.mount(self.reasoning, before=self.query_one(".answer"))
            target = self.reasoning.query_one(Markdown)
        else:
            if self.reasoning is not None and "answer" not in self._streams:
                self.reasoning.collapsed = True  # the answer has started: reasoning steps aside
            target = self.query_one(".answer", Markdown)
        if channel not in self._streams:
            self._streams[channel] = Markdown.get_stream(target)
        await self._streams[channel].write(text)

    async def finish(self, note: str) -> None:
        """The answer is complete (or stopped): flush the streams and add a line of facts about it."""
        for stream in self._streams.values():
            await stream.stop()
        self._streams.clear()
        if note:
            await self.mount(Static(note, classes="note"))
