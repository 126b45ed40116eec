"""The shattered-gradients study's report: correlation against distance (Balduzzi et al. 2017), correlation length
against depth, and a headline with the decay rate per family. Every figure is drawn from a saved table."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .inputs import model_order

CURVES = "Correlation against distance"
HALF_NOTE = "the correlation length is where the mean curve crosses 1/2"


def _length_text(g: pd.DataFrame) -> str:
    """Mean correlation length over seeds, with ``<`` / ``>`` when a bound."""
    bound = set(g["bound"].fillna(""))
    value = float(np.exp(np.log(g["value"]).mean()))
    prefix = "< " if "below" in bound else "> " if "above" in bound else ""
    return f"{prefix}{value:.2g}"


def decay_rates(lengths: pd.DataFrame) -> pd.DataFrame:
    """Per family and state: the least-squares slope of log10(correlation length) against depth over measured
    (not bounded) lengths of the random-direction lines, as the factor by which the length shrinks per 10 layers."""
    rows = []
    sel = lengths[(lengths["metric"] == "correlation_length") & (lengths["line"] == "random")
                  & (lengths["bound"].fillna("") == "") & (lengths["depth"] > 0)]
    for (family, state), g in sel.groupby(["family", "state"], sort=False):
        if g["depth"].nunique() < 2:
            continue
        slope = np.polyfit(g["depth"].to_numpy(float), np.log10(g["value"].to_numpy(float)), 1)[0]
        rows.append({"family": family, "state": state, "depths": ", ".join(map(str, sorted(g["depth"].unique()))),
                     "length shrinks per 10 layers by": f"x {10 ** (-10 * slope):.2g}"})
    return pd.DataFrame(rows)


def headline(lengths: pd.DataFrame, smallest: float) -> pd.DataFrame:
    """One row per model: correlation length along random directions at initialisation and trained, and the
    correlation at the smallest distance and at the first interpolation step."""
    rows = []
    for model in model_order(lengths):
        g = lengths[lengths["model"] == model]
        row = {"model": model}
        for state in ("initialisation", "trained"):
            s = g[g["state"] == state]
            if not len(s):
                row[f"length ({state})"] = "n/a"
                continue
            rand = s[s["line"] == "random"]
            row[f"length ({state})"] = _length_text(rand[rand["metric"] == "correlation_length"])
            first = rand.loc[rand["metric"] == "first_correlation", "value"].mean()
            interp = s[(s["line"] == "interpolation") & (s["metric"] == "first_correlation")]["value"].mean()
            row[f"C at r = {smallest:g} / first step to the next image ({state})"] = f"{first:.2f} / {interp:.2f}"
        rows.append(row)
    return pd.DataFrame(rows)


def write_report(run, tables: dict[str, pd.DataFrame], s, data, n_images: int) -> None:
    """Texts, figures and headline of a shattered-gradients run."""
    corr, lengths = tables["correlation"], tables["lengths"]
    run.add_headline(headline(lengths, s.min_distance), title="Correlation length of input gradients along random directions "
                     "(L2 distance; normalised CIFAR images have norm ~58)")
    rates = decay_rates(lengths)
    if len(rates):
        run.add_headline(rates, title="How fast the correlation length falls with depth (fit over depths)")
    target = "the logit of the start image's class" if s.target == "logit" else "the cross-entropy with its label"
    run.add_text("Question", "Balduzzi et al. (2017) found that the input gradients of deep plain nets are "
                 "'shattered': along a line of inputs they look like white noise, the correlation between "
                 "neighbouring gradients decaying exponentially with depth, while in residual nets it decays far "
                 "more slowly. Does it hold here, at initialisation and after training?")
    run.add_text("Method", f"{n_images} start images ({data.describe()}). From each, the gradient of {target} with "
                 f"respect to the input (eval mode) is correlated (Pearson, over pixels and channels) with the "
                 f"gradient at distance r along a random unit direction ({s.n_distances} log-spaced r from "
                 f"{s.min_distance:g} to {s.max_distance:g}) and along the straight line to the next start image "
                 f"({s.interpolation_points} evenly spaced points). C(r) is the mean over start images; "
                 f"{HALF_NOTE} (interpolated in log r; '<' or '>' when it lies outside the measured distances). "
                 "Initialisation: a fresh net of the same architecture drawn with the model's seed, batch-norm "
                 f"running statistics set from the evaluation images; depths {', '.join(map(str, s.init_depths))} "
                 "are added at initialisation only.")
    run.add_text("Departures from Balduzzi et al.", "Their nets map a scalar input to a scalar output on an evenly "
                 "spaced 1-D grid and average over all pairs at each lag; here the inputs are images, the output a "
                 "fixed logit (or the loss), and each line starts at an image and reaches out over log-spaced "
                 "distances.")
    order = model_order(corr)
    common = dict(hue="model", hue_order=order, col="state", col_order=["initialisation", "trained"], markers=True,
                  ylabel="gradient correlation C", errorbar="ci95")
    run.add_figure("correlation_random", "line", "correlation", section=CURVES, query="line == 'random'",
                   x="distance", logx=True, xlabel="distance r along a random direction (L2)",
                   title="Input-gradient correlation against distance (random directions)",
                   caption="Mean over start images (band: 95 % interval over them). Shattered gradients fall to 0 "
                           f"within a short distance; {HALF_NOTE}.", **common)
    run.add_figure("correlation_interpolation", "line", "correlation", section=CURVES,
                   query="line == 'interpolation'", x="position",
                   xlabel="fraction of the way to the next image", title="Along the line from one image to another",
                   caption="Mean over start images (band: 95 % interval over them).", **common)
    measured = lengths[(lengths["metric"] == "correlation_length") & (lengths["line"] == "random")
                       & (lengths["depth"] > 0)]
    if measured["depth"].nunique() > 1:
        run.add_figure("correlation_length_by_depth", "line", "lengths", section="Against depth",
                       query="metric == 'correlation_length' and line == 'random' and depth > 0", x="depth",
                       hue="family", style="state", style_order=["initialisation", "trained"], markers=True,
                       logy=True, xlabel="depth (layers)", ylabel="correlation length (L2 distance)",
                       title="Correlation length against depth",
                       caption="Balduzzi et al.: without shortcuts the correlation decays exponentially with depth, a "
                               "straight falling line on this log scale. Points at "
                               f"{s.min_distance:g} or {s.max_distance:g} are bounds (the curve was already below, or "
                               "never fell below, 1/2).")
