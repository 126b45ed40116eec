"""Size and grid of a figure: it fits the report's width, so a browser shows it unscaled and its text legible.

A report page is ``REPORT_WIDTH_PX`` wide in a 1280-px window; a figure at most ``FIGURE_WIDTH_PX``
wide is shown at its own size there (also inside a sub-study's indented block), so a 9-point label
at 120 dpi stays 15 px on screen. Facets wrap onto more rows rather than shrink below
``MIN_PANEL_IN``; the legend takes its measured size beside or below the panels, never theirs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .figure_legend import Entries, bottom_columns, legend_size

__all__ = ["REPORT_WIDTH_PX", "FIGURE_WIDTH_PX", "MIN_PANEL_IN", "FONT_SCALE", "COLORBAR_IN", "Layout", "plan"]

REPORT_WIDTH_PX = 1140  # render.py's page: 1180-px column less 2 x 20 px padding
FIGURE_WIDTH_PX = 1100  # leaves room for a sub-study's 18-px indent
MIN_PANEL_IN = 2.6  # narrower panels crowd their tick labels
FONT_SCALE = 0.9  # seaborn "notebook" context x 0.9: tick labels 9.9 pt
COLORBAR_IN = 0.8  # a colour bar with its label
_TITLE_IN = 0.4
_PAD_IN = 0.15


@dataclass(frozen=True)
class Layout:
    """Where a figure's parts go: ``ncols`` x ``nrows`` panels, figure size in inches, legend place."""

    ncols: int
    nrows: int
    width: float
    height: float
    legend: str | None  # "right", "below" or None
    legend_ncol: int = 1


def plan(n_panels: int, want_cols: int, fixed_cols: bool, panel_w: float, panel_h: float, dpi: float,
         entries: Entries | None, colorbar: bool = False, title: bool = False) -> Layout:
    """Lay out ``n_panels`` panels of natural size ``panel_w`` x ``panel_h`` inches and the legend.

    Args:
        n_panels: panels to draw.
        want_cols: panels per row asked for (``col_wrap``, or the number of columns of a row x col grid).
        fixed_cols: a row x col grid, whose columns cannot wrap.
        panel_w: natural panel width, inches.
        panel_h: panel height, inches.
        dpi: dots per inch of the saved PNG.
        entries: the legend, or None.
        colorbar: a colour bar stands right of the panels.
        title: the figure has a title.

    Returns:
        The layout: the legend goes right when the panels keep their natural width beside it, and
        below otherwise; the figure is at most ``FIGURE_WIDTH_PX`` wide.
    """
    limit = FIGURE_WIDTH_PX / dpi
    side = COLORBAR_IN if colorbar else 0.0

    def fit(avail: float) -> tuple[int, float]:
        ncols = want_cols if fixed_cols else max(1, min(want_cols, n_panels, int(avail // MIN_PANEL_IN)))
        return ncols, min(panel_w, avail / ncols)

    where, legend_w, legend_h, legend_ncol = None, 0.0, 0.0, 1
    ncols, width = fit(limit - side - _PAD_IN)
    if entries is not None:
        legend_w, legend_h = legend_size(entries, dpi)
        right_cols, right_w = fit(limit - side - legend_w - 2 * _PAD_IN)
        if right_cols == ncols and right_w >= width - 1e-9:
            where = "right"
        else:
            where = "below"
            legend_ncol = bottom_columns(entries, dpi, limit - _PAD_IN)
            legend_w, legend_h = legend_size(entries, dpi, legend_ncol)
    nrows = math.ceil(n_panels / ncols)
    fig_w = ncols * width + side + _PAD_IN + (legend_w + _PAD_IN if where == "right" else 0.0)
    fig_h = nrows * panel_h + (_TITLE_IN if title else 0.0) + (legend_h + _PAD_IN if where == "below" else 0.0)
    return Layout(ncols, nrows, min(fig_w, limit), fig_h + _PAD_IN, where, legend_ncol)
