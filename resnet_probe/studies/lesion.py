"""Lesion study (Veit, Wilber, Belongie 2016): does a trained ResNet need every block?

Question: if one block of a trained residual network is deleted (its output replaced by its
shortcut), does the network break, as a plain network does when it loses a layer? How does the
error grow with the number of deleted blocks, and with how far the blocks are shuffled? Do
gradient-based block attributions (captum) rank the blocks as the deletions do?

Paper figures: Veit et al. 2016, Fig. 3 (error after deleting each single block; downsampling
blocks marked), Fig. 5a (error against the number of randomly deleted blocks), Fig. 5b (error
against Kendall's tau of a reordering); plus a figure putting each block's attribution beside the
error its deletion causes.

The comparison network. Veit et al. compared a ResNet with a well-trained VGG-style net. Here the
plain net plays that role, and it must be one that trains: by default plain-20 (He et al. 2016,
Fig. 6: plain-20 reaches about the residual nets' error with the same recipe), whatever the
residual net's depth. A deeper plain net is an option (``--train.depths``); the report labels it
*degraded* (He et al.: deeper plain nets train worse), since a net near chance before any deletion
makes "deleting a layer breaks a plain net" partly true by construction. A plain block at a stage
change has no shortcut in the trained net, so deleting it would insert one (zero-pad or
projection) the net never had: those blocks are left out of the plain net's single-block sweep.
Random k-block deletions draw from the blocks whose shortcut keeps the shape (as Veit et al.
deleted), or from all blocks (``k_random_blocks: all``); tables and figures say which.

Inputs: model sources (project ``.ckpt`` files, ``train_zoo`` run folders, torchvision state_dict
files, ``torchvision:ARCH`` or ``timm:NAME``; ImageNet models on ``--data imagefolder=PATH``).
Without a model the study trains its own nets (``--train``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Sequence

import pandas as pd

from ..attribution import block_attributions
from ..lesion import evaluate_deletion_sets, k_random_sweep, reorder_sweep, swappable_groups
from ..lesion import bootstrap_mean_ci
from ..lesion.table import metrics_table, sweep_options
from ..models import LESION_MODES, anatomy
from ..models.compiled import evaluation_model
from ..shards import Shard, environment_shard
from .analysis import analysis_run
from .spec import StudyCommand
from .inputs import StudyData, StudyModel, Zoo
from .lesion_report import NON_DOWNSAMPLING, write_lesion_report
from .runs import StudyResult
from .train_zoo import ZooSettings

FAMILIES = ("plain", "highway", "residual", "preact")   # taken from train_zoo folders (highway: gate closed)
TITLE = "Lesion study: deleting and reordering blocks (Veit et al. 2016)"


@dataclass(frozen=True)
class LesionSettings:
    """Sizes of the lesion study.

    Args:
        n_examples: test images evaluated (a seeded subset).
        batch_size: examples per forward chunk.
        mode: a deleted block outputs ReLU(S(x)) (``zero_branch``) or S(x) (``shortcut_only``).
        k_max: most randomly deleted blocks.
        n_sets: random deletion sets per k.
        k_random_blocks: blocks the random sets draw from: ``non_downsampling`` (identity shortcuts, as
            Veit et al.) or ``all``.
        k_swaps: numbers of random within-stage swaps of two blocks.
        reorder_sets: random orders per number of swaps.
        n_resamples: bootstrap resamples per interval.
        evaluation: sweeps run the net ``eager``, with BN ``folded`` into the convolutions, folded and
            ``compiled`` block by block (experimental on a CPU), or ``auto``: compiled on a GPU, folded on a CPU.
        attribution_examples: images attributed with captum.
        attribution_methods: captum methods (``gradient_x_activation``, ``integrated_gradients``,
            ``conductance``); empty: no attribution.
        attribution_steps: integration steps (baseline: black image).
    """

    n_examples: int = 1000
    batch_size: int = 250
    mode: Literal["zero_branch", "shortcut_only"] = "zero_branch"
    k_max: int = 8
    n_sets: int = 10
    k_random_blocks: Literal["non_downsampling", "all"] = "non_downsampling"
    k_swaps: tuple[int, ...] = (1, 2, 4, 8)
    reorder_sets: int = 5
    n_resamples: int = 200
    evaluation: Literal["eager", "folded", "compiled", "auto"] = "eager"
    attribution_examples: int = 64
    attribution_methods: tuple[str, ...] = ("gradient_x_activation", "integrated_gradients")
    attribution_steps: int = 16

    def __post_init__(self) -> None:
        if self.mode not in LESION_MODES:
            raise ValueError(f"unknown mode {self.mode!r}; valid: {', '.join(LESION_MODES)}")
        for name in ("n_examples", "batch_size", "n_sets", "reorder_sets", "n_resamples", "attribution_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.k_max < 0:
            raise ValueError(f"k_max must be >= 0; got {self.k_max}")

    @classmethod
    def quick(cls) -> "LesionSettings":
        return cls()

    @classmethod
    def paper(cls) -> "LesionSettings":
        """Veit et al.: 10,000 test images, up to 20 of ResNet-110's 54 blocks deleted, 100 sets per k."""
        return cls(n_examples=10_000, batch_size=1000, k_max=20, n_sets=100, k_swaps=(1, 2, 4, 8, 16, 32),
                   reorder_sets=50, n_resamples=1000, evaluation="auto", attribution_examples=1000,
                   attribution_methods=("gradient_x_activation", "integrated_gradients", "conductance"),
                   attribution_steps=32)

    @classmethod
    def tiny(cls) -> "LesionSettings":
        return cls(n_examples=64, batch_size=64, k_max=2, n_sets=2, k_swaps=(1,), reorder_sets=2, n_resamples=20,
                   attribution_examples=8, attribution_steps=4)


