"""Lesion study (Veit, Wilber, Belongie 2016): does a trained ResNet need every block?

Question: if one block of a trained residual network is deleted (its output replaced by its
shortcut), does the network break, as a plain network does when it loses a layer? How does the
error grow with the number of deleted blocks, and with how far the blocks are shuffled? Do
gradient-based block attributions (captum) rank the blocks as the deletions do?

Paper figures: Veit et al. 2016, Fig. 3 (error after deleting each single block; downsampling
blocks marked), Fig. 5a (error against the number of randomly deleted blocks), Fig. 5b (error
against Kendall's tau of a reordering); plus a figure putting each block's attribution beside the
error its deletion causes.

Inputs: ``CHECKPOINT...``: project ``.ckpt`` files, ``train_zoo`` run folders (all their models),
torchvision ResNet state_dict files, or ``torchvision:ARCH`` (random weights, or ``--weights NAME``
from the torch hub cache; evaluate those on ``--data imagefolder=PATH``). Without a checkpoint the
study trains its own nets (residual and plain; the scale's depth and length).

Result at quick scale (CIFAR-10 JPEG pack; residual-20 and plain-20 trained here on 5,000 images
for 3 epochs, seed 0; 1,000 test images; measured on 2 shared AMD EPYC CPU cores): intact error
53.4 % [50.6, 57.2] (residual) and 63.4 % [60.3, 66.2] (plain). Deleting one non-downsampling block
raises the residual net's error by a median 6.2 pp (largest: 31 pp, its first block), the plain
net's by 26.7 pp, close to chance; the residual net's downsampling blocks cost up to 12.3 pp. Block
attributions rank the residual net's blocks like their deletion effects (Spearman 0.63 for
gradient x activation, 0.53 for integrated gradients) and the plain net's not at all (-0.05).
Three epochs leave the residual net far from converged; Veit et al.'s near-zero effects need the
paper's training (``--scale paper``, for a GPU).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ..models import LESION_MODES
from ..models.compiled import EVALUATION_PATHS, evaluation_model
from .analysis_inputs import add_model_arguments, check_labels, open_analysis, study_models
from .options import study_parser

FAMILIES = ("plain", "highway", "residual", "preact")   # taken from train_zoo folders (highway: gate closed)
QUICK: dict[str, Any] = dict(
    n_examples=1000,            # test images evaluated (a seeded subset)
    batch_size=250,             # examples per forward chunk
    mode="zero_branch",         # lesion: ReLU(S(x)) (zero_branch) or S(x) (shortcut_only)
    k_max=8,                    # largest number of randomly deleted blocks
    n_sets=10,                  # random deletion sets per k
    k_swaps=(1, 2, 4, 8),       # numbers of random within-stage swaps
    reorder_sets=5,             # random orders per number of swaps
    n_resamples=200,            # bootstrap resamples per interval
    evaluation="eager",         # sweeps run eager, BN "folded", or folded and "compiled" (the GPU fast path)
    attribution_examples=64,    # images attributed with captum
    attribution_methods=("gradient_x_activation", "integrated_gradients"),   # () skips attribution
    attribution_steps=16,       # integration steps (integrated gradients, conductance; baseline: black image)
    families=("residual", "plain"), depth=20,          # nets trained when no checkpoint is given
    recipe="fast", lr=0.2, epochs=3, train_limit=5000, val_size=1000, augment=False)
PAPER: dict[str, Any] = dict(
    n_examples=10_000, batch_size=1000, mode="zero_branch",
    k_max=20, n_sets=100,       # Veit et al. Fig. 5a: up to 20 of ResNet-110's 54 blocks
    k_swaps=(1, 2, 4, 8, 16, 32), reorder_sets=50,
    n_resamples=1000, evaluation="compiled", attribution_examples=1000,
    attribution_methods=("gradient_x_activation", "integrated_gradients", "conductance"), attribution_steps=32,
    families=("residual", "plain"), depth=110,
    recipe="paper", lr=0.1, epochs=182, train_limit=None, val_size=5000, augment=True)  # 182 epochs ~ 64k it.


def build_parser():
    p = study_parser("lesion", "Delete and reorder the blocks of trained ResNets (Veit et al. 2016) and compare "
                               "each block's deletion effect with its captum attribution.")
    add_model_arguments(p)
    p.add_argument("--mode", choices=LESION_MODES, default=None,
                   help="a deleted block outputs ReLU(S(x)) (zero_branch) or S(x) (shortcut_only)")
    p.add_argument("--n-examples", dest="n_examples", type=int, default=None, help="test images evaluated")
    p.add_argument("--k-max", dest="k_max", type=int, default=None, help="most randomly deleted blocks")
    p.add_argument("--n-sets", dest="n_sets", type=int, default=None, help="random deletion sets per k")
    p.add_argument("--k-swaps", dest="k_swaps", type=int, nargs="+", default=None, help="numbers of swaps")
    p.add_argument("--n-resamples", dest="n_resamples", type=int, default=None, help="bootstrap resamples")
    p.add_argument("--evaluation", choices=EVALUATION_PATHS, default=None,
                   help="sweeps run the net eager, with BN folded, or folded and compiled block by block")
    return p


# ---- measurements -------------------------------------------------------------------------------

def tidy_sweep(df: pd.DataFrame, keys: dict, id_cols: list[str]) -> pd.DataFrame:
    """Sweep rows -> tidy rows, one per metric: ``error_percent`` (top-1, %), ``loss``, ``kl`` (nats)."""
    parts = []
    for metric, name, scale in (("error", "error_percent", 100.0), ("loss", "loss", 1.0), ("kl", "kl", 1.0)):
        part = df[id_cols].copy()
        part["metric"] = name
        part["value"] = df[metric] * scale
        part["lo"], part["hi"] = df[f"{metric}_lo"] * scale, df[f"{metric}_hi"] * scale
        parts.append(part)
    out = pd.concat(parts, ignore_index=True)
    for k, v in reversed(list(keys.items())):
        out.insert(0, k, v)
    return out


def single_block(model, x, y, s: dict, seed: int, keys: dict) -> pd.DataFrame:
    """Fig. 3: each block deleted on its own; ``error_increase_pp`` is paired with the intact net."""
    from ..lesion import evaluate_deletion_sets, mean_ci
    from ..lesion.table import metrics_table, sweep_options
    from ..models import anatomy

    anat = anatomy(model)
    opts = sweep_options(batch_size=s["batch_size"], n_resamples=s["n_resamples"])
    m = evaluate_deletion_sets(model, [[i] for i in range(len(anat))], x, y, mode=s["mode"],
                               batch_size=s["batch_size"])
    meta = [{"site": b.name, "path": b.path, "stage": b.stage, "position": i, "downsampling": b.downsampling}
            for i, b in enumerate(anat.blocks)]
    df = tidy_sweep(metrics_table(meta, m, opts, seed), keys, list(meta[0]))
    inc, lo, hi = mean_ci(100.0 * (m.error - m.intact_error[None]), n_resamples=s["n_resamples"], seed=seed)
    extra = pd.DataFrame(meta).assign(metric="error_increase_pp", value=inc, lo=lo, hi=hi)
    for k, v in reversed(list(keys.items())):
        extra.insert(0, k, v)
    return pd.concat([df, extra], ignore_index=True).assign(mode=s["mode"])


def k_random(model, x, y, s: dict, seed: int, keys: dict) -> pd.DataFrame:
    """Fig. 5a: ``n_sets`` random sets of ``k`` deleted blocks for ``k = 0..k_max`` (``k = 0``: intact)."""
    from ..lesion import k_random_sweep
    from ..models import anatomy
    ks = tuple(range(0, min(s["k_max"], len(anatomy(model))) + 1))
    df = k_random_sweep(model, x, y, ks=ks, n_sets=s["n_sets"], seed=seed, mode=s["mode"],
                        batch_size=s["batch_size"], n_resamples=s["n_resamples"])
    df["site"] = "network"
    return tidy_sweep(df, keys, ["site", "k", "set", "deleted"]).assign(mode=s["mode"])


def reorder(model, x, y, s: dict, seed: int, keys: dict) -> pd.DataFrame | None:
    """Fig. 5b: ``k`` random swaps of blocks within a stage; ``None`` when no stage has two swappable blocks."""
    from ..lesion import reorder_sweep, swappable_groups
    from ..models import anatomy
    if not swappable_groups(anatomy(model)):
        return None
    df = reorder_sweep(model, x, y, k_swaps=tuple(s["k_swaps"]), n_sets=s["reorder_sets"], seed=seed,
                       batch_size=s["batch_size"], n_resamples=s["n_resamples"])
    df["site"] = "network"
    return tidy_sweep(df, keys, ["site", "k_swaps", "set", "kendall_tau", "moved"])


def attribution(model, x, y, s: dict, keys: dict) -> pd.DataFrame:
    """Per-block captum attributions of the true-class logit to each block's output (``resnet_probe.attribution``).

    ``value`` is the mean over ``attribution_examples`` images of the summed ``|attribution|`` over
    the block output; ``signed`` the mean of the plain sum; ``metric`` names the method.
    """
    from ..attribution import block_attributions
    n = min(s["attribution_examples"], len(x))
    parts = []
    for method in s["attribution_methods"]:
        df = block_attributions(model, x[:n], y[:n], method=method, n_steps=s["attribution_steps"],
                                batch_size=s["batch_size"])
        parts.append(pd.DataFrame({**keys, "site": df["block"], "stage": df["stage"],
                                   "downsampling": df["downsampling"], "metric": method,
                                   "value": df["attribution"], "signed": df["attribution_signed"],
                                   "n_examples": n}))
    return pd.concat(parts, ignore_index=True)


# ---- the study ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> Path:
    """Run the lesion study; returns the run folder."""
    from ..report import new_run
    args, s, device, data, config = open_analysis(build_parser(), argv, QUICK, PAPER)
    with new_run("lesion", out=args.out, config=config, data=data.provenance, source_file=__file__, argv=argv,
                 title="Lesion study: deleting and reordering blocks (Veit et al. 2016)") as run:
        tables: dict[str, list[pd.DataFrame]] = {k: [] for k in ("single_block", "k_random", "reorder", "attribution")}
        for sm in study_models(args, s, data, device, run, families=FAMILIES):
            keys = {"run": run.path.name, "seed": sm.seed, "model": sm.name}
            check_labels(sm, data)
            x, y = data.images, data.labels
            print(f"lesion: {sm.name} (seed {sm.seed}): {len(sm.blocks)} blocks, {len(y)} images", flush=True)
            net = evaluation_model(sm.model, s["evaluation"])  # the sweeps' network; captum reads sm.model
            tables["single_block"].append(single_block(net, x, y, s, sm.seed, keys))
            tables["k_random"].append(k_random(net, x, y, s, sm.seed, keys))
            reo = reorder(net, x, y, s, sm.seed, keys)
            if reo is not None:
                tables["reorder"].append(reo)
            if s["attribution_methods"]:
                tables["attribution"].append(attribution(sm.model, x, y, s, keys))
            for name, parts in tables.items():
                if parts:
                    run.add_table(name, pd.concat(parts, ignore_index=True))
        from .lesion_report import write_lesion_report
        write_lesion_report(run, s, data)
    return run.path
