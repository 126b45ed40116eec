"""Paths study (Veit, Wilber, Belongie 2016, Fig. 6): which path lengths carry a ResNet's gradient?

Question: a residual net of n blocks unrolls into 2^n paths, whose lengths (branches passed
through) follow Binomial(n, 1/2). How much gradient does a path of each length carry, and which
lengths carry most of the total (the *effective paths*)? Veit et al. found that in a 54-block
ResNet-110 the effective paths are 5-17 blocks long, far shorter than the network.

Paper figure: Veit et al. 2016, Fig. 6: (a) the path-length distribution, (b) the gradient
magnitude of one path per length, (c) the total gradient magnitude per length, C(n, k) x the mean
magnitude of one path's gradient, with the effective-path band. This study estimates (b) and (c) as
the paper did, by sampling single paths (``resnet_probe.paths.sampled_path_gradients``), and takes
the effective band and its peak from them.

Beside it, the exact split of the input gradient by path length (``path_gradient_stack``, one
backward pass carrying a cotangent per length; its entries sum to the autograd gradient, which the
study checks) gives ``||G[k]||``: the *net* gradient of all length-k paths together. Path gradients
partly cancel, so it is at most (and usually well below) Veit's total; it is reported under its own
name, never as Veit's quantity.

Models: residual / pre-activation CIFAR nets and torchvision or timm ResNets (model sources,
``train_zoo`` folders, or nets trained here).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from math import comb
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..lesion import bootstrap_mean_ci
from ..paths import (check_additive, effective_paths, net_gradient_by_length, path_gradient_stack,
                     path_length_distribution, sampled_path_gradients, sampled_path_magnitudes)
from ..models import anatomy
from ..report import format_mean_std
from ..shards import Shard, environment_shard
from .analysis import analysis_run
from .spec import StudyCommand
from .inputs import StudyData, StudyModel, Zoo
from .runs import StudyResult
from .train_zoo import ZooSettings

ADDITIVE_FAMILIES = ("residual", "preact")
TITLE = "Paths study: gradient per path length (Veit et al. 2016, Fig. 6)"
SECTION = "Figures (Veit et al. 2016, Fig. 6)"


@dataclass(frozen=True)
class PathsSettings:
    """Sizes of the paths study.

    Args:
        n_examples: images whose input gradient is decomposed.
        exact_batch: images per exact backward pass (memory: n + 1 cotangents per image).
        n_samples: sampled single paths per length k (Veit et al.: 1,000).
        sets_per_pass: sampled paths backpropagated together.
        mass: share of the total gradient magnitude the effective band holds.
        n_resamples: bootstrap resamples (intervals over images).
    """

    n_examples: int = 64
    exact_batch: int = 32
    n_samples: int = 20
    sets_per_pass: int = 32
    mass: float = 0.9
    n_resamples: int = 200

    def __post_init__(self) -> None:
        for name in ("n_examples", "exact_batch", "n_samples", "sets_per_pass", "n_resamples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if not 0 < self.mass <= 1:
            raise ValueError(f"mass must be in (0, 1]; got {self.mass}")

    @classmethod
    def quick(cls) -> "PathsSettings":
        return cls()

    @classmethod
    def paper(cls) -> "PathsSettings":
        """Veit et al.: 1,000 sampled paths per length of ResNet-110."""
        return cls(n_examples=256, n_samples=1000, sets_per_pass=64, n_resamples=1000)

    @classmethod
    def tiny(cls) -> "PathsSettings":
        return cls(n_examples=8, exact_batch=8, n_samples=3, sets_per_pass=8, n_resamples=20)


def trained_nets(scale: str) -> ZooSettings:
    """The nets trained when no model is given: one residual net (ResNet-110 at paper scale, as Veit et al.)."""
    if scale == "paper":
        return ZooSettings.paper().only(("residual",), (110,))
    base = ZooSettings.tiny() if scale == "tiny" else replace(
        ZooSettings.quick(), lr=0.2, train_limit=5000, batch_size=128, val_every_n_steps=40)
    return base.only(("residual",), (base.depths["residual"][-1],))


def check_model(sm: StudyModel) -> None:
    """Raise unless every block adds an identity-style shortcut to its branch (see ``check_additive``)."""
    try:
        check_additive(anatomy(sm.model))
    except ValueError as e:
        raise ValueError(f"{sm.name}: {e}") from None


def exact_norms(model, x, y, batch: int, shard: Shard | None = None) -> tuple[np.ndarray, float]:
    """Per-image ``||G[k]||`` (L2 over the image) of the exact stack, ``(n + 1, N)``, and the largest
    relative difference, over the chunks, between ``sum_k G[k]`` and the autograd input gradient.

    With a ``shard``, only this rank's contiguous chunks are computed and every rank's norms gathered
    in image order (``resnet_probe.shards``)."""
    norms, worst = [], 0.0
    starts = list(range(0, len(x), batch))
    if shard is not None:
        starts = shard.units(starts)
    for start in starts:
        xb, yb = x[start:start + batch], y[start:start + batch]
        stack = path_gradient_stack(model, xb, yb)
        xg = xb.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), yb, reduction="sum"), xg)
        worst = max(worst, float((stack.sum(0) - grad).norm() / grad.norm().clamp_min(1e-30)))
        norms.append(stack.flatten(2).norm(dim=-1).double().cpu())
    if shard is None:
        return torch.cat(norms, dim=1).numpy(), worst
    parts = shard.gather_objects((torch.cat(norms, dim=1).numpy() if norms else None, worst), "exact path norms")
    return np.concatenate([p for p, _ in parts if p is not None], axis=1), max(w for _, w in parts)


def net_gradient_table(norms: np.ndarray, keys: dict, s: PathsSettings, seed: int) -> pd.DataFrame:
    """Tidy rows of the exact net gradient per length (``net_gradient_norm``, bootstrap interval over images,
    and ``net_share``)."""
    df = net_gradient_by_length(torch.from_numpy(norms).unsqueeze(-1))  # one number per image: these norms
    _, lo, hi = bootstrap_mean_ci(norms, n_resamples=s.n_resamples, seed=seed)
    base = {**keys, "site": "network", "estimator": "exact", "path_length": df["path_length"],
            "n_paths": df["n_paths"].astype(float)}
    return pd.concat([pd.DataFrame({**base, "metric": "net_gradient_norm", "value": df["net_gradient_norm"],
                                    "lo": lo, "hi": hi}),
                      pd.DataFrame({**base, "metric": "net_share", "value": df["net_share"],
                                    "lo": np.nan, "hi": np.nan})], ignore_index=True)


def sampled_table(sampled: pd.DataFrame, keys: dict) -> pd.DataFrame:
    """Tidy rows of Veit's quantities per length (per-path magnitude with ± 1.96 SEM, total, share)."""
    base = {**keys, "site": "network", "estimator": "sampled", "path_length": sampled["path_length"],
            "n_paths": sampled["n_paths"].astype(float)}
    parts = []
    for m in ("per_path_magnitude", "total_magnitude", "share"):
        lo = hi = np.nan
        if m == "per_path_magnitude":
            lo = sampled[m] - 1.96 * sampled["per_path_sem"]
            hi = sampled[m] + 1.96 * sampled["per_path_sem"]
        parts.append(pd.DataFrame({**base, "metric": m, "value": sampled[m], "lo": lo, "hi": hi}))
    return pd.concat(parts, ignore_index=True)


