"""Similarity study (Kornblith et al. 2019; Nguyen, Raghu, Kornblith 2021): how alike are the blocks' representations?

Question: how does the representation change from block to block inside a trained net, and do two nets
(two seeds of one architecture, or a plain and a residual net of the same depth) compute the same
representations block for block? Kornblith et al. (2019, Sec. 6) found that when a plain CNN is made so
deep that its accuracy drops, many of its later layers become alike (a large square of high CKA), which
residual nets avoid; and that nets differing only in their seed learn closely similar representations
layer for layer.

Measure: linear CKA between the outputs of every pair of blocks (each output flattened per image), of
one net (a block-by-block heat map) and of two nets (a heat map per pair, and its diagonal: the same
block in both). ``resnet_probe.similarity``: the unbiased HSIC estimator on minibatches, averaged over
the minibatches in float64, CKA of the averages (Nguyen et al. 2021), so memory does not depend on the
number of images and any minibatch of 4 or more images gives a finite value.

Where this departs from the papers. Kornblith et al. computed linear CKA on the whole evaluation set at
once with the biased HSIC estimator; minibatch CKA of unbiased HSIC estimates the same population
quantity without that estimator's bias of order 1/n (which would not average away over minibatches), so
on the same images it differs from full-batch biased CKA by that bias and by the variance of the
minibatch average. Only block outputs are compared (not the layers inside the blocks, nor the stem and
the pooled features). Pairs of nets are chosen by ``pairs``: nets of the same depth (CIFAR nets; other
nets of the same architecture), all pairs, or none. The papers' nets were trained to convergence; the
quick scale's nets are trained for minutes.

Cost: each net is run over the images once together with every earlier net it is paired with (the
analysis visits one net at a time, and keeping a net's per-minibatch Gram matrices for later would make
memory grow with the images), so g paired nets of one depth take g(g+1)/2 passes.

Inputs: model sources (project ``.ckpt`` files, ``train_zoo`` run folders, torchvision state_dict files,
``torchvision:ARCH`` or ``timm:NAME``). Without a model the study trains a plain and a residual net of the
same depth (``--train``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from ..similarity import MIN_EXAMPLES, BlockCKA, stream_block_cka
from .analysis import analysis_run
from .inputs import StudyData, StudyModel, Zoo
from .runs import StudyResult
from .similarity_report import write_report
from .spec import StudyCommand
from .train_zoo import ZooSettings

TITLE = "Similarity study: linear CKA between blocks (Kornblith et al. 2019; Nguyen et al. 2021)"
PAIRS = ("same_depth", "all", "none")


@dataclass(frozen=True)
class SimilaritySettings:
    """Sizes of the similarity study.

    Args:
        n_examples: evaluation images (a seeded subset of the test split), a whole number of minibatches.
        minibatch: images per minibatch of the unbiased HSIC estimator (at least 4).
        pairs: which two nets are compared block by block: ``same_depth`` (CIFAR nets of one depth: two
            seeds, or two families; other nets: the same architecture), ``all`` or ``none``.
    """

    n_examples: int = 1000
    minibatch: int = 100
    pairs: Literal["same_depth", "all", "none"] = "same_depth"

    def __post_init__(self) -> None:
        if self.pairs not in PAIRS:
            raise ValueError(f"unknown pairs {self.pairs!r}; valid: {', '.join(PAIRS)}")
        if self.minibatch < MIN_EXAMPLES:
            raise ValueError(f"minibatch must be at least {MIN_EXAMPLES} (the unbiased HSIC estimator divides by "
                             f"n(n-3)); got {self.minibatch}")
        if self.n_examples < self.minibatch or self.n_examples % self.minibatch:
            raise ValueError(f"n_examples must be a positive multiple of minibatch ({self.minibatch}); "
                             f"got {self.n_examples}")

    @classmethod
    def quick(cls) -> "SimilaritySettings":
        return cls()

    @classmethod
    def paper(cls) -> "SimilaritySettings":
        """The whole CIFAR-10 test split in minibatches of 250."""
        return cls(n_examples=10_000, minibatch=250)

    @classmethod
    def tiny(cls) -> "SimilaritySettings":
        return cls(n_examples=64, minibatch=16)


def trained_nets(scale: str) -> ZooSettings:
    """The nets trained when no model is given: a plain and a residual net of the same depth (56 at paper scale)."""
    if scale == "paper":
        return ZooSettings.paper().only(("plain", "residual"), (56,))
    base = ZooSettings.tiny() if scale == "tiny" else replace(
        ZooSettings.quick(), lr=0.2, train_limit=5000, batch_size=128, val_every_n_steps=40)
    return base.only(("plain", "residual"), (base.depths["residual"][-1],))


def paired(a: StudyModel, b: StudyModel, pairs: str) -> bool:
    """Whether ``pairs`` compares nets ``a`` and ``b`` block by block."""
    if pairs == "all":
        return True
    if pairs == "none":
        return False
    if a.depth != -1 or b.depth != -1:
        return a.depth == b.depth
    return a.family == b.family


def comparison(a: StudyModel, b: StudyModel) -> tuple[str, str]:
    """The label of a pair without its seeds (``plain-20 vs residual-20``) and its kind: ``two seeds`` (one
    architecture, two training seeds), ``same architecture`` (one architecture, one seed: e.g. two files),
    ``two families`` (CIFAR nets of one depth) or ``other``."""
    if (a.family, a.depth) == (b.family, b.depth):
        kind = "two seeds" if a.seed != b.seed else "same architecture"
    elif a.depth == b.depth and a.depth != -1:
        kind = "two families"
    else:
        kind = "other"
    return f"{a.name} vs {b.name}", kind


# ---- measurements -------------------------------------------------------------------------------

def _grid(result: BlockCKA, a: int, b: int, downsampling: list[list[bool]]) -> pd.DataFrame:
    """One row per (block of net ``a``, block of net ``b``): 1-based positions, names, CKA."""
    ia, ib = np.flatnonzero(result.network == a), np.flatnonzero(result.network == b)
    rows, cols = np.meshgrid(ia, ib, indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    return pd.DataFrame({"site": np.asarray(result.names)[rows], "other_site": np.asarray(result.names)[cols],
                         "block": result.block[rows] + 1, "other_block": result.block[cols] + 1,
                         "downsampling": [downsampling[a][i] for i in result.block[rows]],
                         "other_downsampling": [downsampling[b][i] for i in result.block[cols]],
                         "metric": "cka", "value": result.cka[rows, cols],
                         "minibatches": result.minibatches, "images": result.examples})


def within_table(result: BlockCKA, sm: StudyModel, keys: dict, downsampling: list[list[bool]]) -> pd.DataFrame:
    """CKA between every pair of blocks of net 0 of ``result`` (``sm``)."""
    df = _grid(result, 0, 0, downsampling)
    for k, v in reversed(list({**keys, "family": sm.family, "depth": sm.depth}.items())):
        df.insert(0, k, v)
    return df


def pairs_table(result: BlockCKA, sm: StudyModel, partners: list[StudyModel], run_name: str,
                downsampling: list[list[bool]]) -> pd.DataFrame:
    """CKA between every block of each partner (net ``i + 1`` of ``result``) and every block of ``sm`` (net 0).

    ``model`` names the pair with its seeds; ``pair`` without them (the level figures average over);
    ``aligned``: both nets have the same number of blocks, so block ``i`` faces block ``i``.
    """
    parts = []
    n_blocks = int((result.network == 0).sum())
    for i, p in enumerate(partners, start=1):
        label, kind = comparison(p, sm)
        df = _grid(result, i, 0, downsampling)
        meta = {"run": run_name, "seed": sm.seed, "model": f"{p.name} (seed {p.seed}) vs {sm.name} (seed {sm.seed})",
                "pair": label, "kind": kind, "model_a": p.name, "seed_a": p.seed, "family_a": p.family,
                "depth_a": p.depth, "model_b": sm.name, "seed_b": sm.seed, "family_b": sm.family,
                "depth_b": sm.depth, "aligned": int((result.network == i).sum()) == n_blocks}
        for k, v in reversed(list(meta.items())):
            df.insert(0, k, v)
        parts.append(df)
    return pd.concat(parts, ignore_index=True)


def measure(s: SimilaritySettings):
    """CKA within each model and, in the same pass over the images, with every earlier model it is paired with."""
    seen: list[StudyModel] = []

    def one(sm: StudyModel, x, y, keys: dict) -> dict[str, pd.DataFrame]:
        partners = [p for p in seen if paired(p, sm, s.pairs)]
        seen.append(sm)
        nets = [sm, *partners]
        result = stream_block_cka([m.model for m in nets], x, s.minibatch)
        downsampling = [[b.downsampling for b in m.blocks] for m in nets]
        tables = {"cka_blocks": within_table(result, sm, keys, downsampling)}
        if partners:
            tables["cka_pairs"] = pairs_table(result, sm, partners, keys["run"], downsampling)
        return tables
    return one


def run(settings: SimilaritySettings, models: Zoo | Sequence | None, data: StudyData, *, out: str | Path = "runs",
        seeds: Sequence[int] = (0,), device: str = "auto", train: ZooSettings | None = None,
        scale: str | None = None) -> StudyResult:
    """Linear CKA between the blocks of ``models`` (or of nets trained here), and between paired nets."""
    return analysis_run("similarity", title=TITLE, source_file=__file__, settings=settings, models=models, data=data,
                        out=out, seeds=seeds, device=device, train=train or trained_nets(scale or "quick"),
                        scale=scale, measure=measure(settings),
                        report=lambda r, tables, d, n: write_report(r, tables, settings, d, n))


# One CPU thread by default (--threads to change it): each minibatch makes many small float64 products, on
# which a 2-thread pool on a busy 2-core machine spends most of its time waiting for its other thread.
COMMAND = StudyCommand(
    name="similarity", run=run, settings=SimilaritySettings, inputs="models", train=trained_nets, threads=1,
    description="Linear CKA between every two blocks of each net and between the same blocks of two nets (two seeds "
                "or two families), streamed over minibatches with the unbiased HSIC estimator (Kornblith et al. "
                "2019; Nguyen et al. 2021).")
