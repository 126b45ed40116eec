"""The one legend of a figure: its entries, its measured size, and its place outside the panels.

The legend goes to the right of the panels when that costs them no width, otherwise below them in
as many columns as the figure's width holds; either way the figure grows by the legend's measured
size, so a long label never squeezes the data. A numeric hue with many levels (blocks of a deep
net) is shown as a colour bar instead of one entry per level.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from . import figure_kinds as fk

__all__ = ["LEGEND_FONTSIZE", "COLORBAR_LEVELS", "Entries", "legend_entries", "legend_size", "bottom_columns",
           "place_legend", "hue_colorbar"]

LEGEND_FONTSIZE = 10
COLORBAR_LEVELS = 12  # a numeric hue with more levels than this gets a colour bar, not a list
_COLUMN_GAP = 2.0  # matplotlib's default columnspacing, in font sizes


@dataclass
class Entries:
    """Legend handles and labels; ``headers`` index the bold section titles."""

    handles: list = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    headers: list[int] = field(default_factory=list)
    title: str | None = None

    def header(self, text: str) -> None:
        self.headers.append(len(self.labels))
        self.handles.append(Line2D([], [], linestyle="none"))
        self.labels.append(text)


def hue_as_colorbar(spec: dict[str, Any], m: fk.Mapping) -> bool:
    """Whether the hue is shown by a colour bar: ordered numbers with more than ``COLORBAR_LEVELS`` levels."""
    return bool(spec.get("hue")) and m.hue_numeric and len(m.hue_levels) > COLORBAR_LEVELS


def legend_entries(kind: str, spec: dict[str, Any], m: fk.Mapping, has_flag: bool) -> Entries | None:
    """The legend of a figure: hue, style, flag and spread entries (None when there is nothing to explain)."""
    e = Entries()
    hue_listed = bool(spec.get("hue")) and not hue_as_colorbar(spec, m)
    sections = hue_listed + bool(spec.get("style")) > 1
    if hue_listed:
        if sections:
            e.header(spec.get("legend_title") or spec["hue"])
        for lv in m.hue_levels:
            colour = m.palette[lv]
            e.handles.append(Patch(color=colour) if kind == "bar" else
                             Line2D([], [], color=colour, marker="o" if kind == "scatter" else None,
                                    linestyle="none" if kind == "scatter" else "-", linewidth=2))
            e.labels.append(fk.tick_label(lv))
    if spec.get("style"):
        if sections:
            e.header(spec["style"])
        for lv in m.style_levels:
            e.handles.append(Line2D([], [], color="0.25", dashes=m.dashes[lv] or (None, None), linewidth=1.8,
                                    marker=m.markers[lv] if kind == "scatter" else None,
                                    linestyle="none" if kind == "scatter" else "-"))
            e.labels.append(fk.tick_label(lv))
    if spec.get("flag") and has_flag:
        e.handles.append(Patch(facecolor="white", edgecolor="black", hatch="//") if kind == "bar" else
                         Line2D([], [], marker="o", markersize=9, markerfacecolor="none", markeredgecolor="black",
                                linestyle="none"))
        e.labels.append(spec.get("flag_label") or spec["flag"])
    if m.spread:
        e.handles.append(Patch(facecolor="0.6", alpha=0.35) if kind in ("line", "layer_profile") else
                         Line2D([], [], color="0.15", marker="|", markersize=10, linestyle="none"))
        e.labels.append(m.spread)
    if not e.handles:
        return None
    if not sections:
        e.title = spec.get("legend_title") or (spec.get("hue") if hue_listed else None) or spec.get("style")
    return e


def place_legend(fig: Figure, e: Entries, where: str = "right", ncol: int = 1):
    """Add the legend outside the panels (``where``: ``"right"`` or ``"below"``) and return it."""
    loc = "outside right center" if where == "right" else "outside lower center"
    leg = fig.legend(e.handles, e.labels, loc=loc, ncols=ncol, title=e.title, frameon=False,
                     fontsize=LEGEND_FONTSIZE, title_fontsize=LEGEND_FONTSIZE + 0.5)
    for i, text in enumerate(leg.get_texts()):
        if i in e.headers:
            text.set_fontweight("bold")
    return leg


def legend_size(e: Entries, dpi: float, ncol: int = 1) -> tuple[float, float]:
    """Width and height (inches) the legend takes, measured on a scratch figure with the same fonts."""
    scratch = Figure(dpi=dpi)
    FigureCanvasAgg(scratch)
    box = place_legend(scratch, e, ncol=ncol).get_window_extent(scratch.canvas.get_renderer())
    return box.width / dpi, box.height / dpi


def bottom_columns(e: Entries, dpi: float, width: float) -> int:
    """The most legend columns that fit in ``width`` inches below the panels."""
    one, _ = legend_size(e, dpi, 1)
    gap = _COLUMN_GAP * LEGEND_FONTSIZE / 72
    ncol = max(1, min(len(e.labels), int((width + gap) // (one + gap))))
    while ncol > 1 and legend_size(e, dpi, ncol)[0] > width:
        ncol -= 1
    return ncol


def hue_colorbar(fig: Figure, axes: list, spec: dict[str, Any], m: fk.Mapping) -> None:
    """A colour bar for a numeric hue with many levels, one colour band per level."""
    levels = list(m.hue_levels)
    cmap = ListedColormap([m.palette[lv] for lv in levels])
    bounds = [levels[0] - 0.5] + [(a + b) / 2 for a, b in zip(levels, levels[1:])] + [levels[-1] + 0.5]
    length = min(0.9, 3.2 / fig.get_size_inches()[1])  # about 3 inches long whatever the figure's height
    bar = fig.colorbar(ScalarMappable(norm=BoundaryNorm(bounds, cmap.N), cmap=cmap), ax=axes,
                       label=spec.get("legend_title") or spec["hue"], shrink=length, aspect=20, pad=0.02)
    bar.minorticks_off()
    bar.ax.tick_params(labelsize=LEGEND_FONTSIZE)
    if m.hue_integer:
        bar.ax.yaxis.set_major_locator(fk.integer_locator())
