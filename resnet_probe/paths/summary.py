"""Path-length distribution, gradient magnitude per path length and the effective paths.

Veit, Wilber, Belongie (2016), Fig. 6: a net of ``n`` blocks has ``C(n, k)`` paths of length ``k``,
so path lengths follow Binomial(n, 1/2) (a); the gradient a single path carries shrinks with its
length, so the *total* gradient magnitude per length, distribution x per-path magnitude, peaks at
short lengths (b); the effective paths are the band of lengths that carries most of it (5-17 of 54
blocks for their ResNet-110).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np
import pandas as pd
import torch
from scipy import stats


def path_length_distribution(n: int) -> np.ndarray:
    """Fraction of the ``2^n`` paths that have length ``k``, for ``k = 0..n``: Binomial(n, 1/2)."""
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n (the number of blocks) must be a non-negative integer; got {n!r}")
    return stats.binom.pmf(np.arange(n + 1), n, 0.5)


def _with_totals(df: pd.DataFrame, n: int) -> pd.DataFrame:
    df.insert(1, "n_paths", [comb(n, int(k)) for k in df["path_length"]])
    df.insert(2, "fraction", path_length_distribution(n)[df["path_length"].to_numpy()])
    df["total_magnitude"] = df["fraction"] * df["per_path_magnitude"]
    df["share"] = df["total_magnitude"] / df["total_magnitude"].sum()
    return df


def exact_path_magnitudes(stack: torch.Tensor) -> pd.DataFrame:
    """Gradient magnitude per path length from the exact stack (``path_gradient_stack``).

    Columns: ``path_length``; ``n_paths`` = C(n, k); ``fraction`` of all paths (Binomial pmf);
    ``gradient_norm``: ``||G[k]||`` per example (L2 over the image), averaged over examples, the
    gradient carried by all length-k paths together; ``per_path_magnitude`` =
    ``gradient_norm / n_paths``, the magnitude of the mean path gradient (sampled single paths
    measure the mean of their magnitudes instead, which is larger where path gradients cancel);
    ``total_magnitude`` = ``fraction * per_path_magnitude`` (proportional to ``gradient_norm``); and
    ``share`` of the summed total.
    """
    n = stack.shape[0] - 1
    norm = stack.flatten(2).norm(dim=-1).mean(dim=1).double().cpu().numpy()
    df = pd.DataFrame({"path_length": np.arange(n + 1), "gradient_norm": norm})
    df["per_path_magnitude"] = df["gradient_norm"] / np.array([comb(n, k) for k in range(n + 1)], dtype=float)
    return _with_totals(df, n)


def sampled_path_magnitudes(samples: pd.DataFrame, n: int) -> pd.DataFrame:
    """Per-path and total gradient magnitude per length from ``sampled_path_gradients``.

    Args:
        samples: its table (``path_length``, ``magnitude`` per sampled path).
        n: number of blocks of the net.

    Returns:
        Per sampled length: ``n_paths``, ``fraction``, ``per_path_magnitude`` (mean sampled
        magnitude), ``per_path_sem`` (its standard error), ``n_samples``, ``total_magnitude`` =
        ``fraction * per_path_magnitude`` and ``share`` (of the sampled lengths' total).
    """
    g = samples.groupby("path_length")["magnitude"]
    df = pd.DataFrame({"per_path_magnitude": g.mean(), "per_path_sem": g.sem(ddof=1),
                       "n_samples": g.size()}).reset_index()
    return _with_totals(df, n)


@dataclass(frozen=True)
class PathBand:
    """The shortest band of path lengths ``lo..hi`` holding ``share`` of the total gradient."""

    lo: int
    hi: int
    share: float


def effective_paths(magnitudes: pd.DataFrame, mass: float = 0.9, column: str = "total_magnitude") -> PathBand:
    """The effective paths: the shortest contiguous band of lengths whose ``column`` holds at
    least ``mass`` of its total (ties: the shorter lengths).

    Args:
        magnitudes: a table from ``exact_path_magnitudes`` or ``sampled_path_magnitudes``.
        mass: fraction of the total, in (0, 1].
        column: the magnitude to accumulate.
    """
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1]; got {mass}")
    df = magnitudes.sort_values("path_length")
    lengths = df["path_length"].to_numpy()
    values = df[column].to_numpy(dtype=float)
    total = values.sum()
    if not total > 0:
        raise ValueError(f"the {column} column sums to {total}; no band can hold a share of it")
    csum = np.concatenate([[0.0], np.cumsum(values)])
    best = None
    for i in range(len(values)):
        # the first j whose band i..j reaches the mass; a relative tolerance absorbs rounding
        j = int(np.searchsorted(csum, csum[i] + mass * total * (1 - 1e-12), side="left")) - 1
        if j >= len(values) or j < i:
            continue
        width = lengths[j] - lengths[i]
        if best is None or width < best[0]:
            best = (width, i, j)
    _, i, j = best
    return PathBand(lo=int(lengths[i]), hi=int(lengths[j]), share=float((csum[j + 1] - csum[i]) / total))
