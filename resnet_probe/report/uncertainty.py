"""Numbers with uncertainty: means over seeds, Student-t 95 % intervals, and how they are written.

Every number a report states about a trained network comes from several seeds or from a bootstrap,
so it is written with its spread: ``format_ci`` gives ``"12.3 % [11.8, 12.9]"`` (estimate and a
confidence interval), ``format_mean_std`` gives ``"12.3 ± 0.4 (n=5)"`` (mean and sample standard
deviation over seeds). ``summarise_over_seeds`` turns a tidy table into one row per group with the
mean, the sample std (ddof=1), the count and the two-sided Student-t interval of the mean.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["t_mean_ci", "format_ci", "format_mean_std", "summarise_over_seeds"]


def t_mean_ci(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` and its two-sided Student-t confidence interval.

    The interval is ``mean ± t_{(1+confidence)/2, n-1} * std / sqrt(n)`` with the sample std
    (ddof=1). With fewer than two finite values the bounds are NaN.

    Args:
        values: one number per seed (NaNs are dropped).
        confidence: coverage of the interval, in (0, 1).

    Returns:
        ``(mean, lo, hi)``.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    x = np.asarray(list(values), dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2.0, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def _fmt(v: float, digits: int) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def format_ci(estimate: float, lo: float | None = None, hi: float | None = None, *, digits: int = 1,
              unit: str = "", percent: bool = False) -> str:
    """Write an estimate with its confidence interval: ``"12.3 % [11.8, 12.9]"``.

    Args:
        estimate: the point estimate.
        lo: lower bound of the interval (``None``/NaN when there is none).
        hi: upper bound of the interval.
        digits: decimals shown.
        unit: text after the estimate (``"%"``, ``"ms"``); separated by a space.
        percent: the numbers are fractions; multiply by 100 and use the unit ``"%"``.

    Returns:
        The formatted string; the interval is left out when either bound is missing.
    """
    scale = 100.0 if percent else 1.0
    unit = "%" if percent else unit
    parts = [_fmt(estimate * scale if estimate is not None else None, digits)]
    if unit:
        parts.append(unit)
    text = " ".join(parts)
    if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
        text += f" [{_fmt(lo * scale, digits)}, {_fmt(hi * scale, digits)}]"
    return text


def format_mean_std(values: Sequence[float], *, digits: int = 1, unit: str = "", percent: bool = False) -> str:
    """Write the mean and sample std of per-seed values: ``"12.3 ± 0.4 % (n=5)"``.

    Args:
        values: one number per seed (NaNs are dropped).
        digits: decimals shown.
        unit: text after the numbers.
        percent: the numbers are fractions; multiply by 100 and use the unit ``"%"``.

    Returns:
        The formatted string; a single value is written without ``±``.
    """
    x = np.asarray(list(values), dtype=np.float64)
    x = x[np.isfinite(x)]
    scale = 100.0 if percent else 1.0
    unit = "%" if percent else unit
    suffix = f" {unit}" if unit else ""
    if x.size == 0:
        return "n/a"
    if x.size == 1:
        return f"{_fmt(x[0] * scale, digits)}{suffix} (n=1)"
    return f"{_fmt(x.mean() * scale, digits)} ± {_fmt(x.std(ddof=1) * scale, digits)}{suffix} (n={x.size})"


def summarise_over_seeds(df: pd.DataFrame, by: str | Sequence[str], value: str = "value",
                         confidence: float = 0.95) -> pd.DataFrame:
    """One row per group of ``by`` with the mean, sample std, count and CI of ``value`` over its rows.

    Typically ``by=["model", "metric"]`` and the rows of a group are the seeds. The columns ``lo``
    and ``hi`` bound the Student-t interval of the mean (``t_mean_ci``), so the result can be drawn
    directly as a figure with error bars.

    Args:
        df: a tidy table.
        by: grouping column(s).
        value: the column summarised.
        confidence: coverage of the interval.

    Returns:
        A DataFrame with the ``by`` columns and ``mean``, ``std``, ``n``, ``lo``, ``hi``.
    """
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in [*by, value] if c not in df.columns]
    if missing:
        raise KeyError(f"columns {missing} not in the table; it has {list(df.columns)}")
    rows = []
    for key, group in df.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        x = pd.to_numeric(group[value], errors="raise").to_numpy(dtype=np.float64)
        x = x[np.isfinite(x)]
        mean, lo, hi = t_mean_ci(x, confidence)
        std = float(x.std(ddof=1)) if x.size > 1 else math.nan
        rows.append((*key, mean, std, int(x.size), lo, hi))
    return pd.DataFrame(rows, columns=[*by, "mean", "std", "n", "lo", "hi"])
