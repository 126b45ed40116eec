"""Gradients per block during training: do the early blocks of a plain net stop learning?

Question: does the gradient reaching the early blocks of a plain net shrink with depth (so those
blocks barely train), while identity shortcuts (residual) and carry gates (highway) keep it up?

Raw norms cannot answer it: a block's parameter-gradient norm grows with its number of weights
(a CIFAR net's first block has ~4.6k, its last ~74k) and, under batch normalisation, shrinks as its
weights grow; an activation-gradient norm grows with the size of the activation. So, per block and
recorded step (``ProbeCallback``, before the optimizer step):

- ``param_grad_rms`` = ``||dL/dθ|| / sqrt(#θ)``: the RMS gradient per parameter;
- ``relative_param_grad`` = ``||dL/dθ|| / ||θ||``: the step an SGD update of rate 1 would take,
  relative to the weights (times the learning rate: the relative change of the block per step);
- ``activation_grad_rms`` = ``||dL/dx|| / sqrt(#x)``: the RMS gradient per element of the block output.

Headline: per model, the first block's value over the last block's, for each. A ratio near 1 means
the first block's weights change at the same relative rate as the last block's (no vanishing); a
ratio far below 1 (say < 0.1) means the early blocks barely learn, the vanishing-gradient picture.

Input: a ``train_zoo`` run folder (its gradient records) or, without one, nets trained here.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..report import format_mean_std
from ..train.fit import resolve_device
from .spec import StudyCommand
from .inputs import StudyData, Zoo, family_rank
from .runs import StudyResult, study_config, study_run
from .train_zoo import ZooSettings, trained_zoo

TITLE = "Gradients per block during training"
DERIVED = {"param_grad_rms": ("param_grad_norm", "param_count", "RMS gradient per parameter, ||dL/dθ|| / √#θ"),
           "relative_param_grad": ("param_grad_norm", "param_norm", "relative gradient, ||dL/dθ|| / ||θ||"),
           "activation_grad_rms": ("activation_grad_norm", "activation_count",
                                   "RMS gradient per output element, ||dL/dx|| / √#x")}


@dataclass(frozen=True)
class GradientSettings:
    """Settings of the gradient study.

    Args:
        from_step: records before this optimizer step are left out of the per-block means (the first
            steps, while batch-norm statistics and the learning rate settle).
    """

    from_step: int = 0

    def __post_init__(self) -> None:
        if self.from_step < 0:
            raise ValueError(f"from_step must be >= 0; got {self.from_step}")

    @classmethod
    def quick(cls) -> "GradientSettings":
        return cls()

    @classmethod
    def paper(cls) -> "GradientSettings":
        return cls(from_step=500)

    @classmethod
    def tiny(cls) -> "GradientSettings":
        return cls()


def trained_nets(scale: str) -> ZooSettings:
    """The nets trained when no zoo is given: every family at depth 20 (20, 56, 110 at paper scale)."""
    if scale == "paper":
        s = ZooSettings.paper()
        return s.only(s.families, (20, 56, 110))
    if scale == "tiny":
        return ZooSettings.tiny()
    s = ZooSettings.quick()
    return replace(s.only(s.families, (20,)), epochs=1, grad_every_n_steps=2)


def normalised(grads: pd.DataFrame) -> pd.DataFrame:
    """The derived gradient metrics (``DERIVED``) per block and step, from the raw records.

    ``grads`` holds, per block and step, ``param_grad_norm``, ``param_norm``, ``param_count``,
    ``activation_grad_norm`` and ``activation_count`` rows; each derived value is its numerator over
    the norm (or the square root of the count) in its denominator.
    """
    keys = [c for c in grads.columns if c not in ("metric", "value")]
    wide = grads.pivot_table(index=keys, columns="metric", values="value").reset_index()
    parts = []
    for metric, (num, den, _) in DERIVED.items():
        if num not in wide or den not in wide:
            continue
        scale = np.sqrt(wide[den]) if den.endswith("count") else wide[den]
        part = wide[keys].assign(metric=metric, value=wide[num] / scale)
        parts.append(part[part["value"].notna()])
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*keys, "metric", "value"])


def with_block_index(grads: pd.DataFrame) -> pd.DataFrame:
    """Add ``block_index``: the block's position in the network, 1 = nearest the input."""
    order = grads[["model", "stage", "block"]].drop_duplicates().sort_values(["model", "stage", "block"])
    order["block_index"] = order.groupby("model").cumcount() + 1
    return grads.merge(order, on=["model", "stage", "block"], how="left")


def by_block(grads: pd.DataFrame, from_step: int) -> pd.DataFrame:
    """Mean over recorded steps (from ``from_step`` on) of each metric, per model, seed and block (tidy)."""
    cols = ["run", "seed", "model", "family", "depth", "stage", "block", "block_index", "downsampling", "metric"]
    out = grads[grads["step"] >= from_step].groupby(cols, as_index=False, sort=False)["value"].mean()
    out["site"] = "stage" + out["stage"].astype(str) + ".block" + out["block"].astype(str)
    return out


