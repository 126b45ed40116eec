"""Layer response std (He et al. 2016, Fig. 7): residual functions are closer to zero than plain layers.

Question: if residual nets learn functions that are small perturbations of the identity, the
responses of their branch layers should be smaller than those of the same layers in a plain net.

Measured, for every model given: the *response* of each layer of every block's branch -- its output
after BN, before ReLU or the addition -- as the std over all (N, C, H, W) values of the evaluation
images (``std``, the quantity of He et al. Fig. 7) and as the mean over channels of the per-channel
std (``channel_std_mean``); per block the branch output ``F(x)`` (the last layer's response) and the
ratio ``||F(x)|| / ||S(x)||``. Models run in eval mode (BN with its running statistics) on CIFAR-10
test images (a seeded subset) or, for ImageNet models, on an image folder (``--data imagefolder=PATH``).

Uncertainty: the images are measured in groups of ``group_size``, and each group's count, sum and sum
of squares per site are kept (table ``groups``); resampling whole groups with replacement and pooling
their sums gives a bootstrap interval of every std over the evaluation images (a cluster bootstrap,
exact pooling, no mean of means).

Figure: response std per layer in the network's order and sorted by magnitude (He et al. Fig. 7).
Headline: per model, the mean over blocks of the branch response std and over layers of the layer
response std, with 95 % bootstrap intervals over images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..probes import probe
from ..report import format_ci, format_mean_std
from ..shards import Shard, environment_shard
from .analysis import analysis_run
from .spec import StudyCommand
from .inputs import StudyData, StudyModel, Zoo
from .runs import StudyResult
from .train_zoo import ZooSettings

TITLE = "Layer responses (He et al. 2016, Fig. 7)"
METRICS = {"std": "response_std", "channel_std_mean": "response_channel_std_mean"}
SITES = ["*.branch.*", "*.branch", "*.shortcut"]
SUMMARY = {"mean_layer_response_std": ("layer", "mean layer response std"),
           "mean_branch_response_std": ("branch", "mean branch F(x) std")}


@dataclass(frozen=True)
class ResponseSettings:
    """Sizes of the response-std study.

    Args:
        n_examples: evaluation images the responses are measured on.
        batch_size: images per forward pass.
        group_size: images per group of the bootstrap over images (groups are resampled whole).
        n_resamples: bootstrap resamples.
    """

    n_examples: int = 1000
    batch_size: int = 250
    group_size: int = 25
    n_resamples: int = 1000

    def __post_init__(self) -> None:
        for name in ("n_examples", "batch_size", "group_size", "n_resamples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")

    @classmethod
    def quick(cls) -> "ResponseSettings":
        return cls()

    @classmethod
    def paper(cls) -> "ResponseSettings":
        """He et al. Fig. 7: the 10,000 CIFAR-10 test images."""
        return cls(n_examples=10_000, batch_size=500, group_size=100)

    @classmethod
    def tiny(cls) -> "ResponseSettings":
        return cls(n_examples=64, batch_size=64, group_size=8, n_resamples=100)


def trained_nets(scale: str) -> ZooSettings:
    """The nets trained when no model is given: those of ``train_zoo`` at that scale."""
    return getattr(ZooSettings, scale)()


def layer_responses(model, images, batch_size: int = 250, group_size: int | None = None,
                    shard: Shard | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Response statistics of every branch layer, branch output and shortcut of ``model``.

    Args:
        model: any model ``resnet_probe.models.anatomy`` supports, in eval mode, on the images' device.
        images: normalised float images ``(N, C, H, W)``.
        batch_size: images per forward pass.
        group_size: images per bootstrap group (``None``: one group).
        shard: measure only this rank's contiguous groups (``resnet_probe.shards``); the streamed sums are
            all-reduced over the ranks and the group rows gathered in group order, so every rank returns one
            process's tables (group rows bit for bit, pooled statistics up to float64 summation order).

    Returns:
        The tidy rows ``site, stage, block, kind, layer`` (1-based position of the layer in forward order,
        for kind ``layer``), ``metric`` (``response_std``, ``response_channel_std_mean``, ``norm_ratio``),
        ``value``, ``downsampling``, ``path``; and per group and site its ``count``, ``sum`` and ``sumsq``
        (rows of the ``groups`` table, ``group`` numbering them).
    """
    group_size = group_size or len(images)
    starts = list(enumerate(range(0, len(images), group_size)))
    if shard is not None:
        starts = shard.units(starts)
    groups = []
    with torch.no_grad(), probe(model, sites=SITES) as whole, probe(model, sites=SITES) as part:
        for g, start in starts:
            chunk = images[start:start + group_size]
            for b in range(0, len(chunk), batch_size):
                model(chunk[b:b + batch_size])
            groups.append(group_sums(part.table(), g))
            part.reset()
        if shard is not None:
            shard.all_reduce_probes(whole)
            groups = [g for rank in shard.gather_objects(groups, "response groups") for g in rank]
    df = whole.table()
    df = df[df["metric"].isin(list(METRICS) + ["norm_ratio"])].copy()
    df["metric"] = df["metric"].map(lambda m: METRICS.get(m, m))
    layers = list(dict.fromkeys(df.loc[df["kind"] == "layer", "site"]))
    df["layer"] = df["site"].map({s: i + 1 for i, s in enumerate(layers)}).astype("Int64")
    return df.drop(columns=["step"]).reset_index(drop=True), pd.concat(groups, ignore_index=True)


