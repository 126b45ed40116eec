"""The degradation problem (He et al. 2016, Fig. 1 and Fig. 6): deeper plain nets train worse; residual nets do not.

Question: when plain / highway / residual nets of increasing depth are trained the same way, does the
deeper net reach a *higher training error* (an optimisation problem, not overfitting), and does an
identity shortcut remove the effect?

Figures: training (dashed) and validation (solid) error against the iteration, one panel per family
and one colour per depth (the layout of He et al. Fig. 6); final training / test error per depth.
Headline: final train / validation / test error per model (mean ± std over seeds) and, per family,
the final training error of the deepest net minus that of the shallowest.

Input: ``--zoo RUN_DIR`` (a ``train_zoo`` run) or, without it, the study trains its own nets (the
``train_zoo`` settings of the chosen scale: depths 8 and 20 at quick scale, 20-110 at paper scale).

Result at quick scale (2 AMD EPYC cores shared with other jobs (load average 4-5), 1 torch thread, JPEG pack,
seed 0; 4,000 images, 3 epochs; measured 2026-11-23): final training error plain 59.0 % (depth 8) -> 65.6 %
(depth 20), +6.6 points; residual 57.3 % -> 57.2 %, -0.1 points: the deeper plain net trains worse, the deeper
residual net does not. One seed, so no spread; the study itself takes ~1 s on a zoo.
"""
from __future__ import annotations

from pathlib import Path

from . import train_zoo

QUICK, PAPER = train_zoo.QUICK, train_zoo.PAPER  # the nets trained without --zoo: those of train_zoo
ERRORS = (("train", "train_error_percent"), ("val", "val_error_percent"), ("test", "test_error_percent"))


def final_errors(final: "pd.DataFrame") -> "pd.DataFrame":
    """The zoo's ``final`` table as tidy error rows with a ``split`` column (metric ``error_percent``)."""
    import pandas as pd
    parts = []
    for split, metric in ERRORS:
        part = final[final["metric"] == metric].copy()
        part["split"], part["metric"] = split, "error_percent"
        parts.append(part.drop(columns=[c for c in ("checkpoint",) if c in part]))
    return pd.concat(parts, ignore_index=True)


def degradation_table(errors: "pd.DataFrame") -> "pd.DataFrame":
    """Per family and seed: final training error of the deepest net minus that of the shallowest (points).

    Returns:
        Tidy rows ``family, seed, model ("<family>-<deep> vs -<shallow>"), metric="train_error_gap_percent",
        value`` (positive: the deeper net trains worse).
    """
    import pandas as pd
    train = errors[errors["split"] == "train"]
    rows = []
    for (family, seed), g in train.groupby(["family", "seed"], sort=False):
        depths = sorted(g["depth"].unique())
        if len(depths) < 2:
            continue
        shallow, deep = depths[0], depths[-1]
        value = float(g.loc[g["depth"] == deep, "value"].mean() - g.loc[g["depth"] == shallow, "value"].mean())
        rows.append({"run": g["run"].iloc[0], "seed": int(seed), "family": family,
                     "model": f"{family}-{deep} vs {family}-{shallow}", "site": "network",
                     "metric": "train_error_gap_percent", "value": value, "deep": int(deep),
                     "shallow": int(shallow)})
    return pd.DataFrame(rows)


def headline_errors(errors: "pd.DataFrame") -> "pd.DataFrame":
    """One row per model: final train / val / test error, mean ± std over seeds."""
    import pandas as pd
    from ..report import format_mean_std
    rows = []
    for (family, depth), g in errors.groupby(["family", "depth"], sort=True):
        row = {"model": train_zoo.model_name(family, depth)}
        for split, _ in ERRORS:
            row[f"{split} error"] = format_mean_std(g.loc[g["split"] == split, "value"], unit="%")
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> Path:
    """Run the degradation study; returns its run folder."""
    args, settings = train_zoo.parse_zoo_study(
        "degradation", "He et al. Fig. 1/6: training and test error of plain vs highway vs "
                       "residual nets at increasing depth, from a train_zoo run or trained here.",
        "a train_zoo run folder to read (default: train the nets here)", argv, QUICK, PAPER)
    from ..report import new_run

    zoo = train_zoo.ZooInput(args, settings, needs=("curves", "final"))
    with new_run("degradation", out=args.out, config=zoo.config, data=zoo.data, source_file=__file__, argv=argv,
                 title="Degradation: training error against depth (He et al. 2016, Fig. 1/6)") as run:
        tables = zoo.tables(run, "Networks and curves")
        curves, final = tables["curves"], tables["final"]
        _report(run, curves, final_errors(final))
    return run.path


def _report(run, curves, errors) -> None:
    import pandas as pd
    from ..report import format_mean_std
    run.add_table("curves", curves)
    run.add_table("final_error", errors)
    run.add_headline(headline_errors(errors), title="Final error per model (mean ± std over seeds)")
    gap = degradation_table(errors)
    if len(gap):
        run.add_table("degradation", gap)
        rows = [{"family": f, "comparison": g["model"].iloc[0],
                 "train error, deeper minus shallower": format_mean_std(g["value"], unit="points")}
                for f, g in gap.groupby("family", sort=False)]
        run.add_headline(pd.DataFrame(rows), title="Degradation: final training error of the deepest net minus "
                                                   "the shallowest (positive = deeper trains worse)")
    families = list(dict.fromkeys(curves["family"]))
    run.add_figure("error_curves", "line", "curves", section="Training curves", x="step", hue="depth",
                   style="split", col="family", col_order=families, dashes={"train": [4, 2], "val": ""},
                   query="metric == 'error_percent'", xlabel="iteration", ylabel="error (%)",
                   legend_title="depth", palette="viridis",
                   title="Training (dashed) and validation (solid) error by depth (He et al. Fig. 6 layout)",
                   caption="Dashed: running training error over recent batches; solid: error on held-out "
                           "validation images. One panel per family, one colour per depth.")
    run.add_figure("final_error", "bar", "final_error", section="Final error", x="depth", hue="family",
                   col="split", col_order=["train", "test"], hue_order=families,
                   query="split in ['train', 'test']", errorbar="sd", xlabel="depth (layers)",
                   ylabel="final error (%)", title="Final training and test error against depth",
                   caption="Bars: mean over seeds; error bars: ± 1 sd over seeds (when there are several).")
    run.add_text("Reading", "He et al. (2016) found that a deeper plain net ends with a *higher training error* "
                            "than a shallower one (the degradation problem), while residual nets of the same "
                            "depth train at least as well as shallower ones. "
                            + ("" if len(errors["seed"].unique()) > 1 else
                               "Single seed: the numbers carry no spread; run more seeds (`--seeds 0 1 2`) "
                               "for mean ± std."))
