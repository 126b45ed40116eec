"""Loss-landscape study (Li, Xu, Taylor, Studer, Goldstein 2018): do shortcuts keep the loss surface smooth?

Question: around a trained net's parameters, is the training loss a smooth bowl or a chaotic
surface? Li et al. (Fig. 5) found that without shortcuts the surface turns chaotic as depth grows
(ResNet-56/110 "noshort"), while residual nets of the same depth keep a wide convex basin, and that
the chaotic surfaces are the ones that train badly.

Measured per trained net, on a fixed seeded subset of training images (the net's own training
images when its checkpoint records them), batch normalisation in eval mode:

- a 2-D surface ``L(θ + α d1 + β d2)`` on a ``resolution`` x ``resolution`` grid over
  ``[-span, span]^2`` and a 1-D slice ``L(θ + α d1)`` with ``slice_points`` points, ``d1``, ``d2``
  filter-normalised random directions (``resnet_probe.landscape.directions``: zero on batch norm and
  biases), drawn with the model's seed;
- the top eigenvalue of the full loss Hessian at ``θ`` by power iteration on Hessian-vector products
  (``landscape.hessian``), on the first ``hessian_examples`` of those images;
- the surface's non-convex fraction: the share of interior grid points where the 2-D
  central-difference Hessian of the surface has ``λ_min < 0`` and ``|λ_min| > nonconvex_tol |λ_max|``
  (``landscape.curvature``).

Where this departs from Li et al.: the surfaces are evaluated on a subset of the training images
(they used all 50,000); the map of non-convexity uses the 2-D Hessian of the plotted surface on its
grid, not the full Hessian's extreme eigenvalues at every point (their Fig. 7), and only the top
eigenvalue of the full Hessian is estimated, at the trained parameters; the quick scale compares
briefly trained nets of depths 8 and 20 (the paper: 20, 56, 110 after full training).

Models: CIFAR checkpoints, ``train_zoo`` folders, torchvision / timm models (``models``), or nets
trained here (plain and residual at several depths).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import torch

from ..data import CifarDataModule, normalize, random_subset
from ..landscape import (ENGINES, direction_cosine, grid_axis, grid_curvatures, loss_surface, nonconvex_mask,
                         plane_coordinates, random_directions, top_eigenvalue)
from .analysis import analysis_run
from .inputs import StudyData, StudyModel, Zoo
from .landscape_report import write_report
from .runs import StudyResult
from .spec import StudyCommand
from .train_zoo import ZooSettings

FAMILIES = ("plain", "highway", "residual", "preact")   # taken from train_zoo folders
TITLE = "Loss landscapes: plain vs residual (Li et al. 2018)"


@dataclass(frozen=True)
class LandscapeSettings:
    """Sizes of the loss-landscape study.

    Args:
        n_examples: training images the surfaces are evaluated on (a seeded subset).
        resolution: grid points per axis of the 2-D surface (odd, so the grid holds the trained parameters).
        slice_points: points of the 1-D slice along the first direction (odd).
        span: coordinates run from ``-span`` to ``span`` (Li et al.: 1).
        engine: ``auto`` (``batched`` on CUDA, ``pointwise`` on a CPU), ``batched``, ``pointwise`` or ``loop``
            (``resnet_probe.landscape.surface``).
        points_per_pass: grid points per pass of the batched engine.
        batch_size: images per pass.
        hessian_examples: images of the Hessian (the first of the surface's images).
        hessian_iters: most power-iteration steps (Hessian-vector products).
        hessian_tol: relative change of the eigenvalue estimate at which power iteration stops.
        nonconvex_tol: ``|λ_min| / |λ_max|`` above which a point with ``λ_min < 0`` counts as non-convex.
    """

    n_examples: int = 256
    resolution: int = 11
    slice_points: int = 21
    span: float = 1.0
    engine: Literal["auto", "batched", "pointwise", "loop"] = "auto"
    points_per_pass: int = 8
    batch_size: int = 256
    hessian_examples: int = 128
    hessian_iters: int = 20
    hessian_tol: float = 1e-3
    nonconvex_tol: float = 0.01

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; valid: {', '.join(ENGINES)}")
        for name in ("n_examples", "points_per_pass", "batch_size", "hessian_examples", "hessian_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        for name in ("resolution", "slice_points"):
            value = getattr(self, name)
            if value < 3 or value % 2 == 0:
                raise ValueError(f"{name} must be odd and at least 3 (the grid holds the trained parameters at its "
                                 f"centre); got {value}")
        if self.span <= 0 or self.hessian_tol < 0 or self.nonconvex_tol < 0:
            raise ValueError(f"span must be positive and the tolerances >= 0; got span={self.span}, "
                             f"hessian_tol={self.hessian_tol}, nonconvex_tol={self.nonconvex_tol}")
        if self.hessian_examples > self.n_examples:
            raise ValueError(f"hessian_examples ({self.hessian_examples}) cannot exceed n_examples "
                             f"({self.n_examples}): the Hessian uses the first of the surface's images")

    @classmethod
    def quick(cls) -> "LandscapeSettings":
        return cls()

    @classmethod
    def paper(cls) -> "LandscapeSettings":
        """Li et al.: 51 x 51 surfaces over [-1, 1]^2 (here on 10,000 training images, not all 50,000)."""
        return cls(n_examples=10_000, resolution=51, slice_points=51, points_per_pass=32, batch_size=1000,
                   hessian_examples=1000, hessian_iters=100)

    @classmethod
    def tiny(cls) -> "LandscapeSettings":
        return cls(n_examples=32, resolution=5, slice_points=5, batch_size=32, hessian_examples=16, hessian_iters=3)


def trained_nets(scale: str) -> ZooSettings:
    """The nets trained when no model is given: plain and residual nets of several depths (Li et al. Fig. 5:
    20, 56 and 110 at paper scale)."""
    if scale == "paper":
        return ZooSettings.paper().only(("plain", "residual"), (20, 56, 110))
    base = ZooSettings.tiny() if scale == "tiny" else replace(
        ZooSettings.quick(), lr=0.2, train_limit=5000, batch_size=128, val_every_n_steps=40)
    return base.only(("plain", "residual"), base.depths["residual"])


# ---- the images ---------------------------------------------------------------------------------

def training_images(sm: StudyModel, data: StudyData, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` normalised training images and labels for ``sm``, and what they are.

    A project checkpoint trained on this data source records its split (validation size, split seed,
    training-image limit): the images are then a seeded subset of the very images it trained on.
    Otherwise they are a seeded subset of the source's training split (an image folder: its images).
    """
    if data.kind == "imagefolder":
        x, y = data.evaluation(n, seed, "landscape")
        return x, y, "images of the image folder (it has no training split)"
    source = data.training_source()
    split = _recorded_split(sm, source.name, len(source.train_labels))
    if split is not None:
        images, labels = CifarDataModule.from_source(source, **split).splits()["train"]
        what = f"its own training images ({len(labels):,}, as its checkpoint records)"
    else:
        images, labels = source.train_images, source.train_labels
        what = "the training split"
    idx = random_subset(len(labels), n, seed, "landscape")
    return normalize(images[idx]), labels[idx].long(), f"{len(idx):,} training images: a seeded subset of {what}"


def _recorded_split(sm: StudyModel, source_name: str, n_train: int) -> dict | None:
    """The training split a project checkpoint records for data ``source_name`` of ``n_train`` training images, or
    None (no record, another source, or a split that does not fit: a synthetic set of another size)."""
    path = sm.info.get("path") if sm.info.get("kind") == "project" else None
    if not path:
        return None
    hp = torch.load(path, map_location="cpu", weights_only=True).get("datamodule_hyper_parameters") or {}
    if not {"val_size", "split_seed", "train_limit"} <= set(hp) or str(hp.get("data", "")).split(":")[-1] != source_name:
        return None
    val, limit = int(hp["val_size"]), hp["train_limit"]
    if val >= n_train or (limit is not None and val + int(limit) > n_train):
        return None
    return {"val_size": val, "split_seed": int(hp["split_seed"]), "train_limit": limit}


# ---- one model ----------------------------------------------------------------------------------

def _rows(keys: dict, coords: dict[str, np.ndarray], values: dict[str, np.ndarray]) -> pd.DataFrame:
    parts = [pd.DataFrame({**coords, "metric": metric, "value": v}) for metric, v in values.items()]
    out = pd.concat(parts, ignore_index=True)
    for k, v in reversed(list(keys.items())):
        out.insert(0, k, v)
    return out


def measure(s: LandscapeSettings, data: StudyData):
    def one(sm: StudyModel, _x, _y, keys: dict) -> dict[str, pd.DataFrame]:
        device = next(sm.model.parameters()).device
        x, y, what = training_images(sm, data, s.n_examples, sm.seed)
        x, y = x.to(device), y.to(device)
        keys = {**keys, "family": sm.family, "depth": sm.depth, "site": "network"}
        d1, d2 = random_directions(sm.model, 2, sm.seed)
        axis = grid_axis(s.resolution, s.span)
        opts = dict(engine=s.engine, points_per_pass=s.points_per_pass, batch_size=s.batch_size)
        plane = loss_surface(sm.model, [d1, d2], plane_coordinates(axis, axis), x, y, **opts)
        line = loss_surface(sm.model, [d1], grid_axis(s.slice_points, s.span)[:, None], x, y, **opts)
        loss2d = plane.loss.reshape(len(axis), len(axis))
        lam_min, lam_max = grid_curvatures(loss2d, axis, axis)
        inner = plane_coordinates(axis[1:-1], axis[1:-1])
        mask = nonconvex_mask(lam_min, lam_max, s.nonconvex_tol)
        ratio = np.where(lam_min < 0, np.abs(lam_min) / np.maximum(np.abs(lam_max), 1e-30), 0.0)
        top = top_eigenvalue(sm.model, x[:s.hessian_examples], y[:s.hessian_examples], iters=s.hessian_iters,
                             tol=s.hessian_tol, seed=sm.seed, batch_size=s.batch_size)
        centre = len(plane.loss) // 2
        summary = {"loss_at_origin": plane.loss[centre], "error_percent_at_origin": 100 * plane.error[centre],
                   "max_loss_on_plane": plane.loss.max(), "nonconvex_fraction": mask.mean(),
                   "top_hessian_eigenvalue": top.value, "hessian_iterations": top.iterations,
                   "hessian_converged": float(top.converged), "direction_cosine": direction_cosine(d1, d2)}
        return {"surface": _rows(keys, {"alpha": plane.coords[:, 0], "beta": plane.coords[:, 1]},
                                 {"loss": plane.loss, "error_percent": 100 * plane.error}),
                "slice": _rows(keys, {"alpha": line.coords[:, 0]}, {"loss": line.loss, "error_percent": 100 * line.error}),
                "curvature": _rows(keys, {"alpha": inner[:, 0], "beta": inner[:, 1]},
                                   {"lambda_min": lam_min.ravel(), "lambda_max": lam_max.ravel(),
                                    "negative_curvature_ratio": ratio.ravel(), "nonconvex": mask.ravel().astype(float)}),
                "summary": _rows({**keys, "images": what}, {}, {k: [float(v)] for k, v in summary.items()})}
    return one


def run(settings: LandscapeSettings, models: Zoo | Sequence | None, data: StudyData, *, out: str | Path = "runs",
        seeds: Sequence[int] = (0,), device: str = "auto", train: ZooSettings | None = None,
        scale: str | None = None) -> StudyResult:
    """Loss surfaces, 1-D slices, curvature and top Hessian eigenvalue of ``models`` (or of nets trained here)."""
    return analysis_run("landscape", title=TITLE, source_file=__file__, settings=settings, models=models, data=data,
                        out=out, seeds=seeds, device=device, train=train or trained_nets(scale or "quick"),
                        scale=scale, measure=measure(settings, data),
                        report=lambda r, tables, d, n: write_report(r, tables, settings, d))


COMMAND = StudyCommand(
    name="landscape", run=run, settings=LandscapeSettings, inputs="models", train=trained_nets, families=FAMILIES,
    training_images=True,
    description="Loss surfaces along filter-normalised random directions, 1-D slices, the top Hessian eigenvalue and "
                "the non-convex share of each surface, plain vs residual at several depths (Li et al. 2018, Fig. 5).")
