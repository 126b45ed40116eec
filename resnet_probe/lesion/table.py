"""Tidy sweep tables: one row per variant, its mean error / loss / KL and bootstrap intervals."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import pandas as pd

from .bootstrap import bootstrap_mean_ci
from .engine import SetMetrics

METRICS = ("error", "loss", "kl")


@dataclass(frozen=True)
class SweepOptions:
    """Settings shared by every sweep.

    Attributes:
        batch_size: examples per chunk.
        max_batch: most rows (examples x variants) in one batched forward pass (``None``: by device).
        n_resamples: bootstrap resamples per confidence interval.
        confidence_level: of the bootstrap intervals.
        ci_method: ``percentile``, ``basic`` or ``BCa``.
        engine: ``batched`` or ``loop`` (the one-variant-at-a-time reference path).
        fold_bn: evaluate with BatchNorm folded into the convolutions (same logits up to rounding).
        shard: this rank's part of a sharded evaluation (``resnet_probe.shards.Shard``; ``None``: one
            process); every rank returns the table one process would.
    """

    batch_size: int = 256
    max_batch: int | None = None
    n_resamples: int = 200
    confidence_level: float = 0.95
    ci_method: str = "percentile"
    engine: str = "batched"
    fold_bn: bool = False
    shard: Any = None


def metrics_table(meta: list[dict], metrics: SetMetrics, options: SweepOptions, seed: int,
                  **attrs) -> pd.DataFrame:
    """Join per-variant descriptions with their mean metrics and confidence intervals.

    Columns added: ``error``, ``loss``, ``kl`` (mean over examples of top-1 error, cross-entropy and
    ``KL(p_intact || p_variant)``), each with ``_lo`` / ``_hi`` bootstrap bounds over examples.
    ``df.attrs`` holds the intact model's error and loss, the number of examples and the settings.
    """
    df = pd.DataFrame(meta)
    for name in METRICS:
        mean, lo, hi = bootstrap_mean_ci(getattr(metrics, name), n_resamples=options.n_resamples,
                               confidence_level=options.confidence_level, method=options.ci_method,
                               seed=seed)
        df[name], df[f"{name}_lo"], df[f"{name}_hi"] = mean, lo, hi
    df.attrs.update(intact_error=float(metrics.intact_error.mean()),
                    intact_loss=float(metrics.intact_loss.mean()),
                    n_examples=int(metrics.intact_error.shape[0]),
                    n_resamples=options.n_resamples, confidence_level=options.confidence_level,
                    ci_method=options.ci_method, seed=seed, **attrs)
    return df


def sweep_options(**options) -> SweepOptions:
    """``SweepOptions`` from keyword arguments, naming the valid ones on a typo."""
    valid = [f.name for f in fields(SweepOptions)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown sweep option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}")
    return SweepOptions(**options)
