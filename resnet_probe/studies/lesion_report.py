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

from ..report import format_ci, format_mean_std

DOWNSAMPLING = "downsampling block (shortcut changes shape)"
NON_DOWNSAMPLING = "non-downsampling blocks"
DEGRADATION_DEPTH = 20   # layers: the deepest plain net He et al. (2016, Fig. 6) show training without degradation


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
    return format_ci(row["value"], row.get("lo"), row.get("hi"), digits=digits, unit=unit)


def role(family: str, depth: int) -> str:
    """How a network serves the comparison: plain nets deeper than 20 layers are *degraded* (He et al. 2016,
    Fig. 6: with the same recipe they end with a higher training error than plain-20)."""
    if family == "plain":
        return "plain comparison" if depth <= DEGRADATION_DEPTH else "plain, degraded (He et al. Fig. 6)"
    return family


def headline(single: pd.DataFrame, krand: pd.DataFrame, pairs: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    """One row per model: role, parameters, intact error, mean single-block deletion effect, error at the largest
    k, rank agreement of attribution and deletion."""
    rows = []
    params = models[models["metric"] == "parameters"].groupby("model")["value"].first()
    for model, g in single.groupby("model", sort=False):
        k = krand[(krand["model"] == model) & (krand["metric"] == "error_percent")]
        intact = k[k["k"] == 0].groupby("seed").first()
        kmax = int(k["k"].max())
        row = {"model": model, "role": role(g["family"].iloc[0], int(g["depth"].iloc[0])),
               "parameters": f"{int(params.get(model, 0)):,}", "seeds": int(g["seed"].nunique())}
        row["intact error"] = (_fmt_ci(intact.iloc[0]) if len(intact) == 1
                               else format_mean_std(intact["value"], unit="%"))
        effect = g[g["metric"] == "mean_error_increase_pp"]
        row["mean Δ error, one non-downsampling block deleted"] = (
            _fmt_ci(effect.iloc[0], unit="pp") if len(effect) == 1 else format_mean_std(effect["value"], unit="pp"))
        ds = g[(g["metric"] == "error_increase_pp") & g["downsampling"]].groupby("seed")["value"].max()
        row["largest Δ error, one downsampling block deleted"] = (
            format_mean_std(ds, digits=1, unit="pp").replace(" (n=1)", "") if len(ds) else "n/a (not deleted)")
        at_k = k[k["k"] == kmax].groupby("seed")["value"].mean()
        row["error with k random blocks deleted (largest k)"] = (
            format_mean_std(at_k, unit="%").replace(" (n=1)", "") + f" (k = {kmax})")
        p = pairs[pairs["model"] == model] if len(pairs) else pairs
        for method, q in p.groupby("method", sort=False):
            rho = [stats.spearmanr(d["attribution"].abs(), d["value"]).statistic for _, d in q.groupby("seed")
                   if d["value"].nunique() > 1 and d["attribution"].nunique() > 1]
            row[f"Spearman ρ(|{method}|, Δ error)"] = format_mean_std(rho, digits=2).replace(" (n=1)", "") \
                if rho else "n/a"
        rows.append(row)
    return pd.DataFrame(rows)


def write_lesion_report(run, tables: dict[str, pd.DataFrame], s, data, n_images: int) -> None:
    """Add the derived tables, figures, headline and text to a lesion run."""
    single, krand = tables["single_block"], tables["k_random"]
    order = block_order(single.loc[single["site"].str.startswith("stage"), "site"])
    many = single["model"].nunique() > 3
    facet = dict(col="model", col_wrap=2) if many else dict(hue="model")
    intact = (krand[(krand["k"] == 0) & (krand["metric"] == "error_percent")]
              .groupby("model", sort=False)["value"].mean())
    intact_text = "; ".join(f"{m}: {v:.1f} %" for m, v in intact.items())
    run.add_text("Question", "If one block of a trained network is deleted, replacing its output by its shortcut, "
                 "does the network break? Veit, Wilber and Belongie (2016) found that a residual network "
                 "barely notices (except at downsampling blocks), while a well-trained network without shortcuts "
                 "(their VGG) falls to chance: a ResNet behaves like an ensemble of many paths of different "
                 "lengths.")
    mode = "ReLU(S(x)) (`zero_branch`)" if s.mode == "zero_branch" else "S(x) (`shortcut_only`)"
    drawn = ("the blocks whose shortcut keeps the shape (identity shortcuts), as Veit et al. deleted"
             if s.k_random_blocks == "non_downsampling" else "all blocks, downsampling ones included")
    run.add_text("Method", f"A deleted block outputs {mode}; downsampling blocks keep their projection / "
                 "zero-pad shortcut; a highway block's gate is forced to carry (T = 0); a plain block becomes its "
                 "parameter-free shortcut mapping (identity). A plain net's stage-change blocks are not deleted: "
                 "no shortcut exists in the trained net, and deleting one would insert a zero-pad shortcut it "
                 f"never had. The comparison plain net is {DEGRADATION_DEPTH} layers deep unless stated: "
                 "He et al. (2016, Fig. 6) show plain-20 training to about the residual nets' error, while deeper "
                 "plain nets are *degraded* (labelled so in the headline), which would make their collapse partly "
                 f"built in. {n_images:,} evaluation images ({data.describe()}). Random deletions: {s.n_sets} sets "
                 f"per k, drawn from {drawn}; reorderings: {s.reorder_sets} orders per number of within-stage "
                 f"swaps. Intervals: 95 % bootstrap over images ({s.n_resamples} resamples); the error increase "
                 "is paired with the intact net on the same images. The headline effect is the mean over the "
                 "non-downsampling blocks of the error increase when that block alone is deleted.")
    blocks = f"site != '{NON_DOWNSAMPLING}'"
    run.add_figure("single_block_error", "bar", "single_block", section="Single-block deletion",
                   query=f"metric == 'error_percent' and {blocks}", x="site", lo="lo", hi="hi", flag="downsampling",
                   flag_label=DOWNSAMPLING, order=order, xlabel="deleted block", ylabel="test error (%)",
                   title="Test error after deleting one block (Veit et al. 2016, Fig. 3)",
                   caption=f"Test error with each block deleted on its own. Intact error: {intact_text}. "
                           "A plain net's stage-change blocks are not deleted (no shortcut to fall back on).",
                   **facet)
    run.add_figure("k_random_error", "line", "k_random", section="Deleting several blocks",
                   query="metric == 'error_percent'", x="k", hue="model", markers=True,
                   xlabel="blocks deleted at random, k", ylabel="test error (%)",
                   title="Error against the number of deleted blocks (Veit et al. 2016, Fig. 5a)",
                   caption=f"Mean over random deletion sets drawn from {drawn} (band: 95 % interval of the mean "
                           "over sets and seeds); k = 0 is the intact network.")
    if "reorder" in tables:
        run.add_figure("reorder_error", "scatter", "reorder", section="Reordering blocks",
                       query="metric == 'error_percent'", x="kendall_tau", hue="model",
                       xlabel="Kendall's τ between the new and the trained block order", ylabel="test error (%)",
                       title="Error against the amount of reordering (Veit et al. 2016, Fig. 5b)",
                       caption="Each point is one order made by random swaps of two blocks of one stage "
                               "(non-downsampling blocks only); τ = 1 is the trained order.")
    else:
        run.add_text("Reordering blocks", "No model has a stage with two non-downsampling blocks, so no block "
                     "could be swapped; the reordering experiment needs a deeper network.")
    pairs = pd.DataFrame(columns=["model", "method", "seed", "attribution", "value"])
    if "attribution" in tables:
        importance, pairs = importance_tables(single[single["site"] != NON_DOWNSAMPLING], tables["attribution"])
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
    run.add_headline(headline(single, krand, pairs, tables["models"]),
                     title="Lesion effects per model (intervals: 95 % bootstrap over images; ± std over seeds)")
    if data.kind == "cifar" and any(not str(f) in ("plain", "highway", "residual", "preact")
                                    for f in single["family"].unique()):
        run.add_text("Data", "ImageNet models were evaluated on CIFAR images here: their error is meaningless, but "
                     "the KL to the intact outputs still measures how much each deletion changes the function. "
                     "Use --data imagefolder=PATH for ImageNet models.")
