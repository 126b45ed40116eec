"""Path-length distribution, the gradient each path length carries, and the effective paths.

Veit, Wilber, Belongie (2016), Fig. 6: a net of ``n`` blocks has ``C(n, k)`` paths of length ``k``,
so path lengths follow Binomial(n, 1/2) (a); the gradient magnitude of a single path shrinks with
its length (b), so the *total* gradient magnitude per length, ``C(n, k)`` x the mean magnitude of one
path's gradient, peaks at short lengths (c); the effective paths are the band of lengths that
carries most of it (5-17 of 54 blocks for their ResNet-110). Only sampling single paths estimates
that quantity (``sampled_path_magnitudes``).

The exact stack (``path_gradient_stack``) answers a different question: ``||G[k]||`` is the norm of
the *sum* of the ``C(n, k)`` path gradients of length ``k``, the net gradient that all length-k paths
carry together (``net_gradient_by_length``). Path gradients point in different directions and
partly cancel, so ``||G[k]|| <= C(n, k) x mean ||g_A||`` (triangle inequality), with equality only
when all paths of that length push the same way.
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


def _counts(df: pd.DataFrame, n: int) -> pd.DataFrame:
    df.insert(1, "n_paths", [comb(n, int(k)) for k in df["path_length"]])
    df.insert(2, "fraction", path_length_distribution(n)[df["path_length"].to_numpy()])
    return df


def net_gradient_by_length(stack: torch.Tensor) -> pd.DataFrame:
    """The net gradient each path length carries, from the exact stack (``path_gradient_stack``).

    Columns: ``path_length``; ``n_paths`` = C(n, k); ``fraction`` of all paths (Binomial pmf);
    ``net_gradient_norm``: ``||G[k]||`` per example (L2 over the image), averaged over examples -- the
    norm of the sum of all length-k path gradients, cancellation included; ``net_share``: its share of
    the sum over lengths.
    """
    n = stack.shape[0] - 1
    norm = stack.flatten(2).norm(dim=-1).mean(dim=1).double().cpu().numpy()
    df = _counts(pd.DataFrame({"path_length": np.arange(n + 1), "net_gradient_norm": norm}), n)
    df["net_share"] = df["net_gradient_norm"] / df["net_gradient_norm"].sum()
    return df


def sampled_path_magnitudes(samples: pd.DataFrame, n: int) -> pd.DataFrame:
    """Veit et al.'s Fig. 6 quantities from ``sampled_path_gradients``.

    Args:
        samples: its table (``path_length``, ``magnitude`` per sampled path).
        n: number of blocks of the net.

    Returns:
        Per sampled length: ``n_paths``, ``fraction``, ``per_path_magnitude`` (mean magnitude of one
        path's gradient, Fig. 6b), ``per_path_sem`` (its standard error), ``n_samples``,
        ``total_magnitude`` = ``n_paths * per_path_magnitude`` (Fig. 6c) and ``share`` (of the sampled
        lengths' total).
    """
    g = samples.groupby("path_length")["magnitude"]
    df = pd.DataFrame({"per_path_magnitude": g.mean(), "per_path_sem": g.sem(ddof=1),
                       "n_samples": g.size()}).reset_index()
    df = _counts(df, n)
    df["total_magnitude"] = df["n_paths"] * df["per_path_magnitude"]
    df["share"] = df["total_magnitude"] / df["total_magnitude"].sum()
    return df


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
        magnitudes: a table from ``sampled_path_magnitudes`` (or ``net_gradient_by_length``, with
            ``column="net_gradient_norm"``).
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
