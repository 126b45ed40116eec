"""How each figure kind draws one panel from a tidy table (seaborn on a matplotlib Axes).

The layout (facets, shared legend, title, saving) lives in ``figures.py``; the functions here draw
one panel of one kind given the panel's rows, the figure spec and the colour / dash mapping shared
by all panels, so the same level has the same colour everywhere in a figure.

Repeated rows for one point (seeds) are averaged and, unless ``errorbar`` is ``None``, drawn with
their spread: ``"ci95"`` the Student-t 95 % interval of the mean (``uncertainty.t_mean_ci``), ``"sd"``
the mean ± sample std. Explicit ``lo`` / ``hi`` columns take precedence.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter, MaxNLocator
from scipy import stats

__all__ = ["Mapping", "aggregate", "levels", "spread_of", "is_integral", "tick_label", "integer_locator",
           "integer_ticks", "draw_line", "draw_bar", "draw_scatter", "draw_heatmap", "draw_profile", "FLAG_STYLE"]

DEFAULT_DASHES = ["", (4, 2), (1, 1.5), (6, 2, 1, 2), (3, 1, 1, 1, 1, 1), (8, 3)]
DEFAULT_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]
FLAG_STYLE = dict(marker="o", s=90, facecolors="none", edgecolors="black", linewidths=1.4, zorder=6)


@dataclass
class Mapping:
    """Level -> colour / dashes / marker, fixed over the whole figure (``palette``: as in the legend).

    A panel whose rows are all of one family draws with ``panel(family)``: a numeric hue (depth,
    block) in shades of that family's colour, and a figure without hue in that colour.
    """

    hue_levels: list = field(default_factory=list)
    palette: dict = field(default_factory=dict)
    hue_numeric: bool = False
    hue_integer: bool = False
    family_palettes: dict = field(default_factory=dict)  # family -> {hue level: colour}, numeric hues only
    family_colours: dict = field(default_factory=dict)  # family -> colour of a figure without hue
    x_palette: dict | None = None  # x level -> colour, bars without hue whose x names models
    style_levels: list = field(default_factory=list)
    dashes: dict = field(default_factory=dict)
    markers: dict = field(default_factory=dict)
    x_levels: list | None = None
    color: Any = None
    spread: str | None = None  # legend text for the drawn bands / error bars

    def panel(self, family: str | None) -> Mapping:
        """The mapping a panel of one ``family`` (None: no single family) draws with."""
        if family is None:
            return self
        return replace(self, palette=self.family_palettes.get(family, self.palette),
                       color=self.family_colours.get(family, self.color))


def levels(series: pd.Series, order: list | None = None) -> list:
    """The levels of a column: ``order`` when given, sorted numbers, or strings in first-appearance order."""
    present = list(pd.unique(series.dropna()))
    if order is not None:
        unknown = [v for v in present if v not in order]
        return list(order) + unknown
    if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
        return sorted(present)
    return present


def aggregate(df: pd.DataFrame, keys: list[str], y: str, spec: dict) -> pd.DataFrame:
    """One row per ``keys`` with the mean of ``y`` and, when there is a spread to show, ``_lo`` / ``_hi``.

    ``lo`` / ``hi`` columns named in the spec are averaged like ``y``; otherwise the spread of the
    repeated rows is summarised as chosen by ``spec["errorbar"]`` (``"ci95"`` default, ``"sd"``, None).
    """
    keys = [k for k in dict.fromkeys(keys) if k is not None]
    lo, hi = spec.get("lo"), spec.get("hi")
    mode = spec.get("errorbar", "ci95")
    flag = spec.get("flag")
    work = df.assign(_one=0) if not keys else df
    if flag:
        work = work.assign(**{flag: work[flag].astype(bool)})
    groups = work.groupby(keys or ["_one"], sort=False, dropna=False)
    out = groups[y].agg(_mean="mean", _std="std", _n="count").reset_index()
    if lo and hi:
        out["_lo"], out["_hi"] = groups[lo].mean().to_numpy(), groups[hi].mean().to_numpy()
    else:
        n = out["_n"].to_numpy(dtype=np.float64)
        half = np.full(len(out), np.nan)
        many = n > 1
        if mode == "sd":
            half[many] = out["_std"].to_numpy()[many]
        elif mode is not None:
            half[many] = stats.t.ppf(0.975, n[many] - 1) * out["_std"].to_numpy()[many] / np.sqrt(n[many])
        out["_lo"], out["_hi"] = out["_mean"] - half, out["_mean"] + half
    out["_flag"] = groups[flag].any().to_numpy() if flag else False
    out = out.drop(columns=["_std", "_n"] + ([] if keys else ["_one"]))
    return out.rename(columns={"_mean": y})


def spread_of(df: pd.DataFrame, kind: str, spec: dict) -> str | None:
    """The legend text for the bands / error bars a figure will draw, None when it draws none."""
    if kind in ("heatmap", "contour"):
        return None
    if kind == "scatter":
        return spread_label(spec) if spec.get("lo") and spec.get("hi") else None
    keys = [spec.get(k) for k in ("hue", "style", "x", "col", "row")]
    agg = aggregate(df, keys, spec.get("y", "value"), spec)
    return spread_label(spec) if agg["_lo"].notna().any() else None


def is_integral(series: pd.Series) -> bool:
    """Whether a column holds whole numbers only (integers, or floats without a fraction)."""
    if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
        return False
    if pd.api.types.is_integer_dtype(series):
        return True
    values = series.to_numpy(dtype=np.float64)
    values = values[np.isfinite(values)]
    return len(values) > 0 and bool(np.all(values == np.round(values)))


def tick_label(value: Any) -> str:
    """A level as text; whole floats without their ``.0`` (a depth read back from CSV is ``20``, not ``20.0``)."""
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return str(value)


def integer_locator() -> MaxNLocator:
    """Ticks at whole numbers only: layers, blocks, k and path lengths have no 2.5."""
    return MaxNLocator(nbins="auto", integer=True)


def integer_ticks(axis: Any, largest: float) -> None:
    """Whole-number ticks on ``axis``; thousands written ``16k`` so that iteration counts fit narrow panels."""
    axis.set_major_locator(integer_locator())
    if largest >= 10_000:
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v else "0"))


def spread_label(spec: dict) -> str:
    """What a band / error bar shows, for the legend."""
    if spec.get("lo") and spec.get("hi"):
        return f"interval ({spec['lo']} to {spec['hi']})"
    return "± 1 sd over repeats" if spec.get("errorbar") == "sd" else "95 % CI of the mean"


def _positions(values: pd.Series, x_levels: list | None) -> np.ndarray:
    if x_levels is None:
        return values.to_numpy(dtype=np.float64)
    index = {v: i for i, v in enumerate(x_levels)}
    return values.map(index).to_numpy(dtype=np.float64)


def _categorical_ticks(ax: Axes, x_levels: list, axis: str = "x") -> None:
    labels = [tick_label(v) for v in x_levels]
    n = len(labels)
    step = max(1, int(np.ceil(n / 30)))
    ticks = list(range(0, n, step))
    rotate = len(ticks) * (max((len(s) for s in labels), default=0) + 1) > 40
    if axis == "x":
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=60 if rotate else 0,
                      ha="right" if rotate else "center", rotation_mode="anchor")
    else:
        ax.set_yticks(ticks, [labels[i] for i in ticks])


def draw_line(ax: Axes, df: pd.DataFrame, spec: dict, m: Mapping) -> None:
    """Lines of ``y`` against ``x`` per hue (colour) and style (dashes); bands from lo/hi or over seeds."""
    x, y, hue, style = spec["x"], spec.get("y", "value"), spec.get("hue"), spec.get("style")
    agg = aggregate(df, [hue, style, x], y, spec)
    agg["_x"] = _positions(agg[x], m.x_levels)
    agg = agg.sort_values("_x")
    hue_order = [h for h in m.hue_levels if hue and h in set(agg[hue])] or None
    style_order = [s for s in m.style_levels if style and s in set(agg[style])] or None
    extra: dict[str, Any] = {}
    if style_order:
        extra["dashes"] = {k: m.dashes[k] for k in style_order}
        extra["markers"] = {k: m.markers[k] for k in style_order} if spec.get("markers") else False
    elif spec.get("markers"):
        extra.update(marker="o", markersize=4)
    if not hue:
        extra["color"] = m.color
    sns.lineplot(data=agg, x="_x", y=y, hue=hue, style=style, hue_order=hue_order, style_order=style_order,
                 palette=m.palette if hue else None, errorbar=None, estimator=None, sort=True, legend=False,
                 ax=ax, linewidth=1.8, **extra)
    groups = agg.groupby([c for c in (hue, style) if c], sort=False) if (hue or style) else [((), agg)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        colour = m.palette.get(key[0], m.color) if hue else m.color
        if g["_lo"].notna().any():
            ax.fill_between(g["_x"], g["_lo"], g["_hi"], color=colour, alpha=0.18, linewidth=0)
        if len(g) == 1:  # a line through one point draws nothing
            ax.scatter(g["_x"], g[y], color=colour, s=20, zorder=4)
    flagged = agg[agg["_flag"]]
    if len(flagged):
        ax.scatter(flagged["_x"], flagged[y], **FLAG_STYLE)
    if m.x_levels is not None:
        _categorical_ticks(ax, m.x_levels)


def draw_bar(ax: Axes, df: pd.DataFrame, spec: dict, m: Mapping) -> None:
    """Bars of the mean ``y`` per ``x`` category, dodged by hue; error bars from lo/hi or over seeds.

    Flagged bars (``spec["flag"]``) are hatched with a black edge.
    """
    x, y, hue = spec["x"], spec.get("y", "value"), spec.get("hue")
    agg = aggregate(df, [x, hue], y, spec)
    x_levels = m.x_levels or levels(agg[x])
    hue_levels = m.hue_levels if hue else [None]
    width = 0.8 / len(hue_levels)
    for j, h in enumerate(hue_levels):
        g = agg[agg[hue] == h] if hue else agg
        if not len(g):
            continue
        pos = _positions(g[x], x_levels) - 0.4 + width * (j + 0.5)
        if hue:
            colours = [m.palette.get(h)] * len(g)
        elif m.x_palette:
            colours = [m.x_palette.get(v, m.color) for v in g[x]]
        else:
            colours = [m.color] * len(g)
        flags = g["_flag"].to_numpy()
        ax.bar(pos, g[y], width=width * 0.95, color=colours,
               hatch=["//" if f else None for f in flags],
               edgecolor=["black" if f else c for f, c in zip(flags, colours)], linewidth=1.0)
        has_err = g["_lo"].notna().to_numpy()
        if has_err.any():
            yv, lo, hi = (g[c].to_numpy(dtype=np.float64)[has_err] for c in (y, "_lo", "_hi"))
            ax.errorbar(pos[has_err], yv, yerr=[yv - lo, hi - yv], fmt="none", ecolor="0.15",
                        elinewidth=1.0, capsize=2.5, zorder=5)
    ax.set_xlim(-0.6, len(x_levels) - 0.4)
    _categorical_ticks(ax, x_levels)
    ax.grid(axis="x", visible=False)


def draw_scatter(ax: Axes, df: pd.DataFrame, spec: dict, m: Mapping) -> None:
    """Points of ``y`` against ``x`` per hue / style; vertical error bars from lo/hi; optional y = x line."""
    x, y, hue, style = spec["x"], spec.get("y", "value"), spec.get("hue"), spec.get("style")
    hue_order = [h for h in m.hue_levels if hue and h in set(df[hue])] or None
    style_order = [s for s in m.style_levels if style and s in set(df[style])] or None
    lo, hi = spec.get("lo"), spec.get("hi")
    if lo and hi:
        for h, g in (df.groupby(hue, sort=False) if hue else [(None, df)]):
            colour = m.palette.get(h) if hue else m.color
            yv = g[y].to_numpy(dtype=np.float64)
            ax.errorbar(g[x], yv, yerr=[yv - g[lo].to_numpy(float), g[hi].to_numpy(float) - yv], fmt="none",
                        ecolor=colour, elinewidth=1.0, alpha=0.7, capsize=2)
    sns.scatterplot(data=df, x=x, y=y, hue=hue, style=style, hue_order=hue_order, style_order=style_order,
                    palette=m.palette if hue else None, color=None if hue else m.color,
                    markers={k: m.markers[k] for k in style_order} if style_order else True,
                    legend=False, ax=ax, s=36, edgecolor="white", linewidth=0.5, zorder=4)
    if spec.get("flag"):
        flagged = df[df[spec["flag"]].astype(bool)]
        ax.scatter(flagged[x], flagged[y], **FLAG_STYLE)
    if spec.get("identity"):
        vals = pd.concat([df[x], df[y]]).to_numpy(dtype=np.float64)
        lo_v, hi_v = np.nanmin(vals), np.nanmax(vals)
        ax.plot([lo_v, hi_v], [lo_v, hi_v], color="0.5", linestyle="--", linewidth=1, zorder=1)


def draw_heatmap(ax: Axes, df: pd.DataFrame, spec: dict, m: Mapping, *, vmin: float, vmax: float,
                 colorbar: bool) -> None:
    """Mean of ``value`` on a grid of ``x`` (columns) by ``y`` (rows)."""
    x, y, z = spec["x"], spec["y"], spec.get("value", "value")
    grid = df.pivot_table(index=y, columns=x, values=z, aggfunc="mean", sort=False)
    grid = grid.reindex(index=[v for v in levels(df[y], spec.get("y_order")) if v in grid.index],
                        columns=[v for v in (m.x_levels or levels(df[x])) if v in grid.columns])
    grid.columns, grid.index = [tick_label(v) for v in grid.columns], [tick_label(v) for v in grid.index]
    annot = spec.get("annot", grid.size <= 80)
    sns.heatmap(grid, ax=ax, cmap=spec.get("cmap", "viridis"), annot=annot, fmt=spec.get("fmt", ".2g"),
                center=spec.get("center"), vmin=vmin, vmax=vmax, cbar=colorbar,
                cbar_kws={"label": spec.get("colorbar_label", z)} if colorbar else None,
                linewidths=0.4 if grid.size <= 400 else 0, linecolor="white", annot_kws={"fontsize": 9})

    xlen = max((len(str(c)) for c in grid.columns), default=0)
    ax.tick_params(axis="x", labelrotation=60 if grid.shape[1] * (xlen + 1) > 40 else 0)
    ax.tick_params(axis="y", labelrotation=0)


def draw_profile(axes: tuple[Axes, Axes], df: pd.DataFrame, spec: dict, m: Mapping) -> None:
    """He et al. 2016, Fig. 7: ``y`` per layer in the network's order (left) and sorted by magnitude (right)."""
    x, y, hue = spec["x"], spec.get("y", "value"), spec.get("hue")
    line_spec = dict(spec, errorbar=spec.get("errorbar", "ci95"))
    draw_line(axes[0], df, dict(line_spec, markers=True), m)
    agg = aggregate(df, [hue, x], y, spec)
    for h, g in (agg.groupby(hue, sort=False) if hue else [(None, agg)]):
        colour = m.palette.get(h) if hue else m.color
        ranked = g.sort_values(y, ascending=False)
        rank = np.arange(1, len(ranked) + 1)
        axes[1].plot(rank, ranked[y], color=colour, marker="o", markersize=3.5, linewidth=1.8)
        flagged = ranked["_flag"].to_numpy()
        if flagged.any():
            axes[1].scatter(rank[flagged], ranked[y].to_numpy()[flagged], **FLAG_STYLE)
    axes[1].xaxis.set_major_locator(integer_locator())
