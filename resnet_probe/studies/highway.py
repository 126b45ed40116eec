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

Result at quick scale (highway-20 trained here: CIFAR-10 JPEG pack, 5,000 images, 3 epochs, gate
bias initialised at -2, seed 0; 1,000 test images; 2 shared AMD EPYC CPU cores): intact error
63.8 %; the gates stay mostly carrying (mean T 0.13-0.20 per layer, 0.17 over layers; 16-48 % of
gate values saturated, mostly near 0) and their biases barely move (-1.87 to -1.89). Closing one
layer's gate costs a median 2.6 pp, at most 7.0 pp (stage3.block1, a downsampling block).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .analysis_inputs import add_model_arguments, check_labels, open_analysis, study_models
from .lesion import tidy_sweep
from .options import study_parser

QUICK: dict[str, Any] = dict(
    n_examples=1000,            # evaluation images
    stat_batch=100,             # images per batch of gate statistics (intervals are over batches)
    batch_size=250,             # images per forward chunk of the gate-closing sweep
    n_resamples=200,            # bootstrap resamples of the gate-closing intervals
    families=("highway",), depth=20,                   # nets trained when no checkpoint is given
    recipe="fast", lr=0.2, epochs=3, train_limit=5000, val_size=1000, augment=False)
PAPER: dict[str, Any] = dict(
    n_examples=10_000, stat_batch=500, batch_size=1000, n_resamples=1000,
    families=("highway",), depth=56,
    recipe="paper", lr=0.1, epochs=182, train_limit=None, val_size=5000, augment=True)
GATE_METRICS = {"mean": "gate_mean", "saturated_fraction": "saturated_fraction"}


def build_parser():
    p = study_parser("highway", "Transform-gate statistics per layer of trained highway nets and the error with "
                                "each layer's gate closed (Srivastava et al. 2015).")
    add_model_arguments(p, families=("highway",))
    p.add_argument("--n-examples", dest="n_examples", type=int, default=None, help="evaluation images")
    return p


def gate_statistics(model, x, s: dict, keys: dict) -> pd.DataFrame:
    """Per gated block: ``gate_mean`` and ``saturated_fraction`` (over all values of T on
    the images) with Student-t 95 % intervals over batches, and ``gate_bias_mean`` (mean of the
    gate's learned bias parameters)."""
    from ..models import anatomy
    from ..probes import probe
    from ..report import mean_ci
    anat = anatomy(model)
    per_batch = []
    device = next(model.parameters()).device
    with probe(model, sites="*.gate") as session, torch.no_grad():
        for start in range(0, len(x), s["stat_batch"]):
            model(x[start:start + s["stat_batch"]].to(device))
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
        _, lo, hi = mean_ci(vals)
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


def gate_closing(model, x, y, s: dict, seed: int, keys: dict) -> pd.DataFrame:
    """Error, loss and KL with each layer's gate closed (``gate_closing_sweep``), tidy."""
    from ..lesion import gate_closing_sweep
    df = gate_closing_sweep(model, x, y, batch_size=s["batch_size"], n_resamples=s["n_resamples"], seed=seed)
    df["site"], df["layer"] = df["block"], np.arange(1, len(df) + 1)
    out = tidy_sweep(df, keys, ["site", "layer", "stage", "downsampling"])
    intact = pd.DataFrame([{**keys, "site": "network", "layer": 0, "stage": 0, "downsampling": False,
                            "metric": m, "value": df.attrs[a] * scale, "lo": np.nan, "hi": np.nan}
                           for m, a, scale in (("intact_error_percent", "intact_error", 100.0),
                                               ("intact_loss", "intact_loss", 1.0))])
    return pd.concat([out, intact], ignore_index=True)


def check_gated(sm) -> None:
    ungated = [b.name for b in sm.blocks if b.gate_module is None]
    if ungated:
        raise ValueError(f"{sm.name} is not a highway net ({len(ungated)} blocks without a gate, e.g. {ungated[0]}); "
                         "the highway study needs gated blocks")


def main(argv: list[str] | None = None) -> Path:
    """Run the highway study; returns the run folder."""
    from ..report import new_run
    args, s, device, data, config = open_analysis(build_parser(), argv, QUICK, PAPER)
    with new_run("highway", out=args.out, config=config, data=data.provenance, source_file=__file__, argv=argv,
                 title="Highway study: transform gates and gate closing (Srivastava et al. 2015)") as run:
        gates, closing = [], []
        for sm in study_models(args, s, data, device, run, families=("highway",)):
            check_gated(sm)
            check_labels(sm, data)
            keys = {"run": run.path.name, "seed": sm.seed, "model": sm.name}
            print(f"highway: {sm.name} (seed {sm.seed}): {len(sm.blocks)} gated blocks", flush=True)
            gates.append(gate_statistics(sm.model, data.images, s, keys))
            closing.append(gate_closing(sm.model, data.images, data.labels, s, sm.seed, keys))
            run.add_table("gates", pd.concat(gates, ignore_index=True))
            run.add_table("gate_closing", pd.concat(closing, ignore_index=True))
        write_report(run, s, data)
    return run.path


def headline(gates: pd.DataFrame, closing: pd.DataFrame) -> pd.DataFrame:
    """Per model: intact error, mean gate, saturated fraction, effect of closing one gate."""
    from ..report import format_mean_std
    rows = []
    for model, g in gates.groupby("model", sort=False):
        c = closing[closing["model"] == model]
        intact = c[c["metric"] == "intact_error_percent"].set_index("seed")["value"]
        err = c[c["metric"] == "error_percent"]
        inc = err.assign(d=err["value"] - err["seed"].map(intact))
        by_block = inc.groupby("site", sort=False)["d"].mean()
        per_seed = g.groupby(["seed", "metric"])["value"].mean().unstack()
        rows.append({"model": model, "seeds": int(g["seed"].nunique()),
                     "intact error": format_mean_std(intact, unit="%"),
                     "mean T over layers": format_mean_std(per_seed["gate_mean"], digits=3),
                     "saturated fraction over layers": format_mean_std(per_seed["saturated_fraction"], digits=3),
                     "median Δ error, one gate closed": format_mean_std(inc.groupby("seed")["d"].median(), digits=2,
                                                                        unit="pp"),
                     "most harmful gate to close": f"{by_block.idxmax()} ({by_block.max():+.1f} pp)"})
    return pd.DataFrame(rows)


def write_report(run, s: dict, data) -> None:
    """Texts, figures and headline of a highway run."""
    gates, closing = run.table("gates"), run.table("gate_closing")
    run.add_headline(headline(gates, closing), title="Gates of trained highway nets (± std over seeds)")
    run.add_text("Question", "Highway blocks mix a transform H(x) and the carried input x through a learned gate "
                 "T(x) = sigmoid(W_T x + b_T), with b_T initialised negative so that the untrained net carries. "
                 "Srivastava et al. (2015) found that trained gates are selective: many are closed for most inputs, "
                 "and closing the gates of one layer hurts in some layers and not in others.")
    run.add_text("Method", f"{len(data.labels):,} evaluation images ({data.provenance.get('description', data.kind)}). "
                 "Gate statistics stream through a probe session on T(x) of every block; intervals are Student-t "
                 f"95 % over batches of {s['stat_batch']} images. Closing a gate (T = 0) makes the block output its "
                 f"shortcut S(x); error intervals are 95 % bootstrap over images ({s['n_resamples']} resamples).")
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
