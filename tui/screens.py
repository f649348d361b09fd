"""Modal screens: model and placement facts, sampling settings, and the file path for save/load."""
from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from hybridmoe import GenerationConfig
from hybridmoe.engine.conversation import parse_setting

from .info import model_facts, placement

class Dialog(ModalScreen):
    """A centred box over the chat. Subclasses share this look (DEFAULT_CSS is scoped to the defining class)."""

    DEFAULT_CSS = """
    Dialog { align: center middle; }
    Dialog > Vertical { width: 72; max-width: 100%; height: auto; max-height: 100%;
                        border: round $primary; background: $surface; padding: 0 1; }
    Dialog .title { text-style: bold; margin-bottom: 1; }
    Dialog .error { color: $error; height: auto; }
    Dialog .hint { color: $text-muted; }
    Dialog .buttons { height: auto; align-horizontal: right; margin-top: 1; }
    Dialog Button { margin-left: 1; }
    """


def facts_table(title: str, rows: list[tuple[str, str]]) -> Table:
    t = Table.grid(padding=(0, 2))
    t.title, t.title_justify, t.title_style = title, "left", "bold"
    t.add_column(style="dim", no_wrap=True)
    t.add_column(overflow="fold")
    for k, v in rows:
        t.add_row(k, v)
    return t


class ModelInfoScreen(Dialog):
    BINDINGS = [Binding("escape,q,f2", "dismiss", "Close")]

    def __init__(self, engine):
        super().__init__()
        self.engine = engine

    def compose(self) -> ComposeResult:
        with Vertical():
            with VerticalScroll():
                yield Static(facts_table("Model", model_facts(self.engine)))
                yield Static(facts_table("\nWhat lives where", placement(self.engine)))
            yield Label("Esc closes", classes="hint")

    def action_dismiss(self) -> None:
        self.dismiss(None)


class SettingsScreen(Dialog):
    """Edits sampling settings and the system prompt. Values are checked by GenerationConfig.updated().
    Dismissed with (config, system prompt), or None when cancelled."""

    DEFAULT_CSS = """
    SettingsScreen Grid { grid-size: 2; grid-columns: 16 1fr; height: auto; grid-gutter: 0 1; }
    SettingsScreen Input { background: $boost; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel")]
    FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens")

    def __init__(self, config: GenerationConfig, system: str | None):
        super().__init__()
        self.config, self.system = config, system

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Sampling settings (temperature 0 = greedy; empty seed = random)", classes="title")
            with Grid():
                for name in self.FIELDS:
                    value = getattr(self.config, name)
                    yield Label(name)
                    yield Input("" if value is None else str(value), id=name, compact=True)
                yield Label("system prompt")
                yield Input(self.system or "", id="system", compact=True)
            yield Static("", classes="error", id="error")
            with Horizontal(classes="buttons"):
                yield Button("Apply", variant="primary", id="apply", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def values(self) -> GenerationConfig:
        """The edited settings, validated; raises ValueError with a one-line message."""
        changes = {name: parse_setting(name, self.query_one(f"#{name}", Input).value.strip())
                   for name in self.FIELDS}
        return self.config.updated(**changes)

    def apply(self) -> None:
        try:
            config = self.values()
        except ValueError as e:
            self.query_one("#error", Static).update(str(e))
            return
        self.dismiss((config, self.query_one("#system", Input).value.strip() or None))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.apply()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.apply() if event.button.id == "apply" else self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class PathScreen(Dialog):
    """Asks for a file path; Enter accepts, Esc cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, path: str):
        super().__init__()
        self.title_text, self.path = title, path

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, classes="title")
            yield Input(self.path, id="path")
            yield Label("Enter accepts, Esc cancels", classes="hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)

