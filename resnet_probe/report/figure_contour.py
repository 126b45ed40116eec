"""The ``contour`` figure kind: a surface ``value(x, y)`` on a grid as filled contours with level lines
(Li et al. 2018's loss-landscape plots).

Every panel of a figure uses the same levels, so one colour means one value in all of them, and one
colour bar right of the panels explains it. ``logz`` spaces the levels geometrically (a surface that
rises from 0.1 to 100 nats shows its basin and its rim alike); ``marker`` marks one point of the
plane (the trained parameters at the origin) with a black cross.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

__all__ = ["contour_levels", "draw_contour", "contour_colorbar"]

DEFAULT_LEVELS = 12


def contour_levels(values: pd.Series, spec: dict[str, Any]) -> np.ndarray:
    """The levels shared by every panel: ``spec["levels"]`` when it lists them, else that many (default 12)
    from ``vmin`` to ``vmax`` (the data's range by default), geometric with ``logz``."""
    given = spec.get("levels")
    if isinstance(given, (list, tuple)):
        return np.asarray(sorted(given), dtype=np.float64)
    v = values.to_numpy(dtype=np.float64)
    v = v[np.isfinite(v)]
    logz = bool(spec.get("logz"))
    if logz:
        v = v[v > 0]
        if not len(v):
            raise ValueError("a contour figure with logz needs positive values")
    lo, hi = float(spec.get("vmin", v.min())), float(spec.get("vmax", v.max()))
    if hi <= lo:
        hi = lo * 1.01 + 1e-12 if lo else 1e-12
    n = int(given or DEFAULT_LEVELS)
    return np.geomspace(lo, hi, n + 1) if logz else np.linspace(lo, hi, n + 1)


def _norm(levels: np.ndarray, spec: dict[str, Any]) -> Normalize:
    return LogNorm(levels[0], levels[-1]) if spec.get("logz") else Normalize(levels[0], levels[-1])


def draw_contour(ax: Axes, df: pd.DataFrame, spec: dict[str, Any], levels: np.ndarray):
    """Filled contours of the mean ``value`` per ``(x, y)`` on one panel; returns the filled set."""
    x, y, z = spec["x"], spec["y"], spec.get("value", "value")
    grid = df.pivot_table(index=y, columns=x, values=z, aggfunc="mean").sort_index().sort_index(axis=1)
    xs, ys = grid.columns.to_numpy(dtype=np.float64), grid.index.to_numpy(dtype=np.float64)
    values = np.clip(grid.to_numpy(dtype=np.float64), levels[0], levels[-1])   # beyond the range: its end colour
    cmap, norm = spec.get("cmap", "viridis"), _norm(levels, spec)
    filled = ax.contourf(xs, ys, values, levels=levels, cmap=cmap, norm=norm, extend="neither")
    ax.contour(xs, ys, values, levels=levels, colors="white", linewidths=0.5, alpha=0.6)
    if spec.get("marker") is not None:
        mx, my = spec["marker"]
        ax.plot([mx], [my], marker="+", color="black", markersize=10, markeredgewidth=1.8, linestyle="none",
                zorder=5)
    ax.set_aspect("auto")
    ax.grid(False)
    return filled


def contour_colorbar(fig: Figure, axes: list, filled, spec: dict[str, Any]) -> None:
    """One colour bar for every panel (they share levels)."""
    length = min(0.9, 3.2 / fig.get_size_inches()[1])
    bar = fig.colorbar(filled, ax=axes, label=spec.get("colorbar_label", spec.get("value", "value")),
                       shrink=length, aspect=20, pad=0.02)
    levels = np.asarray(filled.levels)
    bar.set_ticks(levels[::max(1, int(np.ceil(len(levels) / 7)))])     # at most 7 labelled levels
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    bar.minorticks_off()
    bar.ax.tick_params(labelsize=10)
