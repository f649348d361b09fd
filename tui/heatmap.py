"""Layer × expert activation heatmap. Big models have more experts (256) and layers (58) than the pane has
cells, so experts and layers are binned to fit; the legend says how many share a cell."""
from __future__ import annotations

import math

from rich.text import Text
from textual.widget import Widget

SHADES = "·░▒▓█"
COLORS = ("grey35", "dodger_blue2", "green3", "yellow3", "red1")


def bins(n: int, cells: int) -> list[range]:
    """Split range(n) into at most `cells` contiguous, nearly equal parts."""
    per = max(1, math.ceil(n / max(cells, 1)))
    return [range(i, min(i + per, n)) for i in range(0, n, per)]


def heat_grid(heat: dict[int, dict[int, int]], layers: list[int], n_experts: int, width: int, height: int
              ) -> tuple[list[str], list[list[int]], int, int]:
    """-> (row labels, cell sums [rows][cols], experts per column, layers per row) that fit width × height."""
    label_w = len(f"L{max(layers)}") + 1 if layers else 3
    row_bins = bins(len(layers), max(height, 1))
    col_bins = bins(n_experts, max(width - label_w, 1))
    grid, labels = [], []
    for rb in row_bins:
        ls = [layers[i] for i in rb]
        labels.append(f"L{ls[0]}".ljust(label_w))
        grid.append([sum(heat.get(layer, {}).get(e, 0) for layer in ls for e in cb) for cb in col_bins])
    return labels, grid, len(col_bins[0]) if col_bins else 1, len(row_bins[0]) if row_bins else 1


class Heatmap(Widget):
    DEFAULT_CSS = "Heatmap { height: 1fr; min-height: 3; }"

    def __init__(self, layers: list[int], n_experts: int, **kw):
        super().__init__(**kw)
        self.rows, self.n_experts = layers, n_experts
        self.heat: dict[int, dict[int, int]] = {}

    def show(self, heat: dict[int, dict[int, int]]) -> None:
        self.heat = heat
        if not self.rows and heat:  # the engine gave no layer list: show what the stats name
            self.rows = sorted(heat)
            self.n_experts = self.n_experts or 1 + max(e for row in heat.values() for e in row)
        self.refresh()

    def render(self) -> Text:
        w, h = self.size.width, self.size.height
        if not self.rows or not self.n_experts:
            return Text("no routed experts yet", style="dim")
        labels, grid, per_col, per_row = heat_grid(self.heat, self.rows, self.n_experts, w, h - 1)
        peak = max((v for row in grid for v in row), default=0)
        # Few experts (Mixtral's 8) get wider cells, so the map uses the pane instead of a corner of it.
        cell = max(1, min(3, (w - len(labels[0])) // max(len(grid[0]), 1))) if grid else 1
        out = Text(no_wrap=True, overflow="crop")
        for label, row in zip(labels, grid):
            out.append(label, style="dim")
            for v in row:
                # Square-root scale: prefill routes many tokens at once, decode one; both should stay visible.
                level = 0 if v == 0 else 1 + min(3, int(4 * math.sqrt(v / peak)))
                out.append(SHADES[level] * cell, style=COLORS[level])
            out.append("\n")
        legend = f"{self.n_experts} experts"
        if per_col > 1 or per_row > 1:
            legend += f"; cell = {per_col}e × {per_row}L"
        out.append(legend if peak else legend + ", none routed", style="dim")
        return out
