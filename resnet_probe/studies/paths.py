"""Paths study (Veit, Wilber, Belongie 2016, Fig. 6): which path lengths carry a ResNet's gradient?

Question: a residual net of n blocks unrolls into 2^n paths, whose lengths (branches passed
through) follow Binomial(n, 1/2). How much gradient does a path of each length carry, and which
lengths carry most of the total (the *effective paths*)? Veit et al. found that in a 54-block
ResNet-110 the effective paths are 5-17 blocks long, far shorter than the network.

Paper figure: Veit et al. 2016, Fig. 6: (a) the path-length distribution, (b) the gradient
magnitude of a path at the input per length, (c) the total gradient magnitude per length
(distribution x per-path magnitude), with the effective-path band.

Two estimators of (b): Veit et al.'s sampled one (``resnet_probe.paths.sampled_path_gradients``:
single paths of length k drawn at random, mean magnitude) and the exact one
(``path_gradient_stack``: one backward pass carrying a cotangent per length; its entries sum to the
autograd gradient, which the study checks). The exact per-path magnitude is the magnitude of the
*mean* path gradient of each length, so it is smaller where path gradients cancel.

Models: residual / pre-activation CIFAR nets and torchvision ResNets (``CHECKPOINT...``, ``train_zoo``
folders, or nets trained here).

Result at quick scale (the residual-20 of the lesion study's quick run: CIFAR-10 JPEG pack, 5,000
images, 3 epochs, seed 0; 64 test images, 20 sampled paths per length; 2 shared AMD EPYC CPU cores):
the gradient of one path falls with its length (exact: 0.017 at length 0, 0.0006 at 5-7), so the
total magnitude peaks at length 4 against a mean path length of 4.5 and the effective paths (90 %
of the total) are lengths 1-6 of 9, by either estimator. The exact stack sums to the autograd
gradient to a relative 3e-7. Nine blocks leave little room for the shift Veit et al. saw in 54
(5-17 of 54): that needs ``--scale paper``.
"""
from __future__ import annotations

from math import comb
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .analysis_inputs import add_model_arguments, check_labels, open_analysis, study_models
from .options import study_parser

ADDITIVE_FAMILIES = ("residual", "preact")
QUICK: dict[str, Any] = dict(
    n_examples=64,              # images whose input gradient is decomposed
    exact_batch=32,             # images per exact backward pass (memory: (n + 1) cotangents per image)
    n_samples=20,               # sampled single paths per length k (Veit et al.: 1,000)
    sets_per_pass=32,           # sampled paths backpropagated together
    mass=0.9,                   # share of the total gradient magnitude the effective band holds
    n_resamples=200,            # bootstrap resamples (intervals over images)
    families=("residual",), depth=20,                  # nets trained when no checkpoint is given
    recipe="fast", lr=0.2, epochs=3, train_limit=5000, val_size=1000, augment=False)
PAPER: dict[str, Any] = dict(
    n_examples=256, exact_batch=32, n_samples=1000, sets_per_pass=64, mass=0.9, n_resamples=1000,
    families=("residual",), depth=110,                 # Veit et al.: ResNet-110, 54 blocks
    recipe="paper", lr=0.1, epochs=182, train_limit=None, val_size=5000, augment=True)


def build_parser():
    p = study_parser("paths", "Path-length distribution, gradient per path length (exact and sampled) and the "
                              "effective paths of residual networks (Veit et al. 2016, Fig. 6).")
    add_model_arguments(p, families=ADDITIVE_FAMILIES)
    p.add_argument("--n-examples", dest="n_examples", type=int, default=None, help="images decomposed")
    p.add_argument("--n-samples", dest="n_samples", type=int, default=None, help="sampled paths per length")
    p.add_argument("--mass", type=float, default=None, help="share of the gradient the effective band holds")
    return p


def exact_norms(model, x, y, batch: int) -> tuple[np.ndarray, float]:
    """Per-image ``||G[k]||`` (L2 over the image) of the exact stack, ``(n + 1, N)``, and the largest
    relative difference, over the chunks, between ``sum_k G[k]`` and the autograd input gradient."""
    from ..paths import path_gradient_stack
    norms, worst = [], 0.0
    for start in range(0, len(x), batch):
        xb, yb = x[start:start + batch], y[start:start + batch]
        stack = path_gradient_stack(model, xb, yb)
        xg = xb.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), yb, reduction="sum"), xg)
        worst = max(worst, float((stack.sum(0) - grad).norm() / grad.norm().clamp_min(1e-30)))
        norms.append(stack.flatten(2).norm(dim=-1).double().cpu())
    return torch.cat(norms, dim=1).numpy(), worst


