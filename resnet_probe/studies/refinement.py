"""Refinement study (Jastrzebski et al. 2018): does each residual block take a step down the loss gradient?

Question: Jastrzebski et al. ("Residual connections encourage iterative inference", ICLR 2018) argue that a
residual block ``h_i = h_{i-1} + F_i(h_{i-1})`` lowers the loss to first order when its branch output points
against the loss gradient, and measured in trained residual nets (their Fig. 2 and 3) that the cosine between
``F_i`` and the loss gradient is negative in every block -- the branch moves the representation down the
gradient, most of all in the later blocks -- while ``||F_i|| / ||h_{i-1}||`` is small and largest in the first
blocks: the early blocks learn new representations, the later ones refine them in small steps.

Measure (``resnet_probe.probes.refinement``, ``probe(model, metrics=("refinement",))``): per block and
evaluation image n, ``cos_n = cos(F(x_n), -dL/dF(x_n))`` with ``L`` the summed cross-entropy of the images and
the nets in eval mode (so the gradient is each image's own), and ``ratio_n = ||F(x_n)|| / ||x_n||``; their means
and stds over the images per block, streamed as float64 sums.

Where this departs from the paper. (1) Sign: the paper plots ``cos(F, dL/dh)`` (negative = refinement); this
study reports the cosine with the *negative* gradient, so refinement reads positive. (2) The gradient is taken
at the branch output where it enters the combine (``dL/dF = dL/d(F + S)`` for additive blocks), not by autograd
at the block input: the two differ by the backward path through the branch, a term the paper's first-order
argument neglects, and only the former is defined for downsampling blocks, which are measured and marked. (3)
The nets: the paper trained its own ResNets (on CIFAR-10/100 and others) to convergence; the quick scale's nets
are trained for minutes. (4) Highway and plain nets are measured with the same definition for comparison;
Jastrzebski et al. compare residual nets only, and for plain blocks ``F`` is the whole new representation, not
a step added to ``x`` (see the probe's docstring).

Inputs: model sources (project ``.ckpt`` files, ``train_zoo`` run folders, torchvision state_dict files,
``torchvision:ARCH`` or ``timm:NAME``). Without a model the study trains a plain, a highway and a residual net of
one depth (``--train``), one per seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from ..probes import REFINEMENT_METRICS, probe
from .analysis import analysis_run
from .inputs import StudyData, StudyModel, Zoo
from .refinement_report import write_report
from .runs import StudyResult
from .spec import StudyCommand
from .train_zoo import ZooSettings

TITLE = "Iterative refinement: branch outputs against the loss gradient (Jastrzebski et al. 2018)"
FAMILIES = ("plain", "highway", "residual")


@dataclass(frozen=True)
class RefinementSettings:
    """Sizes of the refinement study.

    Args:
        n_examples: evaluation images (a seeded subset of the test split).
        batch_size: images per forward and backward pass.
    """

    n_examples: int = 1000
    batch_size: int = 250

    def __post_init__(self) -> None:
        for name in ("n_examples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")

    @classmethod
    def quick(cls) -> "RefinementSettings":
        return cls()

    @classmethod
    def paper(cls) -> "RefinementSettings":
        """The whole CIFAR-10 test split."""
        return cls(n_examples=10_000, batch_size=500)

    @classmethod
    def tiny(cls) -> "RefinementSettings":
        return cls(n_examples=64, batch_size=32)


def trained_nets(scale: str) -> ZooSettings:
    """The nets trained when no model is given: a plain, a highway and a residual net of one depth (56 at paper
    scale, trained with the paper's recipe; 20 at quick scale, the zoo's quick recipe on 4,000 images)."""
    if scale == "paper":
        return ZooSettings.paper().only(FAMILIES, (56,))
    if scale == "tiny":
        return ZooSettings.tiny().only(FAMILIES, (8,))
    return ZooSettings.quick().only(FAMILIES, (20,))


def block_refinement(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> pd.DataFrame:
    """Per block, the refinement probe's rows over ``images``: ``L`` = summed cross-entropy, one backward pass
    per batch that computes no parameter gradient.

    Args:
        model: any model ``resnet_probe.models.anatomy`` supports, in eval mode, on the images' device.
        images: normalised float images ``(N, C, H, W)``.
        labels: their classes.
        batch_size: images per pass.

    Returns:
        The tidy rows ``site, stage, block, kind, metric, value, downsampling, path`` (``REFINEMENT_METRICS``)
        and ``block_index`` (1-based position of the block in the network).
    """
    with torch.enable_grad(), probe(model, metrics=("refinement",)) as session:
        for start in range(0, len(images), batch_size):
            logits = model(images[start:start + batch_size])
            loss = F.cross_entropy(logits, labels[start:start + batch_size], reduction="sum")
            loss.backward(inputs=session.refinement.sinks)
    df = session.table().drop(columns=["step"])
    order = {name: i + 1 for i, name in enumerate(dict.fromkeys(df["site"]))}
    df["block_index"] = df["site"].map(order)
    return df.reset_index(drop=True)


def measure(s: RefinementSettings):
    def one(sm: StudyModel, x, y, keys: dict) -> dict[str, pd.DataFrame]:
        df = block_refinement(sm.model, x, y, s.batch_size)
        for k, v in reversed(list({**keys, "family": sm.family, "depth": sm.depth}.items())):
            df.insert(0, k, v)
        return {"refinement": df}
    return one


def run(settings: RefinementSettings, models: Zoo | Sequence | None, data: StudyData, *, out: str | Path = "runs",
        seeds: Sequence[int] = (0,), device: str = "auto", train: ZooSettings | None = None,
        scale: str | None = None) -> StudyResult:
    """Per block of each of ``models`` (or of nets trained here): cos(F, -dL/dF) and ||F|| / ||x|| over the images."""
    return analysis_run("refinement", title=TITLE, source_file=__file__, settings=settings, models=models, data=data,
                        out=out, seeds=seeds, device=device, train=train or trained_nets(scale or "quick"),
                        scale=scale, measure=measure(settings),
                        report=lambda r, tables, d, n: write_report(r, tables, settings, d, n))


COMMAND = StudyCommand(
    name="refinement", run=run, settings=RefinementSettings, inputs="models", train=trained_nets,
    description="Per block, the cosine between the branch output F(x) and the negative loss gradient there, and "
                "||F(x)|| / ||x||, over the evaluation images (Jastrzebski et al. 2018, iterative refinement).")

__all__ = ["COMMAND", "REFINEMENT_METRICS", "RefinementSettings", "block_refinement", "run", "trained_nets"]
