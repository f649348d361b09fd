"""The monitor pane: speed, machine, offload counters and the expert heatmap."""
from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Sparkline, Static

from .heatmap import Heatmap
from .probe import Reading
from .stats import MonitorState

GiB = 2 ** 30


def rate(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.1f}"


def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def decode_text(s: MonitorState) -> Text:
    t = Text("decode  ", style="dim", no_wrap=True, overflow="ellipsis")
    return t.append(rate(s.decode_tok_s), style="bold").append(" tok/s" if s.decode_tok_s is not None else "",
                                                                  style="dim")


def prefill_text(s: MonitorState) -> Text:
    t = Text("prefill ", style="dim", no_wrap=True, overflow="ellipsis")
    t.append(rate(s.prefill_tok_s), style="bold")
    return t.append(f" tok/s ({s.prompt_tokens} tok)" if s.prefill_tok_s is not None else "", style="dim")


def machine_text(r: Reading | None) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    if r is None:
        return t.append("reading…", style="dim")
    t.append("RAM ", style="dim").append(f"{r.ram_used / GiB:.1f}/{r.ram_total / GiB:.0f} GiB")
    t.append("  CPU ", style="dim").append(f"{r.cpu_percent:.0f}%")
    if not r.gpus:
        return t.append(f"\n{r.gpu_note}", style="dim")
    for g in r.gpus:
        t.append(f"\nGPU{g.index} ", style="dim").append(f"{g.mem_used / GiB:.1f}/{g.mem_total / GiB:.0f} GiB")
        t.append("  util ", style="dim").append(f"{g.util}%")
    return t


def offload_text(s: MonitorState) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append("cache hit ", style="dim").append(percent(s.hit_rate))
    t.append("  recall ", style="dim").append(percent(s.recall))
    h2d = s.h2d_gb_s
    t.append("\nH2D ", style="dim").append("n/a" if h2d is None else f"{h2d:.2f} GB/s")
    if s.disk_gb_s is not None:  # a model larger than RAM: its experts are read from disk
        t.append("\ndisk ", style="dim").append(f"{s.disk_gb_s:.2f} GB/s")
        t.append("  experts in RAM ", style="dim").append(percent(s.memory_share))
    return t


class Monitor(Vertical):
    DEFAULT_CSS = """
    Monitor { width: 1fr; min-width: 32; max-width: 64; padding: 0 1;
              border: round $primary 50%; border-title-color: $text-muted; }
    Monitor > .head { color: $text-muted; text-style: bold; }
    Monitor > Static { height: auto; text-wrap: nowrap; text-overflow: ellipsis; }
    Monitor > Sparkline { height: 2; }
    #prefill { margin-bottom: 1; }
    """

    def __init__(self, layers: list[int], n_experts: int, **kw):
        super().__init__(**kw)
        self.state = MonitorState()
        self.border_title = "monitor"
        self._layers, self._n_experts = layers, n_experts

    def compose(self) -> ComposeResult:
        # Kept as attributes, not queried: timers may still fire while the app is shutting down.
        self.decode = Static(decode_text(self.state), id="decode")
        self.spark = Sparkline([], id="decode-spark")
        self.prefill = Static(prefill_text(self.state), id="prefill")
        self.machine = Static(machine_text(None), id="machine")
        self.offload = Static(offload_text(self.state), id="offload")
        self.heatmap = Heatmap(self._layers, self._n_experts, id="heatmap")
        yield from (self.decode, self.spark, self.prefill, self.machine, self.offload)
        yield Static("experts (layer × expert)", classes="head")
        yield self.heatmap

    def show_stats(self) -> None:
        """Redraw what depends on Stats events (the app has pushed them into self.state)."""
        self.decode.update(decode_text(self.state))
        self.spark.data = list(self.state.decode_rates)
        self.prefill.update(prefill_text(self.state))
        self.offload.update(offload_text(self.state))
        self.heatmap.show(self.state.heat)

    def show_reading(self, reading: Reading) -> None:
        self.machine.update(machine_text(reading))