def group_sums(table: pd.DataFrame, group: int) -> pd.DataFrame:
    """One group's ``count``, ``sum`` and ``sumsq`` per site, from a probe table: ``sum = count * mean`` and
    ``sumsq = count * rms^2`` (the probe's float64 sums, re-derived exactly up to rounding)."""
    t = table[table["metric"].isin(["count", "mean", "rms"])].pivot_table(
        index=["site", "kind"], columns="metric", values="value", sort=False).reset_index()
    t = t[t["kind"].isin(["layer", "branch"])]
    count = t["count"].to_numpy()
    long = []
    for metric, value in (("count", count), ("sum", count * t["mean"].to_numpy()),
                          ("sumsq", count * t["rms"].to_numpy() ** 2)):
        long.append(pd.DataFrame({"site": t["site"], "kind": t["kind"], "group": group, "metric": metric,
                                  "value": value}))
    return pd.concat(long, ignore_index=True)


def pooled_std(count: np.ndarray, total: np.ndarray, sumsq: np.ndarray) -> np.ndarray:
    """The unbiased std of values pooled from sums: ``sqrt((sumsq - total^2 / count) / (count - 1))``."""
    return np.sqrt(np.maximum(sumsq - total ** 2 / count, 0.0) / (count - 1))


def summary_draws(groups: pd.DataFrame, kind: str, draws: np.ndarray) -> np.ndarray:
    """The mean over sites of ``kind`` of each site's pooled std, for each row of ``draws`` (group indices
    resampled with replacement; a row of all groups gives the estimate)."""
    g = groups[groups["kind"] == kind]
    sites = list(dict.fromkeys(g["site"]))
    arr = g.pivot_table(index="group", columns=["metric", "site"], values="value")
    count, total, sumsq = (arr[m][sites].to_numpy() for m in ("count", "sum", "sumsq"))   # (groups, sites)
    pooled = [pooled_std(count[d].sum(0), total[d].sum(0), sumsq[d].sum(0)).mean() for d in draws]
    return np.asarray(pooled)


def bootstrap_draws(n_groups: int, n_resamples: int, seed: int) -> np.ndarray:
    """Resampled group indices, one row per bootstrap resample (the same rows pair two models)."""
    return np.random.default_rng(seed).integers(0, n_groups, size=(n_resamples, n_groups))


def summary_rows(responses: pd.DataFrame, groups: pd.DataFrame, n_resamples: int, seed: int) -> pd.DataFrame:
    """Per model and seed: the mean over layers of ``response_std`` and over blocks of the branch std, with
    95 % cluster-bootstrap intervals over images; and the mean ``norm_ratio``."""
    rows = []
    for (model, s), g in responses.groupby(["model", "seed"], sort=False):
        base = {"run": g["run"].iloc[0], "seed": s, "model": model, "site": "network"}
        mine = groups[(groups["model"] == model) & (groups["seed"] == s)]
        draws = bootstrap_draws(mine["group"].nunique(), n_resamples, seed)
        for metric, (kind, _) in SUMMARY.items():
            value = float(g.loc[(g["kind"] == kind) & (g["metric"] == "response_std"), "value"].mean())
            lo, hi = np.percentile(summary_draws(mine, kind, draws), [2.5, 97.5])
            rows.append({**base, "metric": metric, "value": value, "lo": lo, "hi": hi})
        ratio = g.loc[g["metric"] == "norm_ratio", "value"]
        rows.append({**base, "metric": "mean_norm_ratio", "value": float(ratio.mean()), "lo": np.nan, "hi": np.nan})
    return pd.DataFrame(rows)


