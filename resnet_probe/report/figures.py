"""Declarative figures: a figure is a kind plus a JSON spec, drawn only from a saved tidy table.

Kinds (``FIGURE_KINDS``) and their spec keys (``y`` defaults to ``"value"``):

- ``line``: ``x, y, hue, style, col, row`` facets, ``lo``/``hi`` band columns, ``errorbar``
  (``"ci95"`` | ``"sd"`` | ``None``: spread of repeated rows such as seeds), ``dashes`` (style level ->
  ``""`` solid or a dash sequence, e.g. ``{"train": [4, 2], "test": ""}`` for He et al. Fig. 1/6),
  ``markers``, ``flag`` (boolean column whose rows get an open black ring, e.g. downsampling blocks).
- ``bar``: ``x, y, hue, col, row, lo, hi, errorbar, flag`` (flagged bars are hatched), ``order``.
- ``scatter``: ``x, y, hue, style, col, row, lo, hi, flag, identity`` (draw y = x).
- ``heatmap``: ``x`` (columns), ``y`` (rows), ``value``, ``col``, ``cmap, annot, fmt, center, vmin, vmax,
  colorbar_label, y_order``.
- ``layer_profile``: ``x`` (layer), ``y``, ``hue`` (model), ``flag``: the values in the network's
  order and sorted by magnitude side by side (He et al. 2016, Fig. 7).
- ``contour``: ``x``, ``y`` (numeric grid coordinates), ``value``, ``col``, ``row``, ``levels`` (a number or
  a list), ``logz``, ``cmap, vmin, vmax, colorbar_label``, ``marker`` ([x, y], a black cross): filled
  contours with level lines, the same levels in every panel, one colour bar (Li et al. 2018's surfaces).

Keys shared by all kinds: ``query`` (a ``DataFrame.query`` string selecting rows), ``title, xlabel,
ylabel, legend_title, logx, logy, hue_order, style_order, col_order, row_order, x_order, palette,
flag_label, width, height`` (natural inches per panel), ``dpi``, ``sharey``, ``col_wrap`` (most panels
per row, default 4).

The same in every figure, whatever the spec says:

- colours (``family_colours``): a model family (plain, highway, residual, preact) has one colour,
  read from the hue levels (``residual-56``, ``resnet18 (random init)``, ``plain``) or a ``family``
  column; depths of one family are its shades, darker = deeper; a numeric hue (depth, block) inside a
  panel of one family is drawn in that family's shades; bars without a hue whose ``x`` names models
  are coloured by family. ``palette`` names colours for levels of no family (a dict: for the levels it
  names, families included);
- a numeric ``x`` holding whole numbers (layer, block, k, path length, iteration) has whole-number ticks;
- the legend sits outside the panels, right of them or below, and takes its own room
  (``figure_legend``); the figure fits the report's width and wraps facets onto rows
  (``figure_layout``), so its text is legible in a 1280-px browser window.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..atomic import atomic_path
from . import figure_kinds as fk
from .family_colours import FAMILY_COLOURS
from .figure_contour import contour_colorbar, contour_levels, draw_contour
from .figure_layout import FONT_SCALE, plan
from .figure_legend import hue_as_colorbar, hue_colorbar, legend_entries, place_legend
from .figure_mapping import figure_mapping, panel_family

__all__ = ["FIGURE_KINDS", "SPEC_KEYS", "validate_figure", "select_rows", "build_figure", "draw_figure"]

_COMMON = {"query", "title", "xlabel", "ylabel", "legend_title", "logx", "logy", "hue_order", "style_order",
           "col_order", "row_order", "x_order", "palette", "flag_label", "width", "height", "dpi", "sharey",
           "col_wrap"}
SPEC_KEYS: dict[str, set[str]] = {
    "line": _COMMON | {"x", "y", "hue", "style", "col", "row", "lo", "hi", "errorbar", "dashes", "markers", "flag"},
    "bar": _COMMON | {"x", "y", "hue", "col", "row", "lo", "hi", "errorbar", "flag", "order"},
    "scatter": _COMMON | {"x", "y", "hue", "style", "col", "row", "lo", "hi", "flag", "identity"},
    "heatmap": _COMMON | {"x", "y", "value", "col", "cmap", "annot", "fmt", "center", "vmin", "vmax",
                          "colorbar_label", "y_order"},
    "layer_profile": _COMMON | {"x", "y", "hue", "lo", "hi", "errorbar", "flag"},
    "contour": _COMMON | {"x", "y", "value", "col", "row", "levels", "logz", "cmap", "vmin", "vmax", "colorbar_label",
                          "marker"},
}
FIGURE_KINDS = tuple(SPEC_KEYS)
_REQUIRED = {"heatmap": ("x", "y"), "contour": ("x", "y")}
_GRIDS = ("heatmap", "contour")   # kinds that colour a grid: a colour scale, no legend
_COLUMN_KEYS = ("x", "y", "hue", "style", "col", "row", "lo", "hi", "flag", "value")
_ERRORBARS = ("ci95", "sd", None)
MAX_PANELS = 24
TITLE_FONTSIZE = 11


def validate_figure(kind: str, spec: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    """Check a figure spec against its kind and its table's columns; return it as plain JSON.

    Raises:
        ValueError: unknown kind or key, missing required key, a column the table lacks.
    """
    if kind not in SPEC_KEYS:
        raise ValueError(f"unknown figure kind {kind!r}; valid kinds: {', '.join(FIGURE_KINDS)}")
    unknown = sorted(set(spec) - SPEC_KEYS[kind])
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for a {kind!r} figure; valid keys: {sorted(SPEC_KEYS[kind])}")
    for key in _REQUIRED.get(kind, ("x",)):
        if not spec.get(key):
            raise ValueError(f"a {kind!r} figure needs {key!r} (a column of its table: {columns})")
    defaults = {"y": None if kind == "heatmap" else "value", "value": "value"}
    for key in _COLUMN_KEYS:
        col = spec.get(key, defaults.get(key))
        if col is not None and col not in columns:
            raise ValueError(f"figure spec {key}={col!r} is not a column of its table; columns: {columns}")
    if (spec.get("lo") is None) != (spec.get("hi") is None):
        raise ValueError("give both 'lo' and 'hi' columns or neither")
    if spec.get("errorbar", "ci95") not in _ERRORBARS:
        raise ValueError(f"errorbar must be one of {_ERRORBARS}, got {spec['errorbar']!r}")
    marker = spec.get("marker")
    if marker is not None and (not isinstance(marker, (list, tuple)) or len(marker) != 2):
        raise ValueError(f"marker must be a point [x, y]; got {marker!r}")
    if kind == "layer_profile" and (spec.get("col") or spec.get("row")):
        raise ValueError("a 'layer_profile' figure has its own two panels; split it with 'query' instead of col/row")
    try:
        return json.loads(json.dumps(spec))
    except TypeError as e:
        raise ValueError(f"figure spec must be JSON (strings, numbers, lists, dicts): {e}") from None


def select_rows(df: pd.DataFrame, spec: dict[str, Any], name: str = "figure") -> pd.DataFrame:
    """The rows of ``df`` selected by ``spec["query"]`` (all rows without one); none selected is an error."""
    query = spec.get("query")
    if query:
        try:
            df = df.query(query)
        except Exception as e:
            raise ValueError(f"{name}: query {query!r} failed on columns {list(df.columns)}: {e}") from None
    if len(df) == 0:
        raise ValueError(f"{name}: query {query!r} selects no rows")
    return df


def _facet_levels(df: pd.DataFrame, spec: dict[str, Any], key: str) -> list:
    col = spec.get(key)
    return fk.levels(df[col], spec.get(f"{key}_order")) if col else [None]


def _axis_labels(ax, kind: str, spec: dict[str, Any], df: pd.DataFrame, left: bool, bottom: bool) -> None:
    y = spec.get("y", "value")
    default_y = y
    if y == "value" and kind != "heatmap" and df["metric"].nunique() == 1:
        default_y = str(df["metric"].iloc[0])
    ax.set_xlabel(spec.get("xlabel", spec.get("x", "")) if bottom else "")
    ax.set_ylabel(spec.get("ylabel", default_y) if left else "")
    if spec.get("logx"):
        ax.set_xscale("log")
    if spec.get("logy"):
        ax.set_yscale("log")


def _natural_width(kind: str, spec: dict[str, Any], m: fk.Mapping) -> float:
    w = float(spec.get("width", 4.8))
    if kind == "bar" and m.x_levels:
        w = max(w, min(14.0, 1.2 + 0.28 * len(m.x_levels) * max(1, len(m.hue_levels)) ** 0.5))
    return w


def _integer_ticks(ax, kind: str, spec: dict[str, Any], df: pd.DataFrame, m: fk.Mapping) -> None:
    x = spec.get("x")
    if (kind in ("line", "scatter", "layer_profile") and m.x_levels is None and not spec.get("logx")
            and fk.is_integral(df[x])):
        fk.integer_ticks(ax.xaxis, float(np.nanmax(np.abs(df[x].to_numpy(dtype=np.float64)))))


def _panels(df: pd.DataFrame, spec: dict[str, Any], name: str) -> tuple[list, list, list[pd.DataFrame]]:
    rows, cols = _facet_levels(df, spec, "row"), _facet_levels(df, spec, "col")
    panels = [(r, c) for r in rows for c in cols]
    if len(panels) > MAX_PANELS:
        raise ValueError(f"{name}: {len(panels)} panels from row={spec.get('row')!r} x col={spec.get('col')!r} "
                         f"(at most {MAX_PANELS}); select fewer levels with 'query'")
    subsets = []
    for r, c in panels:
        sub = df
        if spec.get("row"):
            sub = sub[sub[spec["row"]] == r]
        if spec.get("col"):
            sub = sub[sub[spec["col"]] == c]
        subsets.append(sub)
    return cols, panels, subsets


def build_figure(df: pd.DataFrame, kind: str, spec: dict[str, Any], name: str = "figure") -> Figure:
    """Draw one figure from its table and spec.

    Args:
        df: the figure's tidy table, as read back from the run folder.
        kind: one of ``FIGURE_KINDS``.
        spec: the figure spec (see the module docstring).
        name: the figure's name, for error messages.

    Returns:
        The matplotlib ``Figure`` (not attached to pyplot), sized to fit the report's width.
    """
    spec = validate_figure(kind, spec, list(df.columns))
    df = select_rows(df, spec, name)
    cols, panels, subsets = _panels(df, spec, name)
    panel_families = [panel_family(sub, [r, c]) if len(sub) else None for sub, (r, c) in zip(subsets, panels)]
    m = figure_mapping(df, kind, spec, panel_families)
    dpi = int(spec.get("dpi", 120))
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=FONT_SCALE):
        colorbar = kind not in _GRIDS and hue_as_colorbar(spec, m)
        has_flag = bool(spec.get("flag")) and bool(df[spec["flag"]].astype(bool).any())
        entries = None if kind in _GRIDS else legend_entries(kind, spec, m, has_flag)
        if kind == "layer_profile":
            want, fixed = 2, True
        elif spec.get("row"):
            want, fixed = len(cols), True
        else:
            want, fixed = int(spec.get("col_wrap", 4)), False
        layout = plan(2 if kind == "layer_profile" else len(panels), want, fixed, _natural_width(kind, spec, m),
                      float(spec.get("height", 3.4)), dpi, entries, colorbar or kind == "contour",
                      bool(spec.get("title")))
        fig = Figure(figsize=(layout.width, layout.height), dpi=dpi, layout="constrained")
        FigureCanvasAgg(fig)
        sharey = spec.get("sharey", kind != "heatmap")
        axes = np.atleast_1d(fig.subplots(layout.nrows, layout.ncols, sharey=sharey, squeeze=False)).ravel()
        ncols = layout.ncols
        if kind == "layer_profile":
            fk.draw_profile((axes[0], axes[1]), df, spec, m.panel(panel_families[0]))
            for i, (ax, label) in enumerate(zip(axes, ("network order", "sorted by magnitude"))):
                _axis_labels(ax, kind, spec, df, left=i == 0, bottom=True)
                ax.set_title(label, fontsize=TITLE_FONTSIZE)
            _integer_ticks(axes[0], kind, spec, df, m)
            axes[1].set_xlabel(f"rank ({spec.get('xlabel', spec['x'])}, sorted)")
        else:
            z = spec.get("value", "value")
            vmin = spec.get("vmin", float(np.nanmin(df[z])) if kind == "heatmap" else None)
            vmax = spec.get("vmax", float(np.nanmax(df[z])) if kind == "heatmap" else None)
            draw = {"line": fk.draw_line, "bar": fk.draw_bar, "scatter": fk.draw_scatter}.get(kind)
            levels = contour_levels(df[z], spec) if kind == "contour" else None
            filled = None
            for i, (ax, (r, c), sub, family) in enumerate(zip(axes, panels, subsets, panel_families)):
                left, bottom = i % ncols == 0, i >= len(panels) - ncols
                if not len(sub) and kind == "contour":   # a grid of families x depths the run does not fill
                    ax.set_visible(False)
                    continue
                if not len(sub):
                    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
                elif kind == "heatmap":
                    fk.draw_heatmap(ax, sub, spec, m, vmin=vmin, vmax=vmax,
                                    colorbar=(i % ncols == ncols - 1) or i == len(panels) - 1)
                elif kind == "contour":
                    filled = draw_contour(ax, sub, spec, levels)
                else:
                    draw(ax, sub, spec, m.panel(family))
                _axis_labels(ax, kind, spec, df, left or kind == "heatmap", bottom)
                _integer_ticks(ax, kind, spec, df, m)
                facet = [f"{spec[k]} = {fk.tick_label(v)}" for k, v in (("row", r), ("col", c)) if spec.get(k)]
                if facet:
                    title = ax.set_title(" | ".join(facet), fontsize=TITLE_FONTSIZE)
                    if kind == "contour" and family:  # no legend: a panel of one family names it in its colour
                        title.set_color(FAMILY_COLOURS[family])
            for ax in axes[len(panels):]:
                ax.set_visible(False)
            if filled is not None:
                contour_colorbar(fig, [ax for ax in axes if ax.get_visible()], filled, spec)
        if colorbar:
            hue_colorbar(fig, [ax for ax in axes if ax.get_visible()], spec, m)
        if entries is not None:
            place_legend(fig, entries, layout.legend, layout.legend_ncol)
        if spec.get("title"):
            fig.suptitle(spec["title"], fontsize=TITLE_FONTSIZE + 1.5)
    return fig


def draw_figure(df: pd.DataFrame, kind: str, spec: dict[str, Any], path: str | Path, name: str = "figure") -> Path:
    """Draw one figure (``build_figure``) and save it atomically as a PNG at its spec's ``dpi`` (120).

    Returns:
        ``path``.
    """
    fig = build_figure(df, kind, spec, name)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=int(spec.get("dpi", 120)))
    return path
