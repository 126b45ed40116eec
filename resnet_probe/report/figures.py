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

Keys shared by all kinds: ``query`` (a ``DataFrame.query`` string selecting rows), ``title, xlabel,
ylabel, legend_title, logx, logy, hue_order, style_order, col_order, row_order, x_order, palette,
flag_label, width, height`` (inches per panel), ``dpi``, ``sharey``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..atomic import atomic_path
from . import figure_kinds as fk

__all__ = ["FIGURE_KINDS", "SPEC_KEYS", "validate_figure", "select_rows", "draw_figure"]

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
}
FIGURE_KINDS = tuple(SPEC_KEYS)
_REQUIRED = {"heatmap": ("x", "y")}
_COLUMN_KEYS = ("x", "y", "hue", "style", "col", "row", "lo", "hi", "flag", "value")
_ERRORBARS = ("ci95", "sd", None)
MAX_PANELS = 24


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


def _mapping(df: pd.DataFrame, kind: str, spec: dict[str, Any]) -> fk.Mapping:
    import seaborn as sns
    m = fk.Mapping()
    hue, style = spec.get("hue"), spec.get("style")
    if hue:
        m.hue_levels = fk.levels(df[hue], spec.get("hue_order"))
        pal = spec.get("palette")
        if isinstance(pal, dict):
            colours = [pal.get(str(h), pal.get(h)) for h in m.hue_levels]
        else:
            colours = sns.color_palette(pal or ("deep" if len(m.hue_levels) <= 10 else "viridis"),
                                        len(m.hue_levels))
        m.palette = dict(zip(m.hue_levels, colours))
    m.color = sns.color_palette("deep")[0]
    if style:
        m.style_levels = fk.levels(df[style], spec.get("style_order"))
        given = spec.get("dashes") or {}
        m.dashes = {lv: tuple(given.get(str(lv), given.get(lv, fk.DEFAULT_DASHES[i % len(fk.DEFAULT_DASHES)])))
                    for i, lv in enumerate(m.style_levels)}
        m.markers = {lv: fk.DEFAULT_MARKERS[i % len(fk.DEFAULT_MARKERS)] for i, lv in enumerate(m.style_levels)}
    x = spec.get("x")
    if kind in ("bar", "heatmap") or (x and not pd.api.types.is_numeric_dtype(df[x])):
        m.x_levels = fk.levels(df[x], spec.get("order") or spec.get("x_order"))
    return m


def _legend(fig, kind: str, spec: dict[str, Any], m: fk.Mapping, df: pd.DataFrame) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    handles, labels, headers = [], [], []

    def header(text: str) -> None:
        headers.append(len(labels))
        handles.append(Line2D([], [], linestyle="none"))
        labels.append(text)

    sections = bool(spec.get("hue")) + bool(spec.get("style")) > 1
    if spec.get("hue"):
        if sections:
            header(spec.get("legend_title") or spec["hue"])
        for lv in m.hue_levels:
            colour = m.palette[lv]
            handles.append(Patch(color=colour) if kind == "bar" else
                           Line2D([], [], color=colour, marker="o" if kind == "scatter" else None,
                                  linestyle="none" if kind == "scatter" else "-", linewidth=2))
            labels.append(str(lv))
    if spec.get("style"):
        if sections:
            header(spec["style"])
        for lv in m.style_levels:
            handles.append(Line2D([], [], color="0.25", dashes=m.dashes[lv] or (None, None), linewidth=1.8,
                                  marker=m.markers[lv] if kind == "scatter" else None,
                                  linestyle="none" if kind == "scatter" else "-"))
            labels.append(str(lv))
    if spec.get("flag") and df[spec["flag"]].astype(bool).any():
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//") if kind == "bar" else
                       Line2D([], [], marker="o", markersize=9, markerfacecolor="none", markeredgecolor="black",
                              linestyle="none"))
        labels.append(spec.get("flag_label") or spec["flag"])
    if m.spread:
        handles.append(Patch(facecolor="0.6", alpha=0.35) if kind in ("line", "layer_profile") else
                       Line2D([], [], color="0.15", marker="|", markersize=10, linestyle="none"))
        labels.append(m.spread)
    if not handles:
        return
    title = None if sections else (spec.get("legend_title") or spec.get("hue") or spec.get("style"))
    leg = fig.legend(handles, labels, loc="outside right center", title=title, frameon=False, fontsize=9)
    for i, text in enumerate(leg.get_texts()):
        if i in headers:
            text.set_fontweight("bold")


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


