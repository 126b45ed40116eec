"""The report of the similarity study: per-net and per-pair summaries, headline, texts and heat maps.

Every number is read from the study's tables (``cka_blocks``, ``cka_pairs``); the ``summary`` table it
adds is what the headline formats.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..report import format_mean_std
from .inputs import StudyData

if TYPE_CHECKING:   # the settings' module imports this one
    from .similarity import SimilaritySettings


def summary(blocks: pd.DataFrame, pairs: pd.DataFrame | None) -> pd.DataFrame:
    """Tidy per-net and per-pair summaries.

    Per net and seed: ``neighbour_cka`` (mean CKA of consecutive blocks: how gradually the representation
    changes), ``first_last_cka`` (first block vs last), ``earlier_half_cka`` and ``later_half_cka`` (mean
    CKA between two different blocks among the first / the last ceil(n/2) of the n blocks: a large square
    of high CKA among the later blocks is Kornblith et al.'s sign of a plain net too deep for its
    accuracy). Per aligned pair: ``same_block_cka`` (mean over
    blocks of the CKA of block i of one net with block i of the other) and ``same_block_cka_min``.
    """
    rows = []
    for (model, seed), g in blocks.groupby(["model", "seed"], sort=False):
        n = int(g["block"].max())
        grid = g.pivot_table(index="block", columns="other_block", values="value").to_numpy()
        base = {"run": g["run"].iloc[0], "seed": seed, "model": model, "family": g["family"].iloc[0],
                "depth": g["depth"].iloc[0], "site": "network", "n_blocks": n}
        if n > 1:
            half = -(-n // 2)
            rows += [{**base, "metric": "neighbour_cka", "value": float(np.nanmean(np.diag(grid, 1)))},
                     {**base, "metric": "first_last_cka", "value": float(grid[0, -1])},
                     {**base, "metric": "earlier_half_cka", "value": _mean_between(grid[:half, :half])},
                     {**base, "metric": "later_half_cka", "value": _mean_between(grid[-half:, -half:])}]
    if pairs is not None:
        same = pairs[pairs["aligned"] & (pairs["block"] == pairs["other_block"])]
        for (model, seed), g in same.groupby(["model", "seed"], sort=False):
            base = {"run": g["run"].iloc[0], "seed": seed, "model": model, "pair": g["pair"].iloc[0],
                    "kind": g["kind"].iloc[0], "site": "network", "n_blocks": len(g)}
            rows += [{**base, "metric": "same_block_cka", "value": float(g["value"].mean())},
                     {**base, "metric": "same_block_cka_min", "value": float(g["value"].min())}]
    return pd.DataFrame(rows)


def _mean_between(grid: np.ndarray) -> float:
    """Mean of a square CKA grid off its diagonal (two different blocks)."""
    return float(np.nanmean(grid[~np.eye(len(grid), dtype=bool)]))


def headline(summ: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Formatted per-net and per-pair headlines (mean ± std over seeds or seed pairs)."""
    nets = summ[summ["metric"].isin(["neighbour_cka", "first_last_cka", "earlier_half_cka", "later_half_cka"])]
    rows = []
    for model, g in nets.groupby("model", sort=False):
        v = g.pivot_table(index="seed", columns="metric", values="value")
        rows.append({"model": model, "blocks": int(g["n_blocks"].iloc[0]), "seeds": len(v),
                     "CKA of neighbouring blocks": format_mean_std(v["neighbour_cka"], digits=3),
                     "CKA first vs last block": format_mean_std(v["first_last_cka"], digits=3),
                     "CKA among the earlier half": format_mean_std(v["earlier_half_cka"], digits=3),
                     "CKA among the later half": format_mean_std(v["later_half_cka"], digits=3)})
    per_pair = summ[summ["metric"] == "same_block_cka"]
    pair_rows = []
    lows = summ[summ["metric"] == "same_block_cka_min"]
    for label, g in per_pair.groupby("pair", sort=False):
        pair_rows.append({"nets": label, "kind": g["kind"].iloc[0], "pairs of nets": len(g),
                          "mean CKA of the same block": format_mean_std(g["value"], digits=3),
                          "lowest same-block CKA": format_mean_std(lows[lows["pair"] == label]["value"],
                                                                   digits=3)})
    return pd.DataFrame(rows), (pd.DataFrame(pair_rows) if pair_rows else None)