def trained_nets(scale: str) -> ZooSettings:
    """The nets trained when no model is given: a residual net and the plain-20 comparison net."""
    if scale == "paper":
        return ZooSettings.paper().only(("plain", "residual"), {"plain": (20,), "residual": (110,)})
    base = ZooSettings.tiny() if scale == "tiny" else replace(
        ZooSettings.quick(), lr=0.2, train_limit=5000, batch_size=128, val_every_n_steps=40)
    return base.only(("plain", "residual"), (base.depths["residual"][-1],))


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


def deletable_blocks(model, family: str) -> list[int]:
    """Blocks whose deletion leaves a shortcut the trained net has: every block, except a plain net's
    stage-change blocks (deleting one would insert a zero-pad or projection the plain net never had)."""
    return [i for i, b in enumerate(anatomy(model).blocks) if not (family == "plain" and b.downsampling)]


def single_block(model, family: str, x, y, s: LesionSettings, seed: int, keys: dict, shard: Shard | None = None
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fig. 3: each deletable block deleted on its own.

    Returns:
        The tidy rows (error, loss, KL per deletion; ``error_increase_pp`` paired with the intact net per
        block; ``mean_error_increase_pp`` over the identity-shortcut blocks, the headline effect) and the
        per-image table behind that effect: for image ``j``, ``100 * mean_i (error_ij - intact_error_j)``
        over those blocks, which paired comparisons between models (on the same images) resample.
    """
    anat = anatomy(model)
    keep = deletable_blocks(model, family)
    opts = sweep_options(batch_size=s.batch_size, n_resamples=s.n_resamples)
    m = evaluate_deletion_sets(model, [[i] for i in keep], x, y, mode=s.mode, batch_size=s.batch_size, shard=shard)
    meta = [{"site": anat.blocks[i].name, "path": anat.blocks[i].path, "stage": anat.blocks[i].stage,
             "position": i + 1, "downsampling": anat.blocks[i].downsampling} for i in keep]
    df = tidy_sweep(metrics_table(meta, m, opts, seed), keys, list(meta[0]))
    increase = 100.0 * (m.error - m.intact_error[None])           # (blocks, images), percentage points
    inc, lo, hi = bootstrap_mean_ci(increase, n_resamples=s.n_resamples, seed=seed)
    rows = [pd.DataFrame(meta).assign(metric="error_increase_pp", value=inc, lo=lo, hi=hi)]
    identity = [j for j, i in enumerate(keep) if not anat.blocks[i].downsampling]
    per_image = pd.DataFrame()
    if identity:
        value = increase[identity].mean(axis=0)
        mean, lo, hi = bootstrap_mean_ci(value, n_resamples=s.n_resamples, seed=seed)
        rows.append(pd.DataFrame([{"site": NON_DOWNSAMPLING, "path": "", "stage": 0, "position": 0,
                                   "downsampling": False, "metric": "mean_error_increase_pp", "value": float(mean[0]),
                                   "lo": float(lo[0]), "hi": float(hi[0])}]))
        per_image = pd.DataFrame({**keys, "site": NON_DOWNSAMPLING, "metric": "image_error_increase_pp",
                                  "image": range(len(value)), "value": value})
    extra = pd.concat(rows, ignore_index=True)
    for k, v in reversed(list(keys.items())):
        extra.insert(0, k, v)
    return pd.concat([df, extra], ignore_index=True).assign(mode=s.mode), per_image


def k_random(model, x, y, s: LesionSettings, seed: int, keys: dict, shard: Shard | None = None) -> pd.DataFrame:
    """Fig. 5a: ``n_sets`` random sets of ``k`` deleted blocks for ``k = 0..k_max`` (``k = 0``: intact), drawn
    from ``k_random_blocks``."""
    anat = anatomy(model)
    pool = [i for i, b in enumerate(anat.blocks) if s.k_random_blocks == "all" or not b.downsampling]
    ks = tuple(range(0, min(s.k_max, len(pool)) + 1))
    df = k_random_sweep(model, x, y, ks=ks, n_sets=s.n_sets, seed=seed, mode=s.mode, batch_size=s.batch_size,
                        n_resamples=s.n_resamples, blocks=pool, shard=shard)
    df["site"] = "network"
    return tidy_sweep(df, keys, ["site", "k", "set", "deleted"]).assign(mode=s.mode, drawn_from=s.k_random_blocks)


def reorder(model, x, y, s: LesionSettings, seed: int, keys: dict, shard: Shard | None = None
            ) -> pd.DataFrame | None:
    """Fig. 5b: ``k`` random swaps of blocks within a stage; ``None`` when no stage has two swappable blocks."""
    if not swappable_groups(anatomy(model)):
        return None
    df = reorder_sweep(model, x, y, k_swaps=tuple(s.k_swaps), n_sets=s.reorder_sets, seed=seed,
                       batch_size=s.batch_size, n_resamples=s.n_resamples, shard=shard)
    df["site"] = "network"
    return tidy_sweep(df, keys, ["site", "k_swaps", "set", "kendall_tau", "moved"])


def attribution(model, x, y, s: LesionSettings, keys: dict) -> pd.DataFrame:
    """Per-block captum attributions of the true-class logit to each block's output (``resnet_probe.attribution``).

    ``value`` is the mean over ``attribution_examples`` images of the summed ``|attribution|`` over
    the block output; ``signed`` the mean of the plain sum; ``metric`` names the method.
    """
    n = min(s.attribution_examples, len(x))
    parts = []
    for method in s.attribution_methods:
        df = block_attributions(model, x[:n], y[:n], method=method, n_steps=s.attribution_steps,
                                batch_size=s.batch_size)
        parts.append(pd.DataFrame({**keys, "site": df["block"], "stage": df["stage"],
                                   "downsampling": df["downsampling"], "metric": method,
                                   "value": df["attribution"], "signed": df["attribution_signed"],
                                   "n_examples": n}))
    return pd.concat(parts, ignore_index=True)


def measure(s: LesionSettings, shard: Shard | None = None):
    """The lesion measurement of one model (single-block, k-random, reordering, attribution tables).

    With a ``shard`` (``resnet_probe.shards``) the sweeps evaluate this rank's chunks of ``batch_size`` images
    and gather the per-image values of every rank, so every rank returns one process's tables; the captum
    attributions (``attribution_examples`` images) are computed whole on every rank."""
    def one(sm: StudyModel, x, y, keys: dict) -> dict[str, pd.DataFrame]:
        keys = {**keys, "family": sm.family, "depth": sm.depth}
        path = s.evaluation
        if path == "auto":
            path = "compiled" if next(sm.model.parameters()).is_cuda else "folded"
        net = evaluation_model(sm.model, path)  # the sweeps' network; captum reads sm.model
        single, per_image = single_block(net, sm.family, x, y, s, sm.seed, keys, shard)
        tables = {"single_block": single, "k_random": k_random(net, x, y, s, sm.seed, keys, shard)}
        if len(per_image):
            tables["deletion_per_image"] = per_image
        reo = reorder(net, x, y, s, sm.seed, keys, shard)
        if reo is not None:
            tables["reorder"] = reo
        if s.attribution_methods:
            tables["attribution"] = attribution(sm.model, x, y, s, keys)
        return tables
    return one


def run(settings: LesionSettings, models: Zoo | Sequence | None, data: StudyData, *, out: str | Path = "runs",
        seeds: Sequence[int] = (0,), device: str = "auto", train: ZooSettings | None = None,
        scale: str | None = None) -> StudyResult:
    """Delete and reorder the blocks of ``models`` (or of nets trained here) on ``data``'s test images.

    Under torchrun the images are split over the ranks in chunks of ``batch_size`` (``resnet_probe.shards``)."""
    shard = environment_shard(device)
    return analysis_run("lesion", title=TITLE, source_file=__file__, settings=settings, models=models, data=data,
                        out=out, seeds=seeds, device=device, train=train or trained_nets(scale or "quick"),
                        scale=scale, measure=measure(settings, shard), shard=shard,
                        report=lambda r, tables, d, n: write_lesion_report(r, tables, settings, d, n))


COMMAND = StudyCommand(
    name="lesion", run=run, settings=LesionSettings, inputs="models", sharded=True, train=trained_nets,
    families=FAMILIES,
    description="Delete and reorder the blocks of trained ResNets (Veit et al. 2016) and compare each block's "
                "deletion effect with its captum attribution.")