def draw_figure(df: pd.DataFrame, kind: str, spec: dict[str, Any], path: str | Path, name: str = "figure") -> Path:
    """Draw one figure from its table and spec and save it atomically as a PNG.

    Args:
        df: the figure's tidy table, as read back from the run folder.
        kind: one of ``FIGURE_KINDS``.
        spec: the figure spec (see the module docstring).
        path: destination ``.png``.
        name: the figure's name, for error messages.

    Returns:
        ``path``.
    """
    import seaborn as sns
    from matplotlib.figure import Figure

    spec = validate_figure(kind, spec, list(df.columns))
    df = select_rows(df, spec, name)
    m = _mapping(df, kind, spec)
    rows, cols = _facet_levels(df, spec, "row"), _facet_levels(df, spec, "col")
    panels = [(r, c) for r in rows for c in cols]
    if len(panels) > MAX_PANELS:
        raise ValueError(f"{name}: {len(panels)} panels from row={spec.get('row')!r} x col={spec.get('col')!r} "
                         f"(at most {MAX_PANELS}); select fewer levels with 'query'")
    ncols = len(cols) if spec.get("row") else min(len(cols), int(spec.get("col_wrap", 4)))
    nrows = len(rows) if spec.get("row") else int(np.ceil(len(cols) / ncols))
    if kind == "layer_profile":
        ncols, nrows = 2, 1
    w = float(spec.get("width", 4.8))
    if kind == "bar" and m.x_levels:
        w = max(w, min(14.0, 1.2 + 0.28 * len(m.x_levels) * max(1, len(m.hue_levels)) ** 0.5))
    h = float(spec.get("height", 3.4))
    keys = [spec[k] for k in ("x", "hue", "style", "col", "row") if spec.get(k)]
    repeats = (kind in ("line", "bar", "layer_profile") and spec.get("errorbar", "ci95") is not None
               and bool(df.duplicated(keys).any()))
    has_legend = kind != "heatmap" and bool(spec.get("hue") or spec.get("style") or spec.get("flag")
                                            or spec.get("lo") or repeats)
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
        fig = Figure(figsize=(w * ncols + (1.8 if has_legend else 0), h * nrows + 0.3), layout="constrained")
        sharey = spec.get("sharey", True if kind != "heatmap" else False)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=sharey, squeeze=False)).ravel()
        if kind == "layer_profile":
            fk.draw_profile((axes[0], axes[1]), df, spec, m)
            for i, (ax, label) in enumerate(zip(axes, ("network order", "sorted by magnitude"))):
                _axis_labels(ax, kind, spec, df, left=i == 0, bottom=True)
                ax.set_title(label, fontsize=10)
            axes[1].set_xlabel(f"rank ({spec.get('xlabel', spec['x'])}, sorted)")
        else:
            z = spec.get("value", "value")
            vmin = spec.get("vmin", float(np.nanmin(df[z])) if kind == "heatmap" else None)
            vmax = spec.get("vmax", float(np.nanmax(df[z])) if kind == "heatmap" else None)
            for i, (ax, (r, c)) in enumerate(zip(axes, panels)):
                sub = df
                if spec.get("row"):
                    sub = sub[sub[spec["row"]] == r]
                if spec.get("col"):
                    sub = sub[sub[spec["col"]] == c]
                left, bottom = i % ncols == 0, i >= len(panels) - ncols
                if len(sub):
                    if kind == "heatmap":
                        fk.draw_heatmap(ax, sub, spec, m, vmin=vmin, vmax=vmax,
                                        colorbar=(i % ncols == ncols - 1) or i == len(panels) - 1)
                    else:
                        {"line": fk.draw_line, "bar": fk.draw_bar, "scatter": fk.draw_scatter}[kind](ax, sub, spec, m)
                else:
                    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
                _axis_labels(ax, kind, spec, df, left or kind == "heatmap", bottom)
                facet = [f"{spec[k]} = {v}" for k, v in (("row", r), ("col", c)) if spec.get(k)]
                if facet:
                    ax.set_title(" | ".join(facet), fontsize=10)
            for ax in axes[len(panels):]:
                ax.set_visible(False)
        if has_legend:
            _legend(fig, kind, spec, m, df)
        if spec.get("title"):
            fig.suptitle(spec["title"], fontsize=12)
        path = Path(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=int(spec.get("dpi", 120)))
    return path