def band_rows(table: pd.DataFrame, column: str, estimator: str, keys: dict, mass: float) -> list[dict]:
    band = effective_paths(table, mass=mass, column=column)
    peak = float(table.loc[table[column].idxmax(), "path_length"])
    return [{**keys, "site": "network", "estimator": estimator, "metric": metric, "value": float(value)}
            for metric, value in (("band_lo", band.lo), ("band_hi", band.hi), ("band_share", band.share),
                                  ("peak_length", peak))]


def measure(s: PathsSettings, shard: Shard | None = None):
    """The paths measurement of one model; with a ``shard``, each rank takes its batches of ``exact_batch``
    images and every rank returns one process's tables."""
    def one(sm: StudyModel, x, y, keys: dict) -> dict[str, pd.DataFrame]:
        n = len(sm.blocks)
        dist = pd.DataFrame({**keys, "site": "network", "path_length": np.arange(n + 1),
                             "n_paths": [float(comb(n, k)) for k in range(n + 1)], "metric": "fraction_of_paths",
                             "value": path_length_distribution(n)})
        norms, rel_err = exact_norms(sm.model, x, y, s.exact_batch, shard)
        samples = sampled_path_gradients(sm.model, x, y, ks=list(range(n + 1)), samples_per_k=s.n_samples,
                                         seed=sm.seed, sets_per_pass=s.sets_per_pass, batch_size=s.exact_batch,
                                         shard=shard)
        sampled = sampled_path_magnitudes(samples, n)
        net = net_gradient_by_length(torch.from_numpy(norms).unsqueeze(-1))
        bands = (band_rows(sampled, "total_magnitude", "sampled", keys, s.mass)
                 + band_rows(net, "net_gradient_norm", "exact", keys, s.mass)
                 + [{**keys, "site": "network", "estimator": "exact", "metric": "stack_sum_rel_error",
                     "value": rel_err}])
        return {"distribution": dist,
                "path_gradients": pd.concat([sampled_table(sampled, keys),
                                             net_gradient_table(norms, keys, s, sm.seed)], ignore_index=True),
                "path_samples": samples.rename(columns={"magnitude": "value"}).assign(
                    **keys, site="network", metric="single_path_gradient_magnitude"),
                "effective_paths": pd.DataFrame(bands)}
    return one


