"""The degradation problem (He et al. 2016, Fig. 1 and Fig. 6): deeper plain nets train worse; residual nets do not.

Question: when plain / highway / residual nets of increasing depth are trained the same way, does the
deeper net reach a *higher training error* (an optimisation problem, not overfitting), and does an
identity shortcut remove the effect?

Figures: training (dashed) and validation (solid) error against the iteration, one panel per family
and one colour per depth (the layout of He et al. Fig. 6); final training / test error per depth.
Headline: final train / validation / test error per model, and per family the *depth gap*: the
training error of the deepest net minus that of the shallowest. He et al. plot the running training
error; here the gap is measured after training, in eval mode, on the same fixed training images for
both nets (``train_zoo``'s ``train_errors``), so it gets a paired 95 % bootstrap interval over those
images; with several seeds, the mean ± std over seeds.

Input: a ``train_zoo`` run folder or, without one, the study trains its own nets (``--train``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..lesion import bootstrap_mean_ci
from ..report import format_ci, format_mean_std
from ..train.fit import resolve_device
from .spec import StudyCommand
from .inputs import StudyData, Zoo, model_name
from .runs import StudyResult, study_config, study_run
from .train_zoo import ZooSettings, trained_zoo

TITLE = "Degradation: training error against depth (He et al. 2016, Fig. 1/6)"
ERRORS = (("train", "train_error_percent"), ("val", "val_error_percent"), ("test", "test_error_percent"))


@dataclass(frozen=True)
class DegradationSettings:
    """Settings of the degradation study.

    Args:
        n_resamples: bootstrap resamples of the depth gap's interval (over training images).
    """

    n_resamples: int = 1000

    def __post_init__(self) -> None:
        if self.n_resamples < 1:
            raise ValueError(f"n_resamples must be positive; got {self.n_resamples}")

    @classmethod
    def quick(cls) -> "DegradationSettings":
        return cls()

    @classmethod
    def paper(cls) -> "DegradationSettings":
        return cls()

    @classmethod
    def tiny(cls) -> "DegradationSettings":
        return cls(n_resamples=100)


def trained_nets(scale: str) -> ZooSettings:
    """The nets trained when no zoo is given: those of ``train_zoo`` at that scale."""
    return getattr(ZooSettings, scale)()


def final_errors(final: pd.DataFrame) -> pd.DataFrame:
    """The zoo's ``final`` table as tidy error rows with a ``split`` column (metric ``error_percent``)."""
    parts = []
    for split, metric in ERRORS:
        part = final[final["metric"] == metric].copy()
        part["split"], part["metric"] = split, "error_percent"
        parts.append(part.drop(columns=[c for c in ("checkpoint",) if c in part]))
    return pd.concat(parts, ignore_index=True)


def depth_gap(train_errors: pd.DataFrame, n_resamples: int) -> pd.DataFrame:
    """Per family and seed: training error (eval mode, the same images) of the deepest net minus that of
    the shallowest, in percentage points, with its paired 95 % bootstrap interval over the images.

    Returns:
        Tidy rows ``family, seed, model ("<family>-<deep> vs -<shallow>"), metric="train_error_gap_pp",
        value, lo, hi, deep, shallow`` (positive: the deeper net trains worse).
    """
    rows = []
    for (family, seed), g in train_errors.groupby(["family", "seed"], sort=False):
        depths = sorted(g["depth"].unique())
        if len(depths) < 2:
            continue
        shallow, deep = depths[0], depths[-1]
        a = g[g["depth"] == deep].sort_values("image")["value"].to_numpy()
        b = g[g["depth"] == shallow].sort_values("image")["value"].to_numpy()
        mean, lo, hi = bootstrap_mean_ci(100.0 * (a - b), n_resamples=n_resamples, seed=int(seed))
        rows.append({"run": g["run"].iloc[0], "seed": int(seed), "family": family,
                     "model": f"{model_name(family, deep)} vs {model_name(family, shallow)}", "site": "network",
                     "metric": "train_error_gap_pp", "value": float(mean[0]), "lo": float(lo[0]),
                     "hi": float(hi[0]), "deep": int(deep), "shallow": int(shallow), "n_images": len(a)})
    return pd.DataFrame(rows)


def headline_errors(errors: pd.DataFrame, final: pd.DataFrame) -> pd.DataFrame:
    """One row per model: parameters, final train / val / test error, mean ± std over seeds."""
    rows = []
    params = final[final["metric"] == "parameters"].groupby("model")["value"].first()
    for (family, depth), g in errors.groupby(["family", "depth"], sort=True):
        name = model_name(family, depth)
        row = {"model": name, "parameters": f"{int(params.get(name, 0)):,}"}
        for split, _ in ERRORS:
            row[f"{split} error"] = format_mean_std(g.loc[g["split"] == split, "value"], unit="%").replace(" (n=1)", "")
        rows.append(row)
    return pd.DataFrame(rows)