def first_over_last(per_block: pd.DataFrame) -> pd.DataFrame:
    """Per model, seed and metric: the first block's value over the last block's."""
    rows = []
    for (model, seed, metric), g in per_block.groupby(["model", "seed", "metric"], sort=False):
        g = g.sort_values("block_index")
        first, last = float(g["value"].iloc[0]), float(g["value"].iloc[-1])
        rows.append({"run": g["run"].iloc[0], "seed": seed, "model": model, "family": g["family"].iloc[0],
                     "depth": int(g["depth"].iloc[0]), "site": "network", "metric": f"{metric}_first_over_last",
                     "value": first / last if last else float("nan"), "first": first, "last": last})
    return pd.DataFrame(rows)


def run(settings: GradientSettings, models: Zoo | None, data: StudyData | None, *, out: str | Path = "runs",
        seeds: Sequence[int] = (0,), device: str = "auto", train: ZooSettings | None = None,
        scale: str | None = None) -> StudyResult:
    """The gradient study on a zoo's gradient records (``models``: a ``Zoo`` from a train_zoo run), or on nets
    trained here (``models=None``)."""
    train = train or trained_nets(scale or "quick")
    if models is not None and "gradients" not in models.tables:
        raise ValueError("the gradient study needs a train_zoo run's gradients table; give its run folder, or no "
                         "model to train the nets here")
    config = study_config(models=[str(f) for f in models.folders] if models is not None else [],
                          data=data.spec if data is not None else None, seeds=seeds, device=device, out=out,
                          scale=scale, settings=settings, train=train)
    provenance = data.provenance() if data is not None else models.data
    with study_run("gradients", config, title=TITLE, data=provenance, source_file=__file__) as r:
        if models is None:
            models = trained_zoo(r, data, train, seeds, resolve_device(device).type)
        else:
            r.add_text("Setup", "Gradient records read from the train_zoo run "
                       + ", ".join(f"`{f}`" for f in models.folders) + ".")
        grads = with_block_index(normalised(models.tables["gradients"]))
        per_block = by_block(grads, settings.from_step)
        tables = {"gradients": grads, "by_block": per_block, "first_over_last": first_over_last(per_block)}
        for name, df in tables.items():
            r.add_table(name, df)
        _report(r, tables, models.tables["final"])
    return StudyResult(r.path, tables, models)


def _report(run, tables: dict[str, pd.DataFrame], final: pd.DataFrame) -> None:
    grads, fl = tables["gradients"], tables["first_over_last"]
    params = final[final["metric"] == "parameters"].groupby("model")["value"].first()
    rows = []
    for model, g in fl.groupby("model", sort=False):
        row = {"model": model, "parameters": f"{int(params.get(model, 0)):,}"}
        for metric, (_, _, label) in DERIVED.items():
            v = g.loc[g["metric"] == f"{metric}_first_over_last", "value"]
            row[f"first / last block: {label.split(',')[0]}"] = format_mean_std(v, digits=3).replace(" (n=1)", "")
        rows.append(row)
    run.add_headline(pd.DataFrame(rows), title="First block over last block, mean over recorded steps "
                                               "(± std over seeds; near 1: no vanishing gradient)")
    models = list(dict.fromkeys(grads.sort_values(["family", "depth"], key=_family_key)["model"]))
    families = list(dict.fromkeys(grads.sort_values("family", key=_family_key)["family"]))
    for metric, (_, _, label) in DERIVED.items():
        run.add_figure(f"{metric}_by_block", "line", "by_block", section="Gradients by block", x="block_index",
                       hue="family", hue_order=families, style="depth", query=f"metric == '{metric}'",
                       flag="downsampling", flag_label="downsampling block", markers=True, logy=True,
                       errorbar="sd", xlabel="block (1 = nearest the input)", ylabel=label.split(", ")[1],
                       title=f"{label.split(',')[0].capitalize()} per block (mean over steps)",
                       caption=f"{label}, averaged over the recorded training steps; rings: downsampling blocks.")
    run.add_figure("relative_param_grad_over_training", "line", "gradients", section="Gradients during training",
                   x="step", hue="block_index", col="model", col_order=models, col_wrap=3,
                   query="metric == 'relative_param_grad'", logy=True, legend_title="block", errorbar=None,
                   xlabel="iteration", ylabel="||dL/dθ|| / ||θ||",
                   title="Relative gradient of every block during training")
    run.add_text("Reading", "In a plain net the gradient reaching a block is the product of the Jacobians of every "
                            "block above it; an identity shortcut adds a direct term to each of those factors, so "
                            "the gradient at the first blocks of a residual net stays of the order of that at the "
                            "last. The ratios in the headline compare the first block with the last on scales "
                            "that do not depend on the blocks' sizes: near 1, the early blocks learn at the rate "
                            "of the late ones; far below 1, they barely learn (vanishing gradients). With batch "
                            "normalisation He et al. (2016) saw no vanishing gradient in plain nets and argued "
                            "that their degradation is an optimisation difficulty of another kind.")


def _family_key(column: pd.Series) -> pd.Series:
    """Sort key: plain, highway, residual, preact, then other families; other columns unchanged."""
    return column.map(family_rank) if column.name == "family" else column


COMMAND = StudyCommand(
    name="gradients", run=run, settings=GradientSettings, inputs="zoo", train=trained_nets,
    description="Per-block gradients during training (RMS per parameter, relative to the weights, per output "
                "element), plain vs highway vs residual, from a train_zoo run or a short training run here.")
