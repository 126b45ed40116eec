"""Shattered-gradients study (Balduzzi et al. 2017): do input gradients stay correlated as the input moves?

Question: Balduzzi et al. showed that the gradient of a deep plain net with respect to its input
looks like white noise along a line of inputs: the correlation between gradients at nearby inputs
decays exponentially with depth (~2^-L at initialisation), while in residual nets it decays far more
slowly (~1/sqrt(L)), which they argue is why residual nets train. Does it hold for these nets, at
initialisation and after training?

Measured per net (``resnet_probe.shattered``), in eval mode: from each of ``n_examples`` test images,
the correlation ``C(r)`` between the input gradient there and at distance ``r`` along a random unit
direction (``n_distances`` log-spaced radii from ``min_distance`` to ``max_distance``; a normalised
CIFAR image has an L2 norm of about 58), and along the straight line towards the next test image
(``interpolation_points`` evenly spaced points); its correlation length (where the mean ``C`` first
falls below 1/2) per family and depth. Each given net is measured as it is (*trained*) and as a
fresh net of the same architecture drawn with its seed (*initialisation*); ``init_depths`` adds
fresh CIFAR nets of more depths of the same families (no training needed). Batch-norm running
statistics of fresh nets are set from the evaluation images (``resnet_probe.batchnorm``) so that
eval mode normalises as training starts.

Where this departs from Balduzzi et al.: their nets map a scalar to a scalar and their inputs lie
on an evenly spaced 1-D grid, with the autocorrelation averaged over pairs at each lag; here the
inputs are images, the gradient is that of a fixed logit (or the loss), correlated over pixels,
and each line starts at an image and reaches out over log-spaced distances.

Models: CIFAR checkpoints, ``train_zoo`` folders, torchvision / timm models (``models``), or nets
trained here (plain and residual at several depths).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import torch

from ..batchnorm import calibrate_batchnorm
from ..models import FAMILIES as CIFAR_FAMILIES
from ..models import build_model
from ..shattered import (TARGETS, correlation_length, correlation_with_start, input_gradients, interpolation_line,
                         random_line)
from .analysis import analysis_run
from .inputs import StudyData, StudyModel, Zoo, load_model_source, model_name
from .runs import StudyResult
from .shattered_report import write_report
from .spec import StudyCommand
from .train_zoo import ZooSettings

FAMILIES = ("plain", "highway", "residual", "preact")
TITLE = "Shattered gradients: input-gradient correlation against distance (Balduzzi et al. 2017)"
STATES = ("initialisation", "trained")


@dataclass(frozen=True)
class ShatteredSettings:
    """Sizes of the shattered-gradients study.

    Args:
        n_examples: start images (test images; each also ends the previous image's interpolation line).
        n_distances: log-spaced radii of the random-direction lines.
        min_distance: the smallest radius (L2, in normalised-pixel units).
        max_distance: the largest radius.
        interpolation_points: points of each interpolation line, both images included.
        target: differentiate the ``logit`` of the start image's class or the ``loss`` with that label.
        init_depths: more depths of each CIFAR family present, measured at initialisation only.
        batch_size: inputs per backward pass (and per batch-norm calibration batch).
    """

    n_examples: int = 32
    n_distances: int = 11
    min_distance: float = 1e-3
    max_distance: float = 100.0
    interpolation_points: int = 9
    target: Literal["logit", "loss"] = "logit"
    init_depths: tuple[int, ...] = (56, 110)
    batch_size: int = 128

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; valid: {', '.join(TARGETS)}")
        if self.n_examples < 2:
            raise ValueError(f"n_examples must be at least 2 (lines run between images); got {self.n_examples}")
        for name in ("n_distances", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.interpolation_points < 2:
            raise ValueError(f"interpolation_points must be at least 2; got {self.interpolation_points}")
        if not 0 < self.min_distance < self.max_distance:
            raise ValueError(f"need 0 < min_distance < max_distance; got {self.min_distance}, {self.max_distance}")
        bad = [d for d in self.init_depths if d < 8 or (d - 2) % 6]
        if bad:
            raise ValueError(f"init_depths must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...); got {bad}")
        object.__setattr__(self, "init_depths", tuple(int(d) for d in self.init_depths))

    @property
    def radii(self) -> np.ndarray:
        return np.geomspace(self.min_distance, self.max_distance, self.n_distances)

    @classmethod
    def quick(cls) -> "ShatteredSettings":
        return cls()

    @classmethod
    def paper(cls) -> "ShatteredSettings":
        """Many more lines and distances, and depths up to 110 at initialisation (Balduzzi et al. go to 50+)."""
        return cls(n_examples=256, n_distances=21, interpolation_points=33, init_depths=(8, 14, 20, 32, 44, 56, 110),
                   batch_size=512)

    @classmethod
    def tiny(cls) -> "ShatteredSettings":
        return cls(n_examples=4, n_distances=4, interpolation_points=3, init_depths=(14,), batch_size=32)


def trained_nets(scale: str) -> ZooSettings:
    """The nets trained when no model is given: plain and residual nets of several depths."""
    if scale == "paper":
        return ZooSettings.paper().only(("plain", "residual"), (20, 56, 110))
    base = ZooSettings.tiny() if scale == "tiny" else replace(
        ZooSettings.quick(), lr=0.2, train_limit=5000, batch_size=128, val_every_n_steps=40)
    return base.only(("plain", "residual"), base.depths["residual"])


# ---- nets at initialisation --------------------------------------------------------------------

def is_cifar(sm: StudyModel) -> bool:
    return sm.family in CIFAR_FAMILIES and sm.depth > 0


def fresh_model(sm: StudyModel, images: torch.Tensor, batch_size: int) -> StudyModel | None:
    """A fresh net of ``sm``'s architecture drawn with its seed, batch norm calibrated on ``images``; None when
    the architecture cannot be re-created (a network handed over in memory that is not a CIFAR net)."""
    device = next(sm.model.parameters()).device
    kind = sm.info.get("kind", "")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sm.seed)
        if is_cifar(sm):
            m = sm.model
            net = build_model(sm.family, sm.depth, getattr(m, "option", "A"), getattr(m, "width", 1),
                              getattr(m, "gate_bias", None), m.head.fc.out_features)
        elif kind.startswith("torchvision") or kind.startswith("timm"):
            prefix = "timm" if kind.startswith("timm") else "torchvision"
            net = load_model_source(f"{prefix}:{sm.info['arch']}", sm.seed).model
        else:
            return None
    net = calibrate_batchnorm(net.to(device), images, batch_size)
    return StudyModel(sm.name, net, sm.seed, sm.family, sm.depth, None, {"kind": "fresh", "arch": sm.info.get("arch")})


def is_trained(sm: StudyModel) -> bool:
    """Models given with random weights (``torchvision:ARCH`` without weights) are at initialisation already."""
    return not sm.info.get("kind", "").endswith("random")


# ---- one net -----------------------------------------------------------------------------------

def correlation_tables(model, x: torch.Tensor, y: torch.Tensor, s: ShatteredSettings, seed: int, keys: dict
                       ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-line correlations (``correlation``) and the correlation lengths of the mean curves (``lengths``)."""
    g = torch.Generator().manual_seed(int(seed))
    radii = s.radii
    rows, lines = [], {"random": [], "interpolation": []}
    for i in range(len(x)):
        pts = random_line(x[i], radii, g)
        c = correlation_with_start(input_gradients(model, pts, y[i].repeat(len(pts)), target=s.target,
                                                   batch_size=s.batch_size))[1:]
        lines["random"].append(c)
        rows.append(pd.DataFrame({"line": "random", "line_index": i, "position": radii / radii[-1],
                                  "distance": radii, "value": c}))
        pts, dist = interpolation_line(x[i], x[(i + 1) % len(x)], s.interpolation_points)
        c = correlation_with_start(input_gradients(model, pts, y[i].repeat(len(pts)), target=s.target,
                                                   batch_size=s.batch_size))[1:]
        lines["interpolation"].append(c)
        rows.append(pd.DataFrame({"line": "interpolation", "line_index": i,
                                  "position": np.linspace(0, 1, s.interpolation_points)[1:], "distance": dist[1:],
                                  "value": c}))
    corr = pd.concat(rows, ignore_index=True).assign(metric="gradient_correlation", **keys)
    lengths = []
    for kind, curves in lines.items():
        mean = np.mean(curves, axis=0)
        distance = radii if kind == "random" else corr.loc[corr["line"] == kind].groupby("position")["distance"].mean()
        length = correlation_length(np.asarray(distance), mean)
        lengths += [{**keys, "line": kind, "metric": "correlation_length", "value": length.value, "bound": length.bound},
                    {**keys, "line": kind, "metric": "first_correlation", "value": float(mean[0]), "bound": ""}]
    return corr, pd.DataFrame(lengths)


def _measure(net: StudyModel, state: str, x, y, s: ShatteredSettings, keys: dict, tables: dict) -> None:
    net.model.eval()
    corr, lengths = correlation_tables(net.model, x, y, s, net.seed, {**keys, "model": net.name, "depth": net.depth,
                                                                       "state": state})
    for name, df in (("correlation", corr), ("lengths", lengths)):
        tables[name] = pd.concat([tables[name], df], ignore_index=True) if name in tables else df


def measure(s: ShatteredSettings):
    """The measurement of one model: trained (unless its weights are random) and at initialisation, plus fresh
    nets of its family at ``init_depths`` the first time the family shows up. A (family, depth, seed) is
    measured at initialisation once."""
    done: set = set()

    def one(sm: StudyModel, x, y, keys: dict) -> dict[str, pd.DataFrame]:
        keys = {**keys, "family": sm.family, "site": "network"}
        tables: dict[str, pd.DataFrame] = {}
        if is_trained(sm):
            fresh = [f for f in [fresh_model(sm, x, s.batch_size)] if f is not None]
        else:   # given with random weights: measured as it is, its BN statistics set from the images on a copy
            fresh = [replace(sm, model=calibrate_batchnorm(copy.deepcopy(sm.model), x, s.batch_size))]
        if is_cifar(sm):
            fresh += [fresh_model(replace(sm, name=model_name(sm.family, d), depth=d, model=build_model(sm.family, d)),
                                  x, s.batch_size) for d in s.init_depths if (sm.family, d, sm.seed) not in done]
        for net in fresh:
            key = (net.family, net.depth, net.seed)
            if key not in done or not is_cifar(net):
                done.add(key)
                _measure(net, "initialisation", x, y, s, keys, tables)
        if is_trained(sm):
            _measure(sm, "trained", x, y, s, keys, tables)
        return tables
    return one


def run(settings: ShatteredSettings, models: Zoo | Sequence | None, data: StudyData, *, out: str | Path = "runs",
        seeds: Sequence[int] = (0,), device: str = "auto", train: ZooSettings | None = None,
        scale: str | None = None) -> StudyResult:
    """Input-gradient correlation against distance of ``models`` (or of nets trained here), at initialisation
    and trained."""
    return analysis_run("shattered", title=TITLE, source_file=__file__, settings=settings, models=models, data=data,
                        out=out, seeds=seeds, device=device, train=train or trained_nets(scale or "quick"),
                        scale=scale, measure=measure(settings),
                        report=lambda r, tables, d, n: write_report(r, tables, settings, d, n))


COMMAND = StudyCommand(
    name="shattered", run=run, settings=ShatteredSettings, inputs="models", train=trained_nets, families=FAMILIES,
    description="Correlation of input gradients against input distance along random and interpolation lines, per "
                "family and depth, at initialisation and after training (Balduzzi et al. 2017).")