def run(settings: DegradationSettings, models: Zoo | None, data: StudyData | None, *, out: str | Path = "runs",
        seeds: Sequence[int] = (0,), device: str = "auto", train: ZooSettings | None = None,
        scale: str | None = None) -> StudyResult:
    """The degradation study on a zoo's training records (``models``: a ``Zoo`` from a train_zoo run), or on
    nets trained here (``models=None``: ``train``'s nets on ``data``)."""
    train = train or trained_nets(scale or "quick")
    if models is not None and not {"curves", "final", "train_errors"} <= set(models.tables):
        raise ValueError("the degradation study needs a train_zoo run's curves, final and train_errors tables; "
                         "give its run folder, or no model to train the nets here")
    config = study_config(models=[str(f) for f in models.folders] if models is not None else [],
                          data=data.spec if data is not None else None, seeds=seeds, device=device, out=out,
                          scale=scale, settings=settings, train=train)
    provenance = data.provenance() if data is not None else models.data
    with study_run("degradation", config, title=TITLE, data=provenance, source_file=__file__) as r:
        if models is None:
            models = trained_zoo(r, data, train, seeds, resolve_device(device).type)
        else:
            r.add_text("Setup", "Networks and training curves read from the train_zoo run "
                       + ", ".join(f"`{f}`" for f in models.folders) + ".")
        tables = {"curves": models.tables["curves"], "final_error": final_errors(models.tables["final"]),
                  "degradation": depth_gap(models.tables["train_errors"], settings.n_resamples)}
        for name, df in tables.items():
            if len(df):
                r.add_table(name, df)
        _report(r, tables, models.tables["final"])
    return StudyResult(r.path, tables, models)


def _report(run, tables: dict[str, pd.DataFrame], final: pd.DataFrame) -> None:
    curves, errors, gap = tables["curves"], tables["final_error"], tables["degradation"]
    run.add_headline(headline_errors(errors, final), title="Final error per model (mean ± std over seeds)")
    if len(gap):
        rows = []
        for family, g in gap.groupby("family", sort=False):
            cell = (format_ci(g["value"].iloc[0], g["lo"].iloc[0], g["hi"].iloc[0], unit="pp") if len(g) == 1
                    else format_mean_std(g["value"], unit="pp"))
            rows.append({"family": family, "comparison": g["model"].iloc[0],
                         "training error, deeper minus shallower": cell})
        run.add_headline(pd.DataFrame(rows), title="Depth gap: training error of the deepest net minus the "
                                                   "shallowest (eval mode, the same training images; positive = "
                                                   "deeper trains worse; 95 % bootstrap interval over images)")
    families = list(dict.fromkeys(curves["family"]))
    run.add_figure("error_curves", "line", "curves", section="Training curves", x="step", hue="depth",
                   style="split", col="family", col_order=families, dashes={"train": [4, 2], "val": ""},
                   query="metric == 'error_percent'", xlabel="iteration", ylabel="error (%)",
                   legend_title="depth", title="Training (dashed) and validation (solid) error by depth "
                                               "(He et al. Fig. 6 layout)",
                   caption="Dashed: running training error over recent batches; solid: error on held-out "
                           "validation images. One panel per family, one colour per depth.")
    run.add_figure("final_error", "bar", "final_error", section="Final error", x="depth", hue="family",
                   col="split", col_order=["train", "test"], hue_order=families,
                   query="split in ['train', 'test']", errorbar="sd", xlabel="depth (layers)",
                   ylabel="final error (%)", title="Final training and test error against depth",
                   caption="Bars: mean over seeds; error bars: ± 1 sd over seeds (when there are several).")
    single = errors["seed"].nunique() == 1
    run.add_text("Reading", "He et al. (2016) found that a deeper plain net ends with a *higher training error* "
                            "than a shallower one (the degradation problem), while residual nets of the same "
                            "depth train at least as well as shallower ones. The depth gap is measured on "
                            f"{int(gap['n_images'].iloc[0]) if len(gap) else 0:,} training images per seed, in "
                            "eval mode (BN with its running statistics), the same images for both depths."
                            + (" Single seed: the interval covers the choice of images, not of the training run; "
                               "run more seeds for the spread between runs." if single else ""))


COMMAND = StudyCommand(
    name="degradation", run=run, settings=DegradationSettings, inputs="zoo", train=trained_nets,
    description="He et al. Fig. 1/6: training and test error of plain vs highway vs residual nets at increasing "
                "depth, from a train_zoo run or trained here.")
