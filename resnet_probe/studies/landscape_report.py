"""The loss-landscape study's report: headline, contour plots of the surfaces (Li et al. 2018, Fig. 5), 1-D
slices, the map of negative curvature and the summaries against depth. Every figure is drawn from a
saved table."""
from __future__ import annotations

import pandas as pd

from ..report import format_mean_std
from .inputs import model_order

SURFACES = "Loss surfaces (Li et al. 2018, Fig. 5)"
AXES = dict(xlabel="α (direction 1)", ylabel="β (direction 2)")
RATIO_LEVELS = [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0]
CONTOUR_TOP = 10.0   # nats: the top of Li et al.'s contour levels


def _value(g: pd.DataFrame, metric: str) -> pd.Series:
    return g.loc[g["metric"] == metric].groupby("seed")["value"].first()


def headline(summary: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    """One row per model: parameters, loss and error at θ, top Hessian eigenvalue, non-convex share, and the largest
    loss on the plane (per seed)."""
    params = models[models["metric"] == "parameters"].groupby("model")["value"].first()
    rows = []
    for model in model_order(summary):
        g = summary[summary["model"] == model]
        converged = _value(g, "hessian_converged")
        iters = _value(g, "hessian_iterations")
        note = "" if converged.all() else f" (not converged in {int(iters.max())} steps)"
        rows.append({"model": model, "parameters": f"{int(params.get(model, 0)):,}", "seeds": int(g["seed"].nunique()),
                     "training loss at θ": format_mean_std(_value(g, "loss_at_origin"), digits=3).replace(" (n=1)", ""),
                     "training error at θ": format_mean_std(_value(g, "error_percent_at_origin"), unit="%")
                     .replace(" (n=1)", ""),
                     "top Hessian eigenvalue": format_mean_std(_value(g, "top_hessian_eigenvalue"), digits=2)
                     .replace(" (n=1)", "") + note,
                     "non-convex share of the plane": format_mean_std(_value(g, "nonconvex_fraction"), digits=2)
                     .replace(" (n=1)", ""),
                     "largest loss on the plane": ", ".join(f"{v:.3g}" for v in _value(g, "max_loss_on_plane"))})
    return pd.DataFrame(rows)


def write_report(run, tables: dict[str, pd.DataFrame], s, data) -> None:
    """Texts, figures and headline of a landscape run."""
    summary, surface = tables["summary"], tables["surface"]
    run.add_headline(headline(summary, tables["models"]),
                     title="Around each trained net (± std over seeds): sharpness and convexity")
    described = summary.drop_duplicates("model").groupby("images", sort=False)["model"].agg(list)
    images = described.index[0] if len(described) == 1 else "; ".join(
        f"{', '.join(models)}: {what}" for what, models in described.items())
    run.add_text("Question", "Is the training loss around a trained net's parameters a smooth bowl or a chaotic "
                 "surface, and do shortcuts make the difference? Li et al. (2018, Fig. 5) found that the surfaces "
                 "of nets without shortcuts turn chaotic as depth grows (56 and 110 layers), while residual nets "
                 "keep a wide, nearly convex basin; the chaotic ones are those that train badly.")
    run.add_text("Method", f"Each surface is L(θ + α d1 + β d2), the mean cross-entropy on {images} ({data.describe()}), "
                 "batch norm in eval mode (the checkpoint's running statistics). d1 and d2 are Gaussian directions "
                 "with each filter rescaled to the norm of the same filter of θ, zero on batch-norm parameters and "
                 f"biases (Li et al.'s filter normalisation), drawn with the model's seed; α and β run over "
                 f"[-{s.span:g}, {s.span:g}] on a {s.resolution} x {s.resolution} grid, the 1-D slice along d1 over "
                 f"{s.slice_points} points. Top Hessian eigenvalue: power iteration on Hessian-vector products "
                 f"(torch.func) at θ on the first {s.hessian_examples} of those images, at most {s.hessian_iters} "
                 f"steps, stopping at a relative change of {s.hessian_tol:g}. Non-convex share: the fraction of "
                 "interior grid points where the 2-D Hessian of the surface (central differences on the grid) has "
                 f"λ_min < 0 with |λ_min| > {s.nonconvex_tol:g} |λ_max|.")
    run.add_text("Departures from Li et al.", "They evaluated the full training set and mapped |λ_min/λ_max| of the "
                 "full Hessian at every grid point (their Fig. 7); here a seeded subset of training images is "
                 "used, the curvature map is that of the plotted 2-D surface (a downward bend in the plane implies "
                 "a negative Hessian eigenvalue, not conversely), and the full Hessian's top eigenvalue is "
                 "estimated at θ only. Li et al. compare nets of 20, 56 and 110 layers after full training; the "
                 "quick scale compares briefly trained nets of 8 and 20 layers.")
    order = model_order(surface)
    first_seed = int(surface["seed"].min())
    depths_known = (surface["depth"] > 0).all()
    grid = dict(row="family", col="depth", row_order=[f for f in ("plain", "highway", "residual", "preact")
                                                      if f in set(surface["family"])]) \
        if depths_known and surface["family"].nunique() * surface["depth"].nunique() <= 24 else \
        dict(col="model", col_order=order, col_wrap=3)
    seeds = surface["seed"].nunique()
    one_seed = f" (seed {first_seed} of {seeds})" if seeds > 1 else ""
    shown = surface[(surface["metric"] == "loss") & (surface["seed"] == first_seed)]["value"]
    low, high = float(shown.min()), float(shown.max())
    top = min(high, max(CONTOUR_TOP, 2 * low))
    run.add_figure("loss_surfaces", "contour", "surface", section=SURFACES,
                   query=f"metric == 'loss' and seed == {first_seed}", x="alpha", y="beta", logz=True, marker=[0, 0],
                   vmin=low, vmax=top, colorbar_label="training loss (nats)",
                   title=f"Training loss around each trained net{one_seed}",
                   caption=f"Filled contours of L(θ + α d1 + β d2) on a log scale shared by all panels, from the lowest "
                           f"loss to {top:.3g} nats (Li et al. draw up to 10); higher losses take the top colour "
                           f"(the highest here: {high:.3g}). The cross marks the trained parameters.", **grid, **AXES)
    run.add_figure("negative_curvature", "contour", "curvature", section=SURFACES,
                   query=f"metric == 'negative_curvature_ratio' and seed == {first_seed}", x="alpha", y="beta",
                   levels=RATIO_LEVELS, cmap="magma", marker=[0, 0], colorbar_label="|λ_min / λ_max| where λ_min < 0",
                   title="Where the surface curves downwards", caption=(
                       "|λ_min / λ_max| of the surface's 2-D Hessian (central differences on the grid), 0 where both "
                       "curvatures are positive; above 1 % the point counts as non-convex (Li et al. 2018, Fig. 7, "
                       "for the plotted plane)."), **grid, **AXES)
    line = dict(x="alpha", hue="model", hue_order=order, xlabel="α (along direction 1)")
    run.add_figure("slice_loss", "line", "slice", section="1-D slices", query="metric == 'loss'", logy=True,
                   ylabel="training loss (nats)", title="Training loss along one filter-normalised direction",
                   caption="Mean over seeds (band: 95 % interval over seeds when there are several).", **line)
    run.add_figure("slice_error", "line", "slice", section="1-D slices", query="metric == 'error_percent'",
                   ylabel="training error (%)", title="Training error along the same direction", **line)
    if depths_known:
        run.add_figure("summaries_by_depth", "line", "summary", section="Against depth",
                       query="metric in ['top_hessian_eigenvalue', 'nonconvex_fraction']",
                       x="depth", hue="family", col="metric", sharey=False, markers=True, xlabel="depth (layers)",
                       ylabel="value", title="Sharpness and convexity against depth",
                       caption="Per family: the top Hessian eigenvalue at θ and the non-convex share of the plane "
                               "(mean over seeds).")
    run.add_text("Reading", "A residual net's surface should stay a single basin around the cross at every depth; a "
                 "plain net's should bend more, rise higher at the rim and show non-convex regions as it gets "
                 "deeper. The top Hessian eigenvalue measures how sharp the basin is at θ (filter normalisation "
                 "makes the surfaces, not the eigenvalues, comparable across nets: the eigenvalue depends on the "
                 "parameters' scale).")