def measure(s: ResponseSettings, shard: Shard | None = None):
    """The response measurement of one model; with a ``shard``, each rank takes its groups of images and every
    rank returns one process's tables."""
    def one(sm: StudyModel, x, y, keys: dict) -> dict[str, pd.DataFrame]:
        df, groups = layer_responses(sm.model, x, s.batch_size, s.group_size, shard)
        extra = {**keys, "family": sm.family, "depth": sm.depth}
        return {"responses": df.assign(**extra)[[*extra, *df.columns]],
                "groups": groups.assign(**extra)[[*extra, *groups.columns]]}
    return one


def run(settings: ResponseSettings, models: Zoo | Sequence | None, data: StudyData, *, out: str | Path = "runs",
        seeds: Sequence[int] = (0,), device: str = "auto", train: ZooSettings | None = None,
        scale: str | None = None) -> StudyResult:
    """Measure the layer responses of ``models`` (or of nets trained here) on ``data``'s evaluation images.

    Under torchrun the image groups are split over the ranks (``resnet_probe.shards``)."""
    shard = environment_shard(device)
    return analysis_run("response_std", title=TITLE, source_file=__file__, settings=settings, models=models,
                        data=data, out=out, seeds=seeds, device=device, train=train or trained_nets(scale or "quick"),
                        scale=scale, measure=measure(settings, shard), shard=shard,
                        report=lambda r, tables, d, n: _report(r, tables, settings, n, seeds[0]))


def _report(run, tables: dict[str, pd.DataFrame], s: ResponseSettings, n_images: int, seed: int) -> None:
    responses = tables["responses"]
    summary = summary_rows(responses, tables["groups"], s.n_resamples, seed)
    run.add_table("summary", summary)
    tables["summary"] = summary
    params = tables["models"][tables["models"]["metric"] == "parameters"].groupby("model")["value"].first()
    rows = []
    for model, g in summary.groupby("model", sort=False):
        row = {"model": model, "parameters": f"{int(params.get(model, 0)):,}"}
        for metric, label in [*((m, lab) for m, (_, lab) in SUMMARY.items()),
                              ("mean_norm_ratio", "mean ||F(x)|| / ||S(x)||")]:
            r = g[g["metric"] == metric]
            row[label] = (format_ci(r["value"].iloc[0], r["lo"].iloc[0], r["hi"].iloc[0], digits=3) if len(r) == 1
                          else format_mean_std(r["value"], digits=3))
        rows.append(row)
    run.add_headline(pd.DataFrame(rows), title="Response std per model: mean over blocks / layers "
                                               "[95 % bootstrap interval over images; ± std over seeds]")
    models = list(dict.fromkeys(responses["model"]))
    for name, metric, ylabel, title in (
            ("layer_std", "response_std", "response std",
             "Std of each layer's response after BN, before ReLU / addition (He et al. Fig. 7)"),
            ("layer_channel_std", "response_channel_std_mean", "mean per-channel std",
             "Mean over channels of the per-channel response std")):
        run.add_figure(name, "layer_profile", "responses", section="Layer responses", x="layer", hue="model",
                       hue_order=models, flag="downsampling", flag_label="downsampling block",
                       query=f"kind == 'layer' and metric == '{metric}'", errorbar="sd", xlabel="layer",
                       ylabel=ylabel, title=title,
                       caption=f"Std over all (N, C, H, W) values of {n_images:,} evaluation images. Left: layers in "
                               "forward order; right: the same values sorted by magnitude. Rings: layers of "
                               "downsampling blocks.")
    run.add_text("Reading", "He et al. (2016) report that residual nets have generally smaller layer responses "
                            "than their plain counterparts, and that deeper residual nets have smaller responses "
                            "still: the residual functions stay close to zero, so each block modifies its input "
                            "less. The ratio ||F(x)|| / ||S(x)|| measures that directly per block (plain blocks "
                            "have no shortcut in their forward pass; S(x) is the mapping a lesion would use). "
                            f"Intervals resample groups of {s.group_size} images ({s.n_resamples} resamples).")


COMMAND = StudyCommand(
    name="response_std", run=run, settings=ResponseSettings, inputs="models", sharded=True, train=trained_nets,
    description="He et al. Fig. 7: std of each branch layer's response (after BN, before ReLU / addition), in "
                "network order and sorted, for every model given.")
