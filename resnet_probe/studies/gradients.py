"""Gradient norms per block during training: plain vs highway vs residual.

Question: does the gradient reaching the early blocks of a plain net shrink with depth (so those
blocks barely train), while identity shortcuts (residual) and carry gates (highway) keep it up?

Measured during training by ``ProbeCallback`` every few optimizer steps, before the optimizer step:
per block the norm of the gradient of the loss with respect to the block's parameters
(``param_grad_norm``, the L2 norm over all of the block's parameter gradients) and the norm of the
gradient with respect to the block's output (``activation_grad_norm``), for every model of a
``train_zoo`` run (``--zoo RUN_DIR``) or of nets trained here.

Figures: mean gradient norm per block against the block's position (input to output), and the norm
of every block against the iteration. Headline: per model, the mean parameter-gradient norm of the
first and the last block and their ratio (first / last; mean ± std over seeds).

Result at quick scale (2 AMD EPYC cores shared with other jobs (load average 4-5), 1 torch thread, JPEG pack,
seed 0; the quickstart zoo, norms every 5 steps; measured 2026-11-23): first / last block parameter-gradient
norm 1.42 (plain-20), 1.37 (highway-20), 1.04 (residual-20): with batch normalisation the gradient does not
vanish towards the input at depth 20 in either family -- as He et al. argue, the degradation of plain nets is
not a vanishing-gradient effect.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import train_zoo

QUICK: dict[str, Any] = {**train_zoo.QUICK, "depths": (20,), "epochs": 1, "grad_every_n_steps": 2}
PAPER: dict[str, Any] = {**train_zoo.PAPER, "depths": (20, 56, 110)}
GRADIENT_METRICS = ("param_grad_norm", "activation_grad_norm")


def with_block_index(grads: "pd.DataFrame") -> "pd.DataFrame":
    """Add ``block_index``: the block's position in the network, 1 = nearest the input."""
    g = grads.copy()
    order = (g[["model", "stage", "block"]].drop_duplicates().sort_values(["model", "stage", "block"]))
    order["block_index"] = order.groupby("model").cumcount() + 1
    return g.merge(order, on=["model", "stage", "block"], how="left")


def by_block(grads: "pd.DataFrame") -> "pd.DataFrame":
    """Mean over recorded steps of each gradient norm, per model, seed and block (tidy)."""
    cols = ["run", "seed", "model", "family", "depth", "stage", "block", "block_index", "downsampling", "metric"]
    out = grads.groupby(cols, as_index=False, sort=False)["value"].mean()
    out["site"] = "stage" + out["stage"].astype(str) + ".block" + out["block"].astype(str)
    return out


def first_last(per_block: "pd.DataFrame") -> "pd.DataFrame":
    """Per model and seed: mean norm of the first and last block and their ratio, for each gradient metric."""
    import pandas as pd
    rows = []
    for (model, seed, metric), g in per_block.groupby(["model", "seed", "metric"], sort=False):
        g = g.sort_values("block_index")
        first, last = float(g["value"].iloc[0]), float(g["value"].iloc[-1])
        base = {"run": g["run"].iloc[0], "seed": seed, "model": model, "family": g["family"].iloc[0],
                "depth": int(g["depth"].iloc[0]), "site": "network"}
        rows += [{**base, "metric": f"{metric}_first", "value": first},
                 {**base, "metric": f"{metric}_last", "value": last},
                 {**base, "metric": f"{metric}_first_over_last", "value": first / last if last else float("nan")}]
    return pd.DataFrame(rows)


def _family_rank(column: "pd.Series") -> "pd.Series":
    """Sort key: plain, highway, residual, then other families; other columns unchanged."""
    if column.name != "family":
        return column
    return column.map(train_zoo.family_rank)


def main(argv: list[str] | None = None) -> Path:
    """Run the gradient-norm study; returns its run folder."""
    args, settings = train_zoo.parse_zoo_study(
        "gradients", "Per-block gradient norms during training, plain vs highway vs residual, "
                     "from a train_zoo run or a short training run here.",
        "a train_zoo run folder whose gradient records to read (default: train here)", argv, QUICK, PAPER)
    from ..report import new_run

    zoo = train_zoo.ZooInput(args, settings, needs=("gradients",))
    every = (zoo.config.get("zoo_config") or {}).get("grad_every_n_steps", "?") if args.zoo \
        else settings["grad_every_n_steps"]
    with new_run("gradients", out=args.out, config=zoo.config, data=zoo.data, source_file=__file__, argv=argv,
                 title="Gradient norms per block during training") as run:
        grads = zoo.tables(run, "Gradient records", f" Gradient norms recorded every {every} steps.")["gradients"]
        _report(run, with_block_index(grads[grads["metric"].isin(GRADIENT_METRICS)]))
    return run.path


def _report(run, grads) -> None:
    import pandas as pd
    from ..report import format_mean_std
    run.add_table("gradients", grads)
    per_block = by_block(grads)
    run.add_table("by_block", per_block)
    fl = first_last(per_block)
    run.add_table("first_last", fl)
    rows = []
    for model, g in fl.groupby("model", sort=False):
        def cell(metric: str) -> str:
            return format_mean_std(g.loc[g["metric"] == metric, "value"], digits=3)
        rows.append({"model": model, "first block ||dL/dθ||": cell("param_grad_norm_first"),
                     "last block ||dL/dθ||": cell("param_grad_norm_last"),
                     "first / last": cell("param_grad_norm_first_over_last"),
                     "first / last, block output ||dL/dx||": cell("activation_grad_norm_first_over_last")})
    run.add_headline(pd.DataFrame(rows), title="Parameter-gradient norm of the first and last block, mean over "
                                               "training steps (mean ± std over seeds)")
    models = list(dict.fromkeys(grads.sort_values(["family", "depth"], key=_family_rank)["model"]))
    families = list(dict.fromkeys(grads.sort_values("family", key=_family_rank)["family"]))
    for metric, label, what in (("param_grad_norm", "||dL/dθ||", "Parameter-gradient norm"),
                                ("activation_grad_norm", "||dL/dx||", "Block-output gradient norm")):
        run.add_figure(f"{metric}_by_block", "line", "by_block", section="Gradient norm by block", x="block_index",
                       hue="family", hue_order=families, style="depth", query=f"metric == '{metric}'",
                       flag="downsampling", flag_label="downsampling block", markers=True, logy=True,
                       errorbar="sd", xlabel="block (1 = nearest the input)", ylabel=label,
                       title=f"{what} per block (mean over steps)",
                       caption=f"{label}: L2 norm of the gradient of the training loss with respect to "
                               + ("the block's parameters" if metric == "param_grad_norm" else "the block's output")
                               + ", averaged over the recorded steps; rings: downsampling blocks.")
    run.add_figure("param_grad_norm_over_training", "line", "gradients", section="Gradient norm during training",
                   x="step", hue="block_index", col="model", col_order=models, palette="viridis",
                   query="metric == 'param_grad_norm'", logy=True, legend_title="block", errorbar=None,
                   xlabel="iteration", ylabel="||dL/dθ|| of the block's parameters",
                   title="Parameter-gradient norm of every block during training")
    run.add_text("Reading", "In a plain net the gradient reaching a block is the product of the Jacobians of every "
                            "block above it; an identity shortcut adds a direct term to each of those factors, so "
                            "the gradient at the first blocks of a residual net stays of the order of that at the "
                            "last. A first/last ratio far below 1 means the early blocks receive little gradient.")
