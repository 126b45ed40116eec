"""Layer response std (He et al. 2016, Fig. 7): residual functions are closer to zero than plain layers.

Question: if residual nets learn functions that are small perturbations of the identity, the
responses of their branch layers should be smaller than those of the same layers in a plain net.

Measured, for every model given: the *response* of each layer of every block's branch -- its output
after BN, before ReLU or the addition -- as the std over all (N, C, H, W) values of the evaluation
images (``std``, the quantity of He et al. Fig. 7) and as the mean over channels of the per-channel
std (``channel_std_mean``); per block the branch output ``F(x)`` (the last layer's response) and the
ratio ``||F(x)|| / ||S(x)||``. Models run in eval mode (BN with its running statistics) on the
CIFAR-10 test images (a seeded subset at quick scale) or, for torchvision ResNets, on an ImageNet-style
folder (``--data imagefolder=PATH``, resize 256 / center crop 224 / ImageNet normalisation).

Figure: response std per layer in the network's order and sorted by magnitude (He et al. Fig. 7).
Headline: per model, the mean over layers of the response std (mean ± std over seeds).

Result at quick scale (2 AMD EPYC cores shared with other jobs (load average 4-5), 1 torch thread, JPEG pack,
seed 0; nets of ``train_zoo``'s quick scale, 1,000 test images; measured 2026-11-23): mean branch ``F(x)`` std
0.973 (plain-20), 0.966 (highway-20), 0.916 (residual-20); mean layer response std 0.975 / 0.961 / 0.941; the
gap grows along the residual net (its second layers fall to ~0.90 by the last stage). After only 189 steps
every std is still near the BN scale's initial 1; He et al.'s fully trained nets separate much more. ~9 s for
five nets.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .options import (add_imagenet_arguments, add_load_arguments, resolve_device, scale_settings,
                      set_threads, study_parser)

QUICK: dict[str, Any] = dict(n_examples=1000,     # test images the responses are measured on
                             batch_size=250)      # images per forward pass
PAPER: dict[str, Any] = dict(n_examples=10_000, batch_size=500)
METRICS = (("std", "response_std"), ("channel_std_mean", "response_channel_std_mean"))


def layer_responses(model, images, batch_size: int = 250, device: str = "cpu") -> "pd.DataFrame":
    """Response statistics of every branch layer, branch output and shortcut of ``model``.

    Args:
        model: any model ``resnet_probe.models.anatomy`` supports, in eval mode.
        images: normalised float images ``(N, C, H, W)``.
        batch_size: images per forward pass.
        device: where the forward passes run.

    Returns:
        Tidy rows ``site, stage, block, kind, layer`` (1-based position of the layer in forward order, for
        kind ``layer``), ``metric`` (``response_std``, ``response_channel_std_mean``, ``norm_ratio``),
        ``value``, ``downsampling``, ``path``.
    """
    import pandas as pd
    import torch

    from ..probes import probe
    model = model.to(device).eval()
    with torch.no_grad(), probe(model, sites=["*.branch.*", "*.branch", "*.shortcut"]) as session:
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size].to(device))
    df = session.table()
    names = {m: new for m, new in METRICS}
    df = df[df["metric"].isin(list(names) + ["norm_ratio"])].copy()
    df["metric"] = df["metric"].map(lambda m: names.get(m, m))
    layers = [s for s in dict.fromkeys(df.loc[df["kind"] == "layer", "site"])]
    index = {s: i + 1 for i, s in enumerate(layers)}
    df["layer"] = df["site"].map(index).astype("Int64")
    return df.drop(columns=["step"]).reset_index(drop=True)


def summary_rows(df: "pd.DataFrame") -> "pd.DataFrame":
    """Per model and seed: mean over layers of ``response_std`` and mean over blocks of the branch std."""
    import pandas as pd
    rows = []
    for (model, seed), g in df.groupby(["model", "seed"], sort=False):
        base = {"run": g["run"].iloc[0], "seed": seed, "model": model, "site": "network"}
        layer = g[(g["kind"] == "layer") & (g["metric"] == "response_std")]["value"]
        branch = g[(g["kind"] == "branch") & (g["metric"] == "response_std")]["value"]
        ratio = g[g["metric"] == "norm_ratio"]["value"]
        rows += [{**base, "metric": "mean_layer_response_std", "value": float(layer.mean()), "n": len(layer)},
                 {**base, "metric": "mean_branch_response_std", "value": float(branch.mean()), "n": len(branch)},
                 {**base, "metric": "mean_norm_ratio", "value": float(ratio.mean()), "n": len(ratio)}]
    return pd.DataFrame(rows)


def _sources(args) -> list[tuple[str, int | None]]:
    """``(checkpoint, seed)`` of every model: positional checkpoints, then every model of ``--zoo``."""
    from .train_zoo import zoo_checkpoints
    out: list[tuple[str, int | None]] = [(c, None) for c in args.checkpoints]
    for zoo in args.zoo or []:
        z = zoo_checkpoints(zoo)
        out += [(c, int(s)) for c, s in zip(z["checkpoint"], z["seed"])]
    if not out:
        raise SystemExit("response_std: give CHECKPOINT... (project .ckpt, torchvision state_dict, torchvision:ARCH) "
                         "or --zoo RUN_DIR (a train_zoo run)")
    return out


def main(argv: list[str] | None = None) -> Path:
    """Measure per-layer response std of every model given; returns the run folder."""
    p = study_parser("response_std", "He et al. Fig. 7: std of each branch layer's response (after BN, before "
                                     "ReLU / addition), in network order and sorted, for every model given.")
    p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT",
                   help="project .ckpt, torchvision ResNet state_dict file, or torchvision:ARCH")
    p.add_argument("--zoo", metavar="RUN_DIR", action="append", default=None,
                   help="a train_zoo run folder: measure every model in it (repeatable)")
    p.add_argument("--n-examples", dest="n_examples", type=int, default=None, help="evaluation images")
    add_load_arguments(p)
    add_imagenet_arguments(p)
    args = p.parse_args(argv)
    set_threads(args.threads)
    settings = scale_settings(args, QUICK, PAPER)
    sources = _sources(args)
    device = resolve_device(args.device).type

    import pandas as pd
    import torch
    from ..report import new_run
    from .analysis_inputs import eval_images, model_label
    from .imagenet import load_study_model
    evaluated = eval_images(args.data, settings["n_examples"], args.seeds[0], args.limit, "response_std")
    images, data = evaluated.images, evaluated.provenance
    config = {**settings, "scale": args.scale, "models": [s for s, _ in sources], "weights": args.weights,
              "device": device}
    with new_run("response_std", out=args.out, config=config, data=data, source_file=__file__, argv=argv,
                 title="Layer responses (He et al. 2016, Fig. 7)") as run:
        parts = []
        for src, zoo_seed in sources:
            seed = args.seeds[0] if zoo_seed is None else zoo_seed
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model, info = load_study_model(src, weights=args.weights, arch=args.arch,
                                               allow_unsafe=args.allow_unsafe_load, download=args.download)
            seed = int(info["hparams"].get("seed", seed))
            label = model_label(info)
            print(f"response_std: {label} seed {seed}", flush=True)
            df = layer_responses(model, images, settings["batch_size"], device)
            for col, v in reversed(list({"run": run.path.name, "seed": seed, "model": label}.items())):
                df.insert(0, col, v)
            df["family"] = info["hparams"].get("family", info["arch"])
            df["depth"] = info["hparams"].get("depth", -1)
            parts.append(df)
            run.add_table("responses", pd.concat(parts, ignore_index=True))
        responses = run.table("responses")
        _report(run, responses, summary_rows(responses), len(images))
    return run.path


def _report(run, responses, summary, n_images: int) -> None:
    import pandas as pd
    from ..report import format_mean_std
    run.add_table("summary", summary)
    rows = []
    for model, g in summary.groupby("model", sort=False):
        row = {"model": model}
        for metric, label in (("mean_layer_response_std", "mean layer response std"),
                              ("mean_branch_response_std", "mean branch F(x) std"),
                              ("mean_norm_ratio", "mean ||F(x)|| / ||S(x)||")):
            row[label] = format_mean_std(g.loc[g["metric"] == metric, "value"], digits=3)
        rows.append(row)
    run.add_headline(pd.DataFrame(rows), title="Response std per model: mean over layers / blocks "
                                               "(mean ± std over seeds)")
    models = list(dict.fromkeys(responses["model"]))
    per_family = responses.groupby("family")["model"].nunique()
    # two depths per family: a light and a dark shade of one colour per family
    palette = "Paired" if (per_family == 2).all() and len(models) <= 12 else None
    run.add_figure("layer_std", "layer_profile", "responses", section="Layer responses", x="layer",
                   hue="model", hue_order=models, palette=palette, flag="downsampling", flag_label="downsampling block",
                   query="kind == 'layer' and metric == 'response_std'", errorbar="sd",
                   xlabel="layer", ylabel="response std",
                   title="Std of each layer's response after BN, before ReLU / addition (He et al. Fig. 7)",
                   caption=f"Std over all (N, C, H, W) values of {n_images:,} evaluation images. Left: layers in "
                           "forward order; right: the same values sorted by magnitude. Rings: layers of "
                           "downsampling blocks.")
    run.add_figure("layer_channel_std", "layer_profile", "responses", section="Layer responses", x="layer",
                   hue="model", hue_order=models, palette=palette, flag="downsampling", flag_label="downsampling block",
                   query="kind == 'layer' and metric == 'response_channel_std_mean'", errorbar="sd",
                   xlabel="layer", ylabel="mean per-channel std",
                   title="Mean over channels of the per-channel response std")
    run.add_text("Reading", "He et al. (2016) report that residual nets have generally smaller layer responses "
                            "than their plain counterparts, and that deeper residual nets have smaller responses "
                            "still: the residual functions stay close to zero, so each block modifies its input "
                            "less. The ratio ||F(x)|| / ||S(x)|| measures that directly per block (plain blocks "
                            "have no shortcut in their forward pass; S(x) is the mapping a lesion would use).")
