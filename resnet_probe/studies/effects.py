"""The quickstart's headline: the three central effects of the papers, each with an interval and a verdict.

(1) Degradation (He et al. 2016, Fig. 1): the depth gap of plain nets (training error of the deeper
    net minus the shallower, eval mode, the same training images) is positive, and larger than that
    of residual nets. Estimate: the plain gap minus the residual gap.
(2) Response size (He et al. 2016, Fig. 7): the mean branch response std over blocks is smaller in
    the residual net than in the plain net of the same depth. Estimate: plain minus residual.
(3) Deletion (Veit et al. 2016, Fig. 3): deleting one non-downsampling block hurts a residual net
    far less than a plain net. Estimate: the plain net's mean error increase minus the residual net's.

Each estimate is a difference whose sign the paper predicts (positive). With one seed its 95 %
interval is a paired bootstrap over the evaluation images (the images both nets saw); with several
seeds, a Student-t interval over the seeds. The verdict reads "consistent with the paper" only when
the whole interval lies above zero, "opposite to the paper" when it lies below, and "not resolved at
this scale" otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..lesion import bootstrap_mean_ci
from ..report import format_ci
from ..report import t_mean_ci
from .response_std import bootstrap_draws, summary_draws

CONSISTENT, OPPOSITE, UNRESOLVED = "consistent with the paper", "opposite to the paper", "not resolved at this scale"


@dataclass(frozen=True)
class Effect:
    """One effect's estimate (a difference the paper predicts positive) and its 95 % interval."""

    value: float
    lo: float
    hi: float
    how: str  # how the interval was made

    @property
    def verdict(self) -> str:
        if not (np.isfinite(self.lo) and np.isfinite(self.hi)):
            return UNRESOLVED
        return CONSISTENT if self.lo > 0 else OPPOSITE if self.hi < 0 else UNRESOLVED


def _combine(per_seed: dict[int, tuple[np.ndarray | float, float, float]], unit: str) -> Effect:
    """One seed: its paired bootstrap; several: the mean over seeds with a Student-t interval."""
    if len(per_seed) == 1:
        value, lo, hi = next(iter(per_seed.values()))
        return Effect(float(value), float(lo), float(hi), "paired 95 % bootstrap over images")
    mean, lo, hi = t_mean_ci([v for v, _, _ in per_seed.values()])
    return Effect(mean, lo, hi, f"95 % Student-t interval over {len(per_seed)} seeds")


def degradation_effect(train_errors: pd.DataFrame, n_resamples: int) -> tuple[Effect, dict[str, Effect]]:
    """(1): per family the depth gap (pp), and plain gap minus residual gap, paired over training images."""
    families = {}
    diff: dict[int, tuple] = {}
    per_family: dict[str, dict[int, tuple]] = {}
    for seed, g in train_errors.groupby("seed"):
        gaps = {}
        for family, f in g.groupby("family"):
            depths = sorted(f["depth"].unique())
            if len(depths) < 2:
                continue
            deep = f[f["depth"] == depths[-1]].sort_values("image")["value"].to_numpy()
            shallow = f[f["depth"] == depths[0]].sort_values("image")["value"].to_numpy()
            gaps[family] = 100.0 * (deep - shallow)
            m, lo, hi = bootstrap_mean_ci(gaps[family], n_resamples=n_resamples, seed=int(seed))
            per_family.setdefault(family, {})[int(seed)] = (m[0], lo[0], hi[0])
        if "plain" in gaps and "residual" in gaps:
            m, lo, hi = bootstrap_mean_ci(gaps["plain"] - gaps["residual"], n_resamples=n_resamples, seed=int(seed))
            diff[int(seed)] = (m[0], lo[0], hi[0])
    for family, per_seed in per_family.items():
        families[family] = _combine(per_seed, "pp")
    nan = Effect(np.nan, np.nan, np.nan, "")
    return (_combine(diff, "pp") if diff else nan), families


def response_effect(groups: pd.DataFrame, plain: str, residual: str, n_resamples: int) -> tuple[Effect, dict]:
    """(2): mean branch response std, plain minus residual, resampling the same image groups for both nets."""
    per_seed, values = {}, {}
    for seed, g in groups.groupby("seed"):
        a, b = g[g["model"] == plain], g[g["model"] == residual]
        if a.empty or b.empty:
            continue
        n_groups = a["group"].nunique()
        draws = np.vstack([np.arange(n_groups), bootstrap_draws(n_groups, n_resamples, int(seed))])
        pa, pb = summary_draws(a, "branch", draws), summary_draws(b, "branch", draws)
        d = pa - pb
        lo, hi = np.percentile(d[1:], [2.5, 97.5])
        per_seed[int(seed)] = (d[0], lo, hi)
        values.setdefault("plain", []).append(pa[0])
        values.setdefault("residual", []).append(pb[0])
    if not per_seed:
        return Effect(np.nan, np.nan, np.nan, ""), values
    return _combine(per_seed, ""), values


def deletion_effect(per_image: pd.DataFrame, plain: str, residual: str, n_resamples: int) -> Effect:
    """(3): mean error increase per deleted non-downsampling block, plain minus residual, paired over images."""
    per_seed = {}
    for seed, g in per_image.groupby("seed"):
        a = g[g["model"] == plain].sort_values("image")["value"].to_numpy()
        b = g[g["model"] == residual].sort_values("image")["value"].to_numpy()
        if len(a) and len(a) == len(b):
            m, lo, hi = bootstrap_mean_ci(a - b, n_resamples=n_resamples, seed=int(seed))
            per_seed[int(seed)] = (m[0], lo[0], hi[0])
    return _combine(per_seed, "pp") if per_seed else Effect(np.nan, np.nan, np.nan, "")


def cell(e: Effect, digits: int = 1, unit: str = "pp") -> str:
    """An effect as ``+4.2 pp [1.0, 7.5]``."""
    if not np.isfinite(e.value):
        return "n/a"
    text = format_ci(e.value, e.lo, e.hi, digits=digits, unit=unit)
    return text if text.startswith("-") else "+" + text