def run(settings: PathsSettings, models: Zoo | Sequence | None, data: StudyData, *, out: str | Path = "runs",
        seeds: Sequence[int] = (0,), device: str = "auto", train: ZooSettings | None = None,
        scale: str | None = None) -> StudyResult:
    """Decompose the input gradient of ``models`` (or of a net trained here) by path length.

    Under torchrun the images are split over the ranks (``resnet_probe.shards``)."""
    shard = environment_shard(device)
    return analysis_run("paths", title=TITLE, source_file=__file__, settings=settings, models=models, data=data,
                        out=out, seeds=seeds, device=device, train=train or trained_nets(scale or "quick"),
                        scale=scale, measure=measure(settings, shard), check=check_model, shard=shard,
                        report=lambda r, tables, d, n: write_report(r, tables, settings, d, n))


def headline(bands: pd.DataFrame, n_blocks: pd.Series) -> pd.DataFrame:
    """Per model: blocks, Veit's effective band and peak (sampled), the net-gradient band (exact), the check."""
    rows = []
    for model, g in bands.groupby("model", sort=False):
        def vals(metric, estimator):
            return g.loc[(g["metric"] == metric) & (g["estimator"] == estimator), "value"].to_numpy()

        def band(estimator):
            lo, hi, share = vals("band_lo", estimator), vals("band_hi", estimator), vals("band_share", estimator)
            if len(lo) == 1:
                return f"lengths {lo[0]:.0f}-{hi[0]:.0f} ({100 * share[0]:.0f} %)"
            return f"from {format_mean_std(lo)} to {format_mean_std(hi)}"
        rows.append({"model": model, "blocks": int(n_blocks.get(model, 0)), "seeds": int(g["seed"].nunique()),
                     "effective paths (Veit: sampled total magnitude)": band("sampled"),
                     "peak length (sampled)": format_mean_std(vals("peak_length", "sampled"), digits=0)
                     .replace(" (n=1)", ""),
                     "net gradient band (exact, cancellation included)": band("exact"),
                     "max |sum_k G[k] - autograd| / |autograd|":
                         f"{vals('stack_sum_rel_error', 'exact').max():.1e}"})
    return pd.DataFrame(rows)


