"""The report of the refinement study: per-net summaries, headline, texts and per-block figures.

Every number is read from the study's ``refinement`` table; the ``summary`` table it adds is what the
headline formats.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..report import format_ci, t_mean_ci
from .inputs import StudyData, model_order

if TYPE_CHECKING:   # the settings' module imports this one
    from .refinement import RefinementSettings

SUMMARY_METRICS = ("mean_cos", "refining_blocks", "cos_first_block", "cos_later_blocks", "ratio_first_block",
                   "ratio_later_blocks")


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per net and seed, over its blocks (from the per-block means over the images):

    ``mean_cos`` (mean over blocks of the mean cos(F, -dL/dF)), ``refining_blocks`` (fraction of blocks whose
    mean cosine is positive: the branch points down the gradient), ``cos_first_block`` and ``cos_later_blocks``
    (block 1, and the mean over the others), ``ratio_first_block`` and ``ratio_later_blocks`` (the same for the
    mean ||F(x)|| / ||x||: Jastrzebski et al. find the first blocks' steps the largest).
    """
    rows = []
    wide = table.pivot_table(index=["model", "seed", "block_index"], columns="metric", values="value", sort=False)
    for (model, seed), g in wide.groupby(level=["model", "seed"], sort=False):
        g = g.droplevel(["model", "seed"]).sort_index()
        cos, ratio = g["refinement_cos_mean"].to_numpy(), g["branch_to_input_norm_mean"].to_numpy()
        meta = table[(table["model"] == model) & (table["seed"] == seed)].iloc[0]
        base = {"run": meta["run"], "seed": seed, "model": model, "family": meta["family"], "depth": meta["depth"],
                "site": "network", "n_blocks": len(g)}
        values = {"mean_cos": np.nanmean(cos), "refining_blocks": float(np.mean(cos > 0)),
                  "cos_first_block": cos[0], "cos_later_blocks": np.nanmean(cos[1:]) if len(cos) > 1 else np.nan,
                  "ratio_first_block": ratio[0],
                  "ratio_later_blocks": np.nanmean(ratio[1:]) if len(ratio) > 1 else np.nan}
        rows += [{**base, "metric": k, "value": float(values[k])} for k in SUMMARY_METRICS]
    return pd.DataFrame(rows)


def _over_seeds(values: pd.Series, digits: int = 3, percent: bool = False) -> str:
    """Mean over seeds with its 95 % Student-t interval (the mean alone for one seed)."""
    mean, lo, hi = t_mean_ci(values.to_numpy())
    return format_ci(mean, lo, hi, digits=digits, percent=percent) + f" (n={int(values.notna().sum())})"


def headline(summ: pd.DataFrame) -> pd.DataFrame:
    """One formatted row per net: the summary metrics, mean over seeds with 95 % t-intervals over seeds."""
    rows = []
    for model in model_order(summ):
        g = summ[summ["model"] == model].pivot_table(index="seed", columns="metric", values="value")
        rows.append({"model": model, "blocks": int(summ.loc[summ["model"] == model, "n_blocks"].iloc[0]),
                     "mean cos(F, -dL/dF) over blocks": _over_seeds(g["mean_cos"]),
                     "blocks with positive cos": _over_seeds(g["refining_blocks"], digits=0, percent=True),
                     "cos: first block / later blocks": f"{_over_seeds(g['cos_first_block'])} / "
                                                         f"{_over_seeds(g['cos_later_blocks'])}",
                     "||F||/||x||: first block / later blocks": f"{_over_seeds(g['ratio_first_block'])} / "
                                                               f"{_over_seeds(g['ratio_later_blocks'])}"})
    return pd.DataFrame(rows)


def findings(summ: pd.DataFrame) -> str:
    """What the paper found and what this run shows, in words, from the summary."""
    lines = ["**Paper** (Jastrzebski et al. 2018, Fig. 2 and 3): in trained residual nets the cosine between every "
             "block's branch output and the loss gradient is negative (here: the cosine with the *negative* gradient "
             "is positive), most strongly in the later blocks, and ||F|| / ||x|| is small and largest in the first "
             "blocks.", "", "**This run**:"]
    for model in model_order(summ):
        g = summ[summ["model"] == model].groupby("metric")["value"].mean()
        seeds = summ.loc[summ["model"] == model, "seed"].nunique()
        first_largest = g["ratio_first_block"] > g["ratio_later_blocks"]
        lines.append(f"- {model} ({seeds} seed{'s' if seeds > 1 else ''}): mean cosine with -dL/dF "
                     f"{g['mean_cos']:+.3f}, positive in {g['refining_blocks']:.0%} of the blocks; ||F||/||x|| "
                     f"{g['ratio_first_block']:.3f} in the first block against {g['ratio_later_blocks']:.3f} in the "
                     f"later ones ({'largest first, as in the paper' if first_largest else 'not largest first'}).")
    return "\n".join(lines)