def exact_table(norms: np.ndarray, s: dict, seed: int) -> tuple[pd.DataFrame, dict]:
    """Exact per-length magnitudes (``exact_path_magnitudes``) and bootstrap intervals over images.

    Returns:
        The table and ``{metric: (lo, hi)}`` for ``gradient_norm``, ``per_path_magnitude`` and
        ``total_magnitude`` (each a fixed multiple of ``gradient_norm``: 1 / C(n, k) and 1 / 2^n).
    """
    from ..lesion import mean_ci
    from ..paths import exact_path_magnitudes
    # a stack holding one number per image and length has exactly these per-image norms
    df = exact_path_magnitudes(torch.from_numpy(norms).unsqueeze(-1))
    _, lo, hi = mean_ci(norms, n_resamples=s["n_resamples"], seed=seed)
    n = len(norms) - 1
    n_paths = np.array([comb(n, k) for k in range(n + 1)], dtype=float)
    bounds = {"gradient_norm": (lo, hi), "per_path_magnitude": (lo / n_paths, hi / n_paths),
              "total_magnitude": (lo / 2.0 ** n, hi / 2.0 ** n)}
    return df, bounds


def _tidy(df: pd.DataFrame, keys: dict, estimator: str, bounds: dict | None = None) -> pd.DataFrame:
    """Per-length magnitudes as tidy rows with ``lo`` / ``hi`` (bootstrap for exact, ± 1.96 SEM for sampled)."""
    parts = []
    for m in ("gradient_norm", "per_path_magnitude", "total_magnitude", "share"):
        if m not in df:
            continue
        part = pd.DataFrame({**keys, "site": "network", "estimator": estimator, "path_length": df["path_length"],
                             "n_paths": df["n_paths"].astype(float), "metric": m, "value": df[m],
                             "lo": np.nan, "hi": np.nan})
        if bounds is not None and m in bounds:
            part["lo"], part["hi"] = np.asarray(bounds[m][0], float), np.asarray(bounds[m][1], float)
        elif m == "per_path_magnitude" and "per_path_sem" in df:
            part["lo"] = df[m] - 1.96 * df["per_path_sem"]
            part["hi"] = df[m] + 1.96 * df["per_path_sem"]
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def analyse(sm, x, y, s: dict, keys: dict) -> dict[str, pd.DataFrame]:
    """Every table of one model: distribution, exact and sampled magnitudes, samples, effective band, check."""
    from ..paths import effective_paths, path_length_distribution, sampled_path_gradients, sampled_path_magnitudes
    n = len(sm.blocks)
    dist = pd.DataFrame({**keys, "site": "network", "path_length": np.arange(n + 1),
                         "n_paths": [float(comb(n, k)) for k in range(n + 1)], "metric": "fraction_of_paths",
                         "value": path_length_distribution(n)})
    norms, rel_err = exact_norms(sm.model, x, y, s["exact_batch"])
    exact, bounds = exact_table(norms, s, sm.seed)
    samples = sampled_path_gradients(sm.model, x, y, ks=list(range(n + 1)), samples_per_k=s["n_samples"],
                                     seed=sm.seed, sets_per_pass=s["sets_per_pass"])
    sampled = sampled_path_magnitudes(samples, n)
    magnitudes = pd.concat([_tidy(exact, keys, "exact", bounds), _tidy(sampled, keys, "sampled")], ignore_index=True)
    band_rows = []
    for estimator, table in (("exact", exact), ("sampled", sampled)):
        band = effective_paths(table, mass=s["mass"])
        for metric, value in (("band_lo", band.lo), ("band_hi", band.hi), ("band_share", band.share),
                              ("peak_length", float(table.loc[table["total_magnitude"].idxmax(), "path_length"]))):
            band_rows.append({**keys, "site": "network", "estimator": estimator, "metric": metric, "value": float(value)})
    band_rows.append({**keys, "site": "network", "estimator": "exact", "metric": "stack_sum_rel_error",
                      "value": rel_err})
    samples = samples.rename(columns={"magnitude": "value"}).assign(**keys, site="network",
                                                                    metric="single_path_gradient_magnitude")
    return {"distribution": dist, "path_gradients": magnitudes, "path_samples": samples,
            "effective_paths": pd.DataFrame(band_rows)}