def write_report(run, tables: dict[str, pd.DataFrame], s: PathsSettings, data: StudyData, n_images: int) -> None:
    """Texts, figures (Veit et al. Fig. 6 a-c, and the exact net gradient) and the headline of a paths run."""
    models = tables["models"]
    n_blocks = models[models["metric"] == "n_blocks"].groupby("model")["value"].first()
    run.add_headline(headline(tables["effective_paths"], n_blocks),
                     title=f"Effective paths: the shortest band of lengths holding {100 * s.mass:.0f} % of the "
                           "gradient")
    run.add_text("Question", "A residual net of n blocks is an ensemble of 2^n paths; a path of length k passes "
                 "through k branches and n - k shortcuts. Which lengths carry the gradient? (Veit et al. 2016, "
                 "section 5: in ResNet-110 the effective paths are 5-17 blocks long.)")
    run.add_text("Method", f"Gradient of the summed cross-entropy at the input image, on {n_images:,} evaluation "
                 f"images ({data.describe()}), in eval mode. *Sampled* (Veit et al.): {s.n_samples} random single "
                 "paths per length k; the magnitude of one path's gradient is averaged over them (interval: "
                 "± 1.96 standard errors over paths), and the total per length is C(n, k) x that mean (Fig. 6c); "
                 "the effective band and the peak are read from it. *Exact*: one backward pass carrying a "
                 "cotangent per path length, G'[k] = S^T D G[k] + J_F^T D G[k-1], whose entries sum to the "
                 "autograd gradient (checked, last headline column); ||G[k]|| is the net gradient of all "
                 "length-k paths together (interval: 95 % bootstrap over images).")
    run.add_text("Why the two differ", "||G[k]|| is the norm of a sum of C(n, k) path gradients, Veit's total the "
                 "sum of their norms: paths that push the input gradient in different directions cancel in the "
                 "first and not in the second, so the exact net gradient is at most Veit's total, and its band "
                 "can sit elsewhere. They coincide only when all paths of a length point the same way.")
    common = dict(x="path_length", hue="model", xlabel="path length k (branches on the path)")
    run.add_figure("path_length_distribution", "line", "distribution", section=SECTION,
                   ylabel="fraction of all 2^n paths", title="(a) Path lengths: Binomial(n, 1/2)", markers=True,
                   **common)
    run.add_figure("per_path_gradient", "line", "path_gradients", section=SECTION,
                   query="metric == 'per_path_magnitude'", lo="lo", hi="hi", logy=True, markers=True,
                   ylabel="gradient magnitude of one path", title="(b) Gradient magnitude per path (sampled)",
                   **common)
    run.add_figure("total_gradient", "line", "path_gradients", section=SECTION, query="metric == 'share'",
                   markers=True, ylabel="share of the total gradient magnitude",
                   title="(c) Total gradient magnitude per path length (sampled)", caption=(
                       "C(n, k) x the mean magnitude of one path's gradient, as a share of its sum over lengths; "
                       "the headline gives the effective band."), **common)
    run.add_figure("net_gradient", "line", "path_gradients", section="Net gradient per path length (exact)",
                   query="metric in ['share', 'net_share']", style="estimator", markers=True,
                   ylabel="share of the sum over lengths",
                   title="Net gradient of all length-k paths (exact) beside Veit's total (sampled)", caption=(
                       "Solid: ||G[k]||, the norm of the sum of the length-k path gradients, from the exact stack; "
                       "dashed: Veit's total, C(n, k) x the mean single-path magnitude. The gap is the cancellation "
                       "between paths."), **common)


COMMAND = StudyCommand(
    name="paths", run=run, settings=PathsSettings, inputs="models", sharded=True, train=trained_nets,
    families=ADDITIVE_FAMILIES,
    description="Path-length distribution, gradient magnitude per path length (sampled, as Veit et al. 2016, "
                "Fig. 6) and the exact net gradient per length, with the effective paths of residual networks.")
