"""Bootstrap confidence intervals of per-example means (``scipy.stats.bootstrap``).

Each interval resamples the test examples with replacement: the variation it reports is that of
the evaluation set, for a fixed model and a fixed lesion.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

BOOTSTRAP_METHODS = ("percentile", "basic", "BCa")

# Bound on the resampled array scipy materialises at once (rows x resamples x examples).
_MAX_ELEMENTS = 2 ** 25


def bootstrap_mean_ci(values: np.ndarray, *, n_resamples: int = 200, confidence_level: float = 0.95,
            method: str = "percentile", seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over examples of each row and its bootstrap confidence interval.

    Args:
        values: ``(rows, N)`` per-example values (one row per deletion set and metric).
        n_resamples: bootstrap resamples per row.
        confidence_level: e.g. 0.95.
        method: ``percentile``, ``basic`` or ``BCa`` (``scipy.stats.bootstrap``).
        seed: seeds the resampling; the same seed gives the same intervals.

    Returns:
        ``(mean, lo, hi)``, each of shape ``(rows,)``. A row whose values are all equal gets the
        degenerate interval ``[mean, mean]``.
    """
    if method not in BOOTSTRAP_METHODS:
        raise ValueError(f"unknown bootstrap method {method!r}; valid methods: {', '.join(BOOTSTRAP_METHODS)}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive; got {n_resamples}")
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    rows, n = values.shape
    mean = values.mean(axis=1)
    lo, hi = mean.copy(), mean.copy()
    varied = np.flatnonzero(values.max(axis=1) > values.min(axis=1)) if n > 1 else np.zeros(0, int)
    rng = np.random.default_rng(seed)
    batch = max(1, min(n_resamples, _MAX_ELEMENTS // max(1, n)))
    per_call = max(1, _MAX_ELEMENTS // max(1, n * batch))
    for start in range(0, len(varied), per_call):
        ids = varied[start:start + per_call]
        res = stats.bootstrap((values[ids],), np.mean, n_resamples=n_resamples, batch=batch,
                              vectorized=True, axis=-1, confidence_level=confidence_level,
                              method=method, rng=rng)
        lo[ids], hi[ids] = res.confidence_interval.low, res.confidence_interval.high
    return mean, lo, hi
