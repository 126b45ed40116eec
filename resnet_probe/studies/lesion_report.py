"""The lesion study's report: derived tables, figures (Veit et al. 2016, Fig. 3, 5a, 5b), headline and text.

Every figure is drawn from a saved table. Error is top-1 test error in percent; ``loss`` is the
cross-entropy and ``kl`` is ``KL(p_intact || p_lesioned)``, both in nats per image. Intervals are
95 % bootstrap intervals over the test images (the deletion effect of a given model); where a point
pools several random sets or seeds, the figure shows the 95 % interval of their mean instead.
"""
from __future__ import annotations

import re

import pandas as pd
from scipy import stats

DOWNSAMPLING = "downsampling block (shortcut changes shape)"


def block_order(sites) -> list[str]:
    """Block names sorted by stage, then block number (``stage1.block2`` before ``stage1.block10``)."""
    def key(name: str):
        m = re.fullmatch(r"stage(\d+)\.block(\d+)", str(name))
        return (int(m[1]), int(m[2])) if m else (10 ** 6, 0)
    return sorted(pd.unique(pd.Series(list(sites))), key=key)


def importance_tables(single: pd.DataFrame, attribution: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Deletion effect and attribution per block, side by side.

    Args:
        single: the ``single_block`` table (needs ``error_increase_pp`` and ``kl`` rows).
        attribution: the ``attribution`` table (``metric`` = method, ``value`` = mean summed |attribution|).

    Returns:
        ``block_importance``: per model, seed, block and measure (``deletion: error increase``,
        ``deletion: KL``, ``attribution: <method>``) the block's ``share_of_total`` (its absolute value
        over the sum of absolute values over the model's blocks); ``importance_pairs``: per block the
        error increase (``value``, percentage points, with its interval) and each method's attribution
        (``attribution``) and its share of the model's total (``attribution_share``).
    """
    keys = ["run", "seed", "model", "site"]
    meta = single[keys + ["stage", "position", "downsampling"]].drop_duplicates(keys)
    parts = []
    for metric, measure in (("error_increase_pp", "deletion: error increase"), ("kl", "deletion: KL")):
        part = single.loc[single["metric"] == metric, keys + ["value"]].assign(measure=measure)
        parts.append(part)
    attr = attribution.groupby(keys + ["metric"], as_index=False, sort=False)["value"].mean()
    parts.append(attr.assign(measure="attribution: " + attr["metric"]).drop(columns="metric"))
    long = pd.concat(parts, ignore_index=True)
    total = long.groupby(["run", "seed", "model", "measure"])["value"].transform(lambda v: v.abs().sum())
    long["value"] = long["value"].abs() / total.where(total > 0)
    importance = meta.merge(long, on=keys).assign(metric="share_of_total")
    inc = single.loc[single["metric"] == "error_increase_pp", keys + ["downsampling", "value", "lo", "hi"]]
    pairs = inc.merge(attr.rename(columns={"metric": "method", "value": "attribution"}), on=keys)
    total = pairs.groupby(["run", "seed", "model", "method"])["attribution"].transform(lambda v: v.abs().sum())
    pairs["attribution_share"] = pairs["attribution"].abs() / total.where(total > 0)
    return importance, pairs.assign(metric="error_increase_pp")


def _fmt_ci(row, digits=1, unit="%") -> str:
    from ..report import format_ci
    return format_ci(row["value"], row.get("lo"), row.get("hi"), digits=digits, unit=unit)


def headline(single: pd.DataFrame, krand: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per model: intact error, single-block deletion effects, error at the largest k, rank agreement."""
    from ..report import format_mean_std
    rows = []
    for model, g in single.groupby("model", sort=False):
        k = krand[(krand["model"] == model) & (krand["metric"] == "error_percent")]
        intact = k[k["k"] == 0].groupby("seed").first()
        inc = g[g["metric"] == "error_increase_pp"]
        per_seed = inc.groupby("seed")
        kmax = int(k["k"].max())
        row = {"model": model, "seeds": int(g["seed"].nunique())}
        if len(intact) == 1:
            row["intact error"] = _fmt_ci(intact.iloc[0])
        else:
            row["intact error"] = format_mean_std(intact["value"], unit="%")
        plain_blocks = per_seed.apply(lambda d: d.loc[~d["downsampling"], "value"].median(), include_groups=False)
        ds_blocks = per_seed.apply(lambda d: d.loc[d["downsampling"], "value"].max(), include_groups=False)
        row["median Δ error, one non-downsampling block deleted"] = format_mean_std(plain_blocks, digits=2, unit="pp")
        row["largest Δ error, one downsampling block deleted"] = format_mean_std(ds_blocks, digits=2, unit="pp")
        at_k = k[k["k"] == kmax].groupby("seed")["value"].mean()
        row[f"error with {kmax} random blocks deleted"] = format_mean_std(at_k, unit="%")
        p = pairs[pairs["model"] == model]
        for method, q in p.groupby("method", sort=False):
            rho = [stats.spearmanr(d["attribution"].abs(), d["value"]).statistic for _, d in q.groupby("seed")
                   if d["value"].nunique() > 1 and d["attribution"].nunique() > 1]
            row[f"Spearman ρ(|{method}|, Δ error)"] = format_mean_std(rho, digits=2) if rho else "n/a"
        rows.append(row)
    return pd.DataFrame(rows)


def write_lesion_report(run, s: dict, data) -> None:
    """Add the derived tables, figures, headline and text to a lesion run."""
    single, krand = run.table("single_block"), run.table("k_random")
    order = block_order(single["site"])
    many = single["model"].nunique() > 3
    facet = dict(col="model", col_wrap=2) if many else dict(hue="model")
    intact = (krand[(krand["k"] == 0) & (krand["metric"] == "error_percent")]
              .groupby("model", sort=False)["value"].mean())
    intact_text = "; ".join(f"{m}: {v:.1f} %" for m, v in intact.items())
    run.add_text("Question", "If one block of a trained network is deleted, replacing its output by its shortcut, "
                 "does the network break? Veit, Wilber and Belongie (2016) found that a residual network "
                 "barely notices (except at downsampling blocks), while a plain network falls to chance: "
                 "a ResNet behaves like an ensemble of many paths of different lengths.")
    mode = ("ReLU(S(x)) (`zero_branch`)" if s["mode"] == "zero_branch" else "S(x) (`shortcut_only`)")
    run.add_text("Method", f"A deleted block outputs {mode}; downsampling blocks keep their projection / "
                 f"zero-pad shortcut; a highway block's gate is forced to carry (T = 0); a plain block becomes its "
                 f"parameter-free shortcut mapping. {len(data.labels):,} evaluation images "
                 f"({data.provenance.get('description', data.kind)}). Random deletions: {s['n_sets']} sets per k; "
                 f"reorderings: {s['reorder_sets']} orders per number of within-stage swaps. Intervals: 95 % "
                 f"bootstrap over images ({s['n_resamples']} resamples); the error increase is paired with the "
                 "intact net on the same images.")
    run.add_figure("single_block_error", "bar", "single_block", section="Single-block deletion",
                   query="metric == 'error_percent'", x="site", lo="lo", hi="hi", flag="downsampling",
                   flag_label=DOWNSAMPLING, order=order, xlabel="deleted block", ylabel="test error (%)",
                   title="Test error after deleting one block (Veit et al. 2016, Fig. 3)",
                   caption=f"Test error with each block deleted on its own. Intact error: {intact_text}.", **facet)
    run.add_figure("k_random_error", "line", "k_random", section="Deleting several blocks",
                   query="metric == 'error_percent'", x="k", hue="model", markers=True,
                   xlabel="blocks deleted at random, k", ylabel="test error (%)",
                   title="Error against the number of deleted blocks (Veit et al. 2016, Fig. 5a)",
                   caption="Mean over random deletion sets (band: 95 % interval of the mean over sets"
                           " and seeds); k = 0 is the intact network.")
    if "reorder" in run.tables:
        run.add_figure("reorder_error", "scatter", "reorder", section="Reordering blocks",
                       query="metric == 'error_percent'", x="kendall_tau", hue="model",
                       xlabel="Kendall's τ between the new and the trained block order", ylabel="test error (%)",
                       title="Error against the amount of reordering (Veit et al. 2016, Fig. 5b)",
                       caption="Each point is one order made by random swaps of two blocks of one stage "
                               "(non-downsampling blocks only); τ = 1 is the trained order.")
    else:
        run.add_text("Reordering blocks", "No model has a stage with two non-downsampling blocks, so no block "
                     "could be swapped; the reordering experiment needs a deeper network.")
    pairs = None
    if "attribution" in run.tables:
        importance, pairs = importance_tables(single, run.table("attribution"))
        run.add_table("block_importance", importance)
        run.add_table("importance_pairs", pairs)
        run.add_figure("attribution_vs_deletion", "bar", "block_importance", section="Attribution beside deletion",
                       x="site", hue="measure", order=order, flag="downsampling", flag_label=DOWNSAMPLING,
                       col="model", col_wrap=1, xlabel="block", ylabel="share of the model's total",
                       title="Block importance: deletion effect and captum attribution",
                       caption="Each measure's absolute value per block as a share of its sum over the model's "
                               "blocks, so deletion and attribution are on one scale.")
        run.add_figure("attribution_scatter", "scatter", "importance_pairs", section="Attribution beside deletion",
                       x="attribution_share", hue="model", col="method", lo="lo", hi="hi", flag="downsampling",
                       flag_label=DOWNSAMPLING, xlabel="block's share of the model's total |attribution|",
                       ylabel="Δ test error when deleted (pp)", title="Does attribution predict the deletion effect?",
                       caption="One point per block; error bars: paired 95 % bootstrap interval of the error "
                               "increase. The headline gives the Spearman rank correlation per method.")
    run.add_headline(headline(single, krand, pairs if pairs is not None else pd.DataFrame(
        columns=["model", "method", "seed", "attribution", "value"])),
        title="Lesion effects per model (± std over seeds; intervals: 95 % bootstrap)")
    if data.kind == "cifar" and any(str(m).startswith(("resnet", "resnext", "wide_resnet")) for m in intact.index):
        run.add_text("Data", "torchvision ImageNet models were evaluated on CIFAR images here: their error is "
                     "meaningless, but the KL to the intact outputs still measures how much each deletion "
                     "changes the function. Use --data imagefolder=PATH for ImageNet models.")
