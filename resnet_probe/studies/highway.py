"""Highway study (Srivastava, Greff, Schmidhuber 2015): how do trained highway nets use their gates?

Question: a highway block outputs ``H(x) T(x) + x (1 - T(x))`` with a transform gate ``T`` whose
bias starts negative (carry-biased). After training, how open are the gates layer by layer, how
many gate values are saturated (T < 0.1 or T > 0.9), where did the gate biases go, and how much
does the network lose when one layer's gate is closed (forced to carry, ``T = 0``)?

Paper figures: Srivastava et al. 2015, Fig. 2 (mean transform-gate activity and gate bias per
layer) and Fig. 4 (lesioned highway nets: error with one layer's gates closed, per layer).

Gate statistics come from ``resnet_probe.probes`` (streaming, one session over the evaluation
images): per layer the mean of T over images, channels and positions, and the saturated fraction;
intervals are Student-t 95 % over batches of ``stat_batch`` images. The gate-closing curve is
``resnet_probe.lesion.gate_closing_sweep`` with 95 % bootstrap intervals over images.

Models: highway CIFAR nets (``CHECKPOINT...``, ``train_zoo`` folders, or nets trained here).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..lesion import gate_closing_sweep
from ..models import anatomy
from ..probes import probe
from ..report import format_mean_std
from ..report import t_mean_ci
from .analysis import analysis_run
from .spec import StudyCommand
from .inputs import StudyData, StudyModel, Zoo
from .lesion import tidy_sweep
from .runs import StudyResult
from .train_zoo import ZooSettings

TITLE = "Highway study: transform gates and gate closing (Srivastava et al. 2015)"
GATE_METRICS = {"mean": "gate_mean", "saturated_fraction": "saturated_fraction"}


@dataclass(frozen=True)
class HighwaySettings:
    """Sizes of the highway study.

    Args:
        n_examples: evaluation images.
        stat_batch: images per batch of gate statistics (intervals are over batches).
        batch_size: images per forward chunk of the gate-closing sweep.
        n_resamples: bootstrap resamples of the gate-closing intervals.
    """

    n_examples: int = 1000
    stat_batch: int = 100
    batch_size: int = 250
    n_resamples: int = 200

    def __post_init__(self) -> None:
        for name in ("n_examples", "stat_batch", "batch_size", "n_resamples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")

    @classmethod
    def quick(cls) -> "HighwaySettings":
        return cls()

    @classmethod
    def paper(cls) -> "HighwaySettings":
        return cls(n_examples=10_000, stat_batch=500, batch_size=1000, n_resamples=1000)

    @classmethod
    def tiny(cls) -> "HighwaySettings":
        return cls(n_examples=64, stat_batch=32, batch_size=64, n_resamples=20)


def trained_nets(scale: str) -> ZooSettings:
    """The nets trained when no model is given: one highway net (highway-56 at paper scale)."""
    if scale == "paper":
        return ZooSettings.paper().only(("highway",), (56,))
    base = ZooSettings.tiny() if scale == "tiny" else replace(
        ZooSettings.quick(), lr=0.2, train_limit=5000, batch_size=128, val_every_n_steps=40)
    return base.only(("highway",), (base.depths["highway"][-1],))


def gate_statistics(model, x, s: HighwaySettings, keys: dict) -> pd.DataFrame:
    """Per gated block: ``gate_mean`` and ``saturated_fraction`` (over all values of T on
    the images) with Student-t 95 % intervals over batches, and ``gate_bias_mean`` (mean of the
    gate's learned bias parameters)."""
    anat = anatomy(model)
    per_batch = []
    device = next(model.parameters()).device
    with probe(model, sites="*.gate") as session, torch.no_grad():
        for start in range(0, len(x), s.stat_batch):
            model(x[start:start + s.stat_batch].to(device))
            t = session.table()
            per_batch.append(t[t["metric"].isin(list(GATE_METRICS) + ["count"])])
            session.reset()
    both = pd.concat(per_batch, ignore_index=True)
    pos = {b.name: i for i, b in enumerate(anat.blocks)}
    rows = []
    for (site, metric), g in both[both["metric"] != "count"].groupby(["site", "metric"], sort=False):
        counts = both.loc[(both["site"] == site) & (both["metric"] == "count"), "value"].to_numpy()
        vals = g["value"].to_numpy()
        value = float(np.average(vals, weights=counts))
        _, lo, hi = t_mean_ci(vals)
        block = site.rsplit(".", 1)[0]
        rows.append({**keys, "site": block, "layer": pos[block] + 1, "downsampling": bool(g["downsampling"].iloc[0]),
                     "metric": GATE_METRICS[metric], "value": value, "lo": lo, "hi": hi})
    for i, b in enumerate(anat.blocks):
        biases = [p.detach().double().mean().item() for n, p in b.gate_module.named_parameters()
                  if n.endswith("bias")]
        if biases:
            rows.append({**keys, "site": b.name, "layer": i + 1, "downsampling": b.downsampling,
                         "metric": "gate_bias_mean", "value": float(np.mean(biases)), "lo": np.nan, "hi": np.nan})
    return pd.DataFrame(rows)


def gate_closing(model, x, y, s: HighwaySettings, seed: int, keys: dict) -> pd.DataFrame:
    """Error, loss and KL with each layer's gate closed (``gate_closing_sweep``), tidy."""
    df = gate_closing_sweep(model, x, y, batch_size=s.batch_size, n_resamples=s.n_resamples, seed=seed)
    df["site"], df["layer"] = df["block"], np.arange(1, len(df) + 1)
    out = tidy_sweep(df, keys, ["site", "layer", "stage", "downsampling"])
    intact = pd.DataFrame([{**keys, "site": "network", "layer": 0, "stage": 0, "downsampling": False,
                            "metric": m, "value": df.attrs[a] * scale, "lo": np.nan, "hi": np.nan}
                           for m, a, scale in (("intact_error_percent", "intact_error", 100.0),
                                               ("intact_loss", "intact_loss", 1.0))])
    return pd.concat([out, intact], ignore_index=True)


def check_gated(sm: StudyModel) -> None:
    ungated = [b.name for b in sm.blocks if b.gate_module is None]
    if ungated:
        raise ValueError(f"{sm.name} is not a highway net ({len(ungated)} blocks without a gate, e.g. {ungated[0]}); "
                         "the highway study needs gated blocks")


def gate_bias_decay(sm: StudyModel) -> str:
    """Whether the net's gate biases were weight-decayed in training, as its checkpoint records it."""
    value = sm.info.get("hparams", {}).get("gate_bias_decay")
    return "not recorded" if value is None else ("decayed" if value else "not decayed")


def measure(s: HighwaySettings):
    def one(sm: StudyModel, x, y, keys: dict) -> dict[str, pd.DataFrame]:
        keys = {**keys, "gate_bias_decay": gate_bias_decay(sm)}
        return {"gates": gate_statistics(sm.model, x, s, keys),
                "gate_closing": gate_closing(sm.model, x, y, s, sm.seed, keys)}
    return one


def run(settings: HighwaySettings, models: Zoo | Sequence | None, data: StudyData, *, out: str | Path = "runs",
        seeds: Sequence[int] = (0,), device: str = "auto", train: ZooSettings | None = None,
        scale: str | None = None) -> StudyResult:
    """Gate statistics and gate closing of highway ``models`` (or of a highway net trained here)."""
    return analysis_run("highway", title=TITLE, source_file=__file__, settings=settings, models=models, data=data,
                        out=out, seeds=seeds, device=device, train=train or trained_nets(scale or "quick"),
                        scale=scale, measure=measure(settings), check=check_gated,
                        report=lambda r, tables, d, n: write_report(r, tables, settings, d, n))


def headline(gates: pd.DataFrame, closing: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    """Per model: parameters, intact error, mean gate, saturated fraction, effect of closing one gate."""
    params = models[models["metric"] == "parameters"].groupby("model")["value"].first()
    rows = []
    for model, g in gates.groupby("model", sort=False):
        c = closing[closing["model"] == model]
        intact = c[c["metric"] == "intact_error_percent"].set_index("seed")["value"]
        err = c[c["metric"] == "error_percent"]
        inc = err.assign(d=err["value"] - err["seed"].map(intact))
        by_block = inc.groupby("site", sort=False)["d"].mean()
        per_seed = g.groupby(["seed", "metric"])["value"].mean().unstack()
        rows.append({"model": model, "parameters": f"{int(params.get(model, 0)):,}", "seeds": int(g["seed"].nunique()),
                     "gate biases in training": g["gate_bias_decay"].iloc[0],
                     "intact error": format_mean_std(intact, unit="%"),
                     "mean T over layers": format_mean_std(per_seed["gate_mean"], digits=3),
                     "saturated fraction over layers": format_mean_std(per_seed["saturated_fraction"], digits=3),
                     "mean Δ error, one gate closed": format_mean_std(inc.groupby("seed")["d"].mean(), digits=2,
                                                                      unit="pp"),
                     "most harmful gate to close": f"{by_block.idxmax()} ({by_block.max():+.1f} pp)"})
    return pd.DataFrame(rows)


def write_report(run, tables: dict[str, pd.DataFrame], s: HighwaySettings, data: StudyData, n_images: int) -> None:
    """Texts, figures and headline of a highway run."""
    gates, closing = tables["gates"], tables["gate_closing"]
    run.add_headline(headline(gates, closing, tables["models"]),
                     title="Gates of trained highway nets (± std over seeds)")
    run.add_text("Question", "Highway blocks mix a transform H(x) and the carried input x through a learned gate "
                 "T(x) = sigmoid(W_T x + b_T), with b_T initialised negative so that the untrained net carries. "
                 "Srivastava et al. (2015) found that trained gates are selective: many are closed for most inputs, "
                 "and closing the gates of one layer hurts in some layers and not in others.")
    run.add_text("Method", f"{n_images:,} evaluation images ({data.describe()}). Gate statistics stream through "
                 "a probe session on T(x) of every block; intervals are Student-t 95 % over batches of "
                 f"{s.stat_batch} images. Closing a gate (T = 0) makes the block output its shortcut S(x); error "
                 f"intervals are 95 % bootstrap over images ({s.n_resamples} resamples). A highway block has a "
                 "third convolution (the gate) beside the two of its transform, so a highway net has about 1.5 "
                 "times the parameters of the plain or residual net of the same depth (headline: parameters). The "
                 "projects' nets are trained without weight decay on the gate biases by default "
                 "(`--train.gate_bias_decay true` decays them): decay would pull the carry-biased initial "
                 "bias towards zero, mixing the optimiser's pull into the biases reported here.")
    section = "Gates per layer (Srivastava et al. 2015, Fig. 2)"
    common = dict(x="layer", hue="model", markers=True, flag="downsampling",
                  flag_label="downsampling block (shortcut changes shape)", xlabel="layer (block) index")
    run.add_figure("gate_mean", "line", "gates", section=section, query="metric == 'gate_mean'", lo="lo", hi="hi",
                   ylabel="mean transform gate T(x)", title="Mean transform-gate activity per layer", **common)
    run.add_figure("gate_saturation", "line", "gates", section=section, query="metric == 'saturated_fraction'",
                   lo="lo", hi="hi", ylabel="fraction of T(x) < 0.1 or > 0.9",
                   title="Saturated gate values per layer", **common)
    run.add_figure("gate_bias", "line", "gates", section=section, query="metric == 'gate_bias_mean'",
                   ylabel="mean gate bias b_T", title="Learned gate bias per layer", **common)
    intact = closing[closing["metric"] == "intact_error_percent"].groupby("model", sort=False)["value"].mean()
    run.add_figure("gate_closing", "line", "gate_closing", section="Closing gates (Srivastava et al. 2015, Fig. 4)",
                   query="metric == 'error_percent'", lo="lo", hi="hi", ylabel="test error (%)",
                   title="Error with one layer's gate closed (T = 0)",
                   caption="Intact error: " + "; ".join(f"{m}: {v:.1f} %" for m, v in intact.items()) + ".", **common)


COMMAND = StudyCommand(
    name="highway", run=run, settings=HighwaySettings, inputs="models", train=trained_nets, families=("highway",),
    description="Transform-gate statistics per layer of trained highway nets and the error with each layer's gate "
                "closed (Srivastava et al. 2015).")