def write_report(run, tables: dict[str, pd.DataFrame], s: SimilaritySettings, data: StudyData, n_images: int) -> None:
    """Texts, heat maps and headline of a similarity run."""
    blocks, pairs = tables["cka_blocks"], tables.get("cka_pairs")
    summ = summary(blocks, pairs)
    run.add_table("summary", summ)
    tables["summary"] = summ
    nets, compared = headline(summ)
    run.add_headline(nets, title="Block similarity inside each net (linear CKA, ± std over seeds)")
    if compared is not None:
        run.add_headline(compared, title="The same block in two nets (± std over pairs of seeds)")
    run.add_text("Question", "Linear CKA (centered kernel alignment; Kornblith et al. 2019) measures how alike two "
                 "representations of the same images are, from 0 (unrelated) to 1 (the same up to a rotation and a "
                 "scale). Within one net it shows how the representation changes from block to block; between "
                 "two nets, whether they compute the same thing at the same block. Kornblith et al. found that "
                 "plain CNNs made too deep for their accuracy have many later layers alike, which residual nets "
                 "avoid, and that nets differing only in their seed are alike layer for layer.")
    run.add_text("Method", f"{n_images:,} evaluation images ({data.describe()}), in minibatches of {s.minibatch}; "
                 "each block's output flattened per image (linear kernel, float64). Per minibatch, the unbiased "
                 "HSIC estimator (Song et al. 2012) between every pair of blocks; HSIC averaged over the "
                 "minibatches, and CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) of the averages (Nguyen, Raghu, "
                 "Kornblith 2021). Each minibatch's estimate is unbiased for the population HSIC, so the average "
                 "estimates the same quantity whatever the minibatch size, and memory does not grow with the "
                 "number of images. "
                 "Kornblith et al. used the biased estimator on all images at once, whose bias (of order 1/n) would not "
                 "average away over minibatches. Pairs of nets: " + {
                     "same_depth": "nets of the same depth (two seeds, or two families).",
                     "all": "every two nets.", "none": "none."}[s.pairs] + " Block outputs only: the layers "
                 "inside a block are not compared.")
    section = "CKA between the blocks of one net (Kornblith et al. 2019)"
    heat = dict(vmin=0.0, vmax=1.0, cmap="magma", colorbar_label="linear CKA")
    run.add_figure("cka_within", "heatmap", "cka_blocks", section=section, x="other_block", y="block", col="model",
                   xlabel="block", ylabel="block", title="Linear CKA between the outputs of every two blocks",
                   caption="Mean over seeds. Block 1 is the first block after the stem; stage changes at the "
                           "downsampling blocks.", **heat)
    run.add_figure("cka_neighbour", "line", "cka_blocks", section=section, query="other_block == block + 1",
                   x="other_block", hue="model", markers=True, errorbar="sd", flag="other_downsampling",
                   flag_label="downsampling block", xlabel="block i", ylabel="CKA(block i - 1, block i)",
                   title="How much each block changes the representation",
                   caption="Low values: the block changes the representation a lot. Band: ± 1 std over seeds "
                           "where there are several.")
    if pairs is None:
        return
    section = "CKA between the same blocks of two nets"
    run.add_figure("cka_pairs", "heatmap", "cka_pairs", section=section, x="other_block", y="block", col="pair",
                   xlabel="block of the second net", ylabel="block of the first net",
                   title="Linear CKA between every block of one net and every block of another",
                   caption="Mean over pairs of seeds.", **heat)
    if pairs["aligned"].any():
        run.add_figure("cka_same_block", "line", "cka_pairs", section=section,
                       query="aligned and block == other_block", x="block", col="model_a", hue="model_b",
                       markers=True, errorbar="sd", flag="downsampling", flag_label="downsampling block",
                       legend_title="second net", xlabel="block i", ylabel="CKA of block i in both nets",
                       title="The same block in two nets",
                       caption="Each panel: one net (its name above) against the nets after it in the run's order; "
                               "the same architecture in both is two seeds. Band: ± 1 std over pairs of seeds "
                               "where there are several.")