def main(argv: list[str] | None = None) -> Path:
    """Run the paths study; returns the run folder."""
    from ..report import new_run
    args, s, device, data, config = open_analysis(build_parser(), argv, QUICK, PAPER)
    with new_run("paths", out=args.out, config=config, data=data.provenance, source_file=__file__, argv=argv,
                 title="Paths study: gradient per path length (Veit et al. 2016, Fig. 6)") as run:
        tables: dict[str, list[pd.DataFrame]] = {}
        for sm in study_models(args, s, data, device, run, families=ADDITIVE_FAMILIES):
            check_labels(sm, data)
            keys = {"run": run.path.name, "seed": sm.seed, "model": sm.name}
            print(f"paths: {sm.name} (seed {sm.seed}): {len(sm.blocks)} blocks, {len(data.labels)} images", flush=True)
            x = data.images.to(next(sm.model.parameters()).device)
            y = data.labels.to(x.device)
            for name, df in analyse(sm, x, y, s, keys).items():
                tables.setdefault(name, []).append(df)
                run.add_table(name, pd.concat(tables[name], ignore_index=True))
        write_report(run, s, data)
    return run.path


def headline(bands: pd.DataFrame) -> pd.DataFrame:
    """Per model: blocks, effective band (exact and sampled), peak length, exactness check."""
    from ..report import format_mean_std
    rows = []
    for model, g in bands.groupby("model", sort=False):
        def vals(metric, estimator="exact"):
            return g.loc[(g["metric"] == metric) & (g["estimator"] == estimator), "value"].to_numpy()
        row = {"model": model, "seeds": int(g["seed"].nunique())}
        for est in ("exact", "sampled"):
            lo, hi, share = vals("band_lo", est), vals("band_hi", est), vals("band_share", est)
            if len(lo) == 1:
                row[f"effective paths ({est})"] = f"lengths {lo[0]:.0f}-{hi[0]:.0f} ({100 * share[0]:.0f} %)"
            else:
                row[f"effective paths ({est})"] = (f"from {format_mean_std(lo)} to {format_mean_std(hi)}")
        row["peak of total magnitude (exact)"] = format_mean_std(vals("peak_length"), digits=0)
        row["max |sum_k G[k] - autograd| / |autograd|"] = f"{vals('stack_sum_rel_error').max():.1e}"
        rows.append(row)
    return pd.DataFrame(rows)


def write_report(run, s: dict, data) -> None:
    """Texts, figures (Veit et al. Fig. 6 a-c) and the headline of a paths run."""
    bands = run.table("effective_paths")
    run.add_headline(headline(bands), title=f"Effective paths: the shortest band of lengths holding "
                                            f"{100 * s['mass']:.0f} % of the total gradient magnitude")
    run.add_text("Question", "A residual net of n blocks is an ensemble of 2^n paths; a path of length k passes "
                 "through k branches and n - k shortcuts. Which lengths carry the gradient? (Veit et al. 2016, "
                 "section 5: in ResNet-110 the effective paths are 5-17 blocks long.)")
    run.add_text("Method", f"Gradient of the summed cross-entropy at the input image, on {len(data.labels):,} "
                 f"evaluation images ({data.provenance.get('description', data.kind)}), in eval mode. *Exact*: "
                 "one backward pass carrying a cotangent per path length, G'[k] = S^T D G[k] + J_F^T D G[k-1]; "
                 "its entries sum to the autograd gradient (checked, last headline column). Per path: "
                 "||G[k]|| / C(n, k), the magnitude of the mean length-k path gradient; interval: 95 % "
                 f"bootstrap over images. *Sampled* (Veit et al.): {s['n_samples']} random single paths per "
                 "length, the mean of their magnitudes; interval: ± 1.96 standard errors over paths. Total per "
                 "length: fraction of paths x per-path magnitude.")
    common = dict(x="path_length", hue="model", xlabel="path length k (branches on the path)")
    run.add_figure("path_length_distribution", "line", "distribution", section="Figures (Veit et al. 2016, Fig. 6)",
                   ylabel="fraction of all 2^n paths", title="(a) Path lengths: Binomial(n, 1/2)", markers=True,
                   **common)
    run.add_figure("per_path_gradient", "line", "path_gradients", section="Figures (Veit et al. 2016, Fig. 6)",
                   query="metric == 'per_path_magnitude'", style="estimator", lo="lo", hi="hi", logy=True,
                   ylabel="gradient magnitude of one path", title="(b) Gradient magnitude per path", **common)
    run.add_figure("total_gradient", "line", "path_gradients", section="Figures (Veit et al. 2016, Fig. 6)",
                   query="metric == 'share'", style="estimator", markers=True,
                   ylabel="share of the total gradient magnitude",
                   title="(c) Total gradient magnitude per path length", caption=(
                       "Fraction of paths x per-path magnitude, as a share of its sum over lengths; the "
                       "headline gives the effective band of each estimator."), **common)