def write_report(run, tables: dict[str, pd.DataFrame], s: RefinementSettings, data: StudyData, n_images: int) -> None:
    """Texts, per-block figures and headline of a refinement run."""
    table = tables["refinement"]
    summ = summary(table)
    run.add_table("summary", summ)
    tables["summary"] = summ
    run.add_headline(headline(summ), title="Refinement per net (mean over seeds, 95 % t-interval over seeds)")
    run.add_headline(findings(summ))
    run.add_text("Question", "Jastrzebski et al. (2018) read a residual block h_i = h_(i-1) + F_i(h_(i-1)) as one step "
                 "of an iterative inference: to first order the block changes the loss by <F_i, dL/dh>, so a branch "
                 "output pointing against the loss gradient lowers the loss. Do the blocks of these nets take such "
                 "steps, and how large are the steps relative to the representation they change?")
    run.add_text("Method", f"{n_images:,} evaluation images ({data.describe()}) in batches of {s.batch_size}; nets in "
                 "eval mode. Per block and image n: cos_n = <F(x_n), -g_n> / (||F(x_n)|| ||g_n||) with F the branch "
                 "output (after its last BN, before the combine), g_n = dL/dF(x_n) and L the summed cross-entropy "
                 "(with BN in eval mode, g_n is image n's own loss gradient; a mean loss would scale it, which the "
                 "cosine does not see); ratio_n = ||F(x_n)|| / ||x_n|| with x_n the block input; norms over all "
                 "(C, H, W) of one image. Their means and stds over the images are streamed as float64 counts, "
                 "sums and sums of squares (resnet_probe.probes.refinement), read in the backward pass of a gradient "
                 "tap on the branch output.")
    run.add_text("Where this departs from the paper",
                 "- Sign: the paper plots cos(F, dL/dh), negative for refinement; here the cosine is with the "
                 "negative gradient, positive for refinement.\n"
                 "- Where the gradient is taken: at the branch output as it enters the combine, dL/dF, which equals "
                 "dL/d(F + S) for additive blocks (the gradient of the rest of the network at the representation F "
                 "is added to). Autograd at the block input would add the backward path through the branch itself, "
                 "a term the paper's first-order argument neglects, and is not defined for downsampling blocks "
                 "(F(x) and x differ in shape); those are measured here with the same definition and ringed in the "
                 "figures.\n"
                 "- Highway blocks: F is the transform H before its ReLU and dL/dF passes through the gate T; plain "
                 "blocks have no shortcut, so F is the whole new representation rather than a step added to x. Both "
                 "are shown for comparison; the paper measures residual nets only.\n"
                 "- Nets: the paper's were trained to convergence; nets trained here at the quick scale are trained "
                 "for minutes, and their numbers describe such nets.")
    section = "Per block (Jastrzebski et al. 2018, Fig. 2 and 3)"
    common = dict(section=section, x="block_index", hue="model", markers=True, errorbar="sd", flag="downsampling",
                  flag_label="downsampling block", xlabel="block")
    run.add_figure("refinement_cos", "line", "refinement", query="metric == 'refinement_cos_mean'",
                   ylabel="mean cos(F(x), -dL/dF)", title="Does each block step down the loss gradient?", **common,
                   caption="Mean over the evaluation images of the cosine between the branch output and the negative "
                           "loss gradient at it, per block in the network's order. Above 0: the block moves the "
                           "representation down the gradient (the paper's negative cos(F, dL/dh)). Band: ± 1 std over "
                           "seeds where there are several; ringed: downsampling blocks.")
    run.add_figure("refinement_ratio", "line", "refinement", query="metric == 'branch_to_input_norm_mean'",
                   ylabel="mean ||F(x)|| / ||x||", title="How large is each block's step?", **common,
                   caption="Mean over the evaluation images of the norm of the branch output relative to the block "
                           "input. Small values: a small, incremental change of the representation. Band: ± 1 std "
                           "over seeds where there are several; ringed: downsampling blocks.")
    run.add_figure("refinement_cos_spread", "line", "refinement", query="metric == 'refinement_cos_std'",
                   ylabel="std over images of cos(F(x), -dL/dF)", title="How much the cosine varies between images",
                   **common, caption="Std over the evaluation images of the per-image cosine, per block. Band: "
                                     "± 1 std over seeds where there are several.")
