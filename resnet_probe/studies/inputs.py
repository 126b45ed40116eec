"""What a study runs on: the models it analyses and the images it evaluates them on.

One model source for every study. A source is a project checkpoint (``.ckpt``), a ``train_zoo``
run folder (every model in it of a family the study analyses, with the zoo's training records),
a torchvision ResNet state_dict file, ``torchvision:ARCH`` (random weights seeded by the study's
first seed, or ``weights=NAME`` from the torch hub cache) or ``timm:NAME``. A study given no
source trains its own nets (``train_zoo.train_models``) inside its run folder.

Evaluation images are a seeded subset of the CIFAR-10 test split (CIFAR normalisation) or, with
``imagefolder=PATH``, an ImageNet-style class-per-folder set (see ``imagenet``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
import torch
from torch import nn

from ..data import DataSource, normalize, random_subset, resolve_source
from ..models import anatomy, count_parameters
from ..report import RunFolderError, open_run
from .imagenet import ImageFolderData, imagefolder_path, load_imagefolder, load_study_model

__all__ = ["FAMILY_ORDER", "StudyData", "StudyModel", "Zoo", "as_study_models", "check_labels", "family_rank", "model_order",
           "load_data", "load_model_source", "load_models", "model_name", "zoo_models"]

FAMILY_ORDER = ("plain", "highway", "residual", "preact")
ZOO_TABLES = ("curves", "final", "gradients", "train_errors")   # what a train_zoo run records of its nets


def model_name(family: str, depth: int) -> str:
    """``plain-20``: how a CIFAR net is named in every table."""
    return f"{family}-{depth}"


def family_rank(family: str) -> int:
    """Where a family sorts in tables and figures: plain, highway, residual, preact, then the others."""
    return FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)


def model_order(table: pd.DataFrame) -> list[str]:
    """The models of a tidy table with ``family`` and ``depth`` columns, by family (``family_rank``) then depth."""
    m = table[["model", "family", "depth"]].drop_duplicates("model")
    m = m.assign(rank=m["family"].map(family_rank)).sort_values(["rank", "family", "depth"], kind="stable")
    return list(m["model"])


# ---- models -------------------------------------------------------------------------------------

@dataclass(eq=False)
class StudyModel:
    """One network a study analyses.

    Attributes:
        name: its label in every table (``residual-20``, ``resnet18 (random init)``).
        model: the network, in eval mode.
        seed: its training seed, or the seed its random weights and its analysis draw with.
        family: ``plain``, ``highway``, ``residual``, ``preact``, or the architecture of other nets.
        depth: layers of a CIFAR net (6n+2); -1 for other nets.
        source: what loads it again (a checkpoint path, ``torchvision:resnet18``); ``None`` for a
            network handed over in memory, which a recorded command cannot re-create.
        info: ``kind``, ``arch``, ``hparams``, ``path`` and, for nets trained by a study, ``metrics``.
    """

    name: str
    model: nn.Module
    seed: int
    family: str
    depth: int = -1
    source: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def blocks(self):
        return anatomy(self.model).blocks

    @property
    def n_parameters(self) -> int:
        """Trainable parameters (a highway block's gate conv included)."""
        return count_parameters(self.model)

    def keys(self, run_name: str) -> dict[str, Any]:
        """The identifying columns of this model's rows in a tidy table."""
        return {"run": run_name, "seed": self.seed, "model": self.name}


@dataclass(eq=False)
class Zoo:
    """The models a study analyses and, where they come from ``train_zoo`` runs, their training records.

    Attributes:
        models: the networks, plain / highway / residual / others, by depth and seed.
        tables: ``curves``, ``final`` and ``gradients`` of the zoo runs (empty for plain checkpoints).
        folders: the ``train_zoo`` run folders read.
        data: the data provenance of the (first) zoo run.
    """

    models: list[StudyModel]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    folders: list[Path] = field(default_factory=list)
    data: dict[str, Any] | None = None

    def of(self, families: Iterable[str]) -> list[StudyModel]:
        """The models of the given families, in zoo order."""
        families = set(families)
        return [m for m in self.models if m.family in families]

    def deepest(self, families: Iterable[str]) -> list[StudyModel]:
        """Per family, the models of its largest depth."""
        chosen = self.of(families)
        top = {f: max(m.depth for m in chosen if m.family == f) for f in {m.family for m in chosen}}
        return [m for m in chosen if m.depth == top[m.family]]


def _label(info: dict, source: str) -> str:
    if info["kind"] == "project":
        return info["arch"]
    if info["kind"] in ("torchvision-random", "timm-random"):
        return f"{info['arch']} (random init)"
    if info["kind"] == "torchvision-weights":
        return f"{info['arch']} {info['hparams']['weights'].split('.')[-1]}"
    return f"{info['arch']} ({Path(info.get('path') or source).name})"


def absolute_if_path(source: str | os.PathLike) -> str:
    """``source`` as an absolute path when it names an existing file or folder, else unchanged
    (``torchvision:resnet18``, ``timm:resnet50``)."""
    return str(Path(source).resolve()) if Path(source).exists() else str(source)


def load_model_source(source: str, seed: int, *, arch: str | None = None, weights: str | None = None,
                      allow_unsafe: bool = False, download: bool = True) -> StudyModel:
    """Load one model source (not a ``train_zoo`` folder) as a ``StudyModel``.

    Random weights (``torchvision:ARCH`` without ``weights``) are drawn with ``seed``, so a recorded
    command re-creates them.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, info = load_study_model(source, weights=weights, arch=arch, allow_unsafe=allow_unsafe,
                                       download=download)
    hp = info.get("hparams", {})
    if info["kind"] == "project":
        seed = int(hp.get("seed", seed))
    family = hp.get("family", info["arch"])
    return StudyModel(_label(info, source), model.eval(), seed, family, int(hp.get("depth", -1)),
                      absolute_if_path(source), info)


def zoo_models(run_dir: str | os.PathLike) -> tuple[pd.DataFrame, Any]:
    """The models of a ``train_zoo`` run: one row per model and seed, its absolute ``checkpoint`` path,
    and the opened run.

    Raises:
        ValueError: the folder is not a ``train_zoo`` run with trained models.
    """
    run = open_run(run_dir)
    if "final" not in run.tables or "checkpoint" not in run.table("final").columns:
        raise ValueError(f"{run_dir} is not a train_zoo run (no 'final' table with checkpoints); "
                         "make one with `resnet-probe train_zoo`")
    df = run.table("final")[["model", "family", "depth", "seed", "checkpoint"]].drop_duplicates()
    df["checkpoint"] = [str(run.path.resolve() / c) for c in df["checkpoint"]]
    df["_rank"] = df["family"].map(family_rank)
    df = df.sort_values(["_rank", "family", "depth", "seed"]).drop(columns="_rank").reset_index(drop=True)
    return df, run


def load_models(sources: Sequence[str], families: Sequence[str] | None = None, *, seed: int = 0,
                arch: str | None = None, weights: str | None = None, allow_unsafe: bool = False,
                download: bool = True) -> Zoo:
    """Load every model source a study is given.

    Args:
        sources: checkpoints, ``train_zoo`` run folders, state_dict files, ``torchvision:ARCH``,
            ``timm:NAME``.
        families: families taken from ``train_zoo`` folders (``None``: all).
        seed: seed of random weights and of models without a training seed.
        arch: torchvision architecture of state_dict files (``None``: inferred).
        weights: torchvision weights for ``torchvision:ARCH`` sources.
        allow_unsafe: unpickle files that need it (trusted files only; a warning names each).
        download: allow downloading missing torchvision weights.

    Raises:
        ValueError, FileNotFoundError, CheckpointError: a source that cannot be read, naming it.
    """
    zoo = Zoo(models=[])
    parts: dict[str, list[pd.DataFrame]] = {}
    for src in sources:
        src = str(src)
        if Path(src).is_dir():
            try:
                rows, run = zoo_models(src)
            except RunFolderError as e:
                raise ValueError(f"{src} is a folder but not a train_zoo run folder: {e}") from None
            if families is not None:
                rows = rows[rows["family"].isin(families)]
                if rows.empty:
                    raise ValueError(f"{src}: no model of a family this study analyses ({', '.join(families)})")
            zoo.models += [load_model_source(c, int(s), allow_unsafe=allow_unsafe)
                           for c, s in zip(rows["checkpoint"], rows["seed"])]
            zoo.folders.append(run.path)
            zoo.data = zoo.data or run.provenance.get("data")
            for name in ZOO_TABLES:
                if name in run.tables:
                    parts.setdefault(name, []).append(run.table(name))
        elif ":" in src and src.split(":", 1)[0] in ("torchvision", "timm"):
            zoo.models.append(load_model_source(src, seed, weights=weights, download=download))
        elif not Path(src).exists():
            raise FileNotFoundError(f"model source {src} does not exist; give a .ckpt, a train_zoo run folder, "
                                    "a torchvision state_dict file, torchvision:ARCH or timm:NAME")
        else:
            zoo.models.append(load_model_source(src, seed, arch=arch, allow_unsafe=allow_unsafe))
    zoo.tables = {name: pd.concat(p, ignore_index=True) for name, p in parts.items()}
    _unique_names(zoo.models)
    return zoo


def _unique_names(models: list[StudyModel]) -> None:
    """Number repeated (name, seed) pairs: ``resnet18 (random init) #2``."""
    seen: dict[tuple[str, int], int] = {}
    for m in models:
        key = (m.name, m.seed)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            m.name = f"{m.name} #{seen[key]}"


def as_study_models(models: Iterable[StudyModel | nn.Module], seed: int = 0) -> list[StudyModel]:
    """``StudyModel``s from what a Python caller passes: ``StudyModel``s as they are, bare networks named
    by their class (``CifarNet``: ``<family>-<depth>``)."""
    out = []
    for i, m in enumerate(models):
        if isinstance(m, StudyModel):
            out.append(m)
            continue
        if not isinstance(m, nn.Module):
            raise TypeError(f"models must be StudyModels or torch modules; got {type(m).__name__} "
                            "(load files with resnet_probe.studies.inputs.load_models)")
        family, depth = getattr(m, "family", type(m).__name__), getattr(m, "depth", -1)
        name = model_name(family, depth) if depth != -1 else type(m).__name__
        out.append(StudyModel(name, m.eval(), seed, family, depth, None, {"kind": "module", "arch": name}))
    _unique_names(out)
    return out


def check_labels(sm: StudyModel, labels: torch.Tensor, images: torch.Tensor) -> None:
    """Raise unless the model has an output for every label of the evaluation data."""
    device = next(sm.model.parameters()).device
    with torch.no_grad():
        n_out = sm.model(images[:1].to(device)).shape[-1]
    if int(labels.max()) >= n_out:
        raise ValueError(f"{sm.name} has {n_out} outputs but the data has labels up to {int(labels.max())}; "
                         "evaluate ImageNet models on --data imagefolder=PATH and CIFAR nets on CIFAR data")


# ---- data ---------------------------------------------------------------------------------------

@dataclass(eq=False)
class StudyData:
    """The data a study runs on: a CIFAR source (trained on, test split evaluated) or an image folder.

    Attributes:
        spec: the data spec as given (``auto``, ``pack=PATH``, ``synthetic``, ``imagefolder=PATH``).
        source: the loaded ``DataSource`` or ``ImageFolderData``.
    """

    spec: str
    source: DataSource | ImageFolderData

    @property
    def kind(self) -> str:
        """``cifar`` or ``imagefolder``."""
        return "imagefolder" if isinstance(self.source, ImageFolderData) else "cifar"

    @property
    def synthetic(self) -> bool:
        return bool(getattr(self.source, "synthetic", False))

    def provenance(self) -> dict[str, Any]:
        return {"spec": self.spec, **self.source.provenance()}

    def describe(self) -> str:
        return self.provenance().get("description", self.kind)

    def evaluation(self, n: int, seed: int, purpose: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` normalised evaluation images and their labels: a subset of the test split drawn with
        ``seed`` and ``purpose``, or the first ``n`` images of the folder."""
        if isinstance(self.source, ImageFolderData):
            return self.source.images[:n], self.source.labels[:n]
        idx = random_subset(len(self.source.test_labels), n, seed, purpose)
        return normalize(self.source.test_images[idx]), self.source.test_labels[idx].long()

    def training_source(self) -> DataSource:
        """The CIFAR source nets are trained on.

        Raises:
            ValueError: the data is an image folder (nothing to train on).
        """
        if isinstance(self.source, ImageFolderData):
            raise ValueError("training needs CIFAR data, not --data imagefolder=PATH; give model sources to "
                             "evaluate on an image folder")
        return self.source


def load_data(spec: str = "auto", *, n_train: int | None = 1, n_test: int | None = None, seed: int = 0) -> StudyData:
    """Load a data spec (``resnet_probe.data.resolve_source`` forms, or ``imagefolder=PATH``).

    Args:
        spec: the data spec.
        n_train: training images needed (sizes a synthetic set; ``None`` = 50,000).
        n_test: evaluation images needed (sizes a synthetic set, caps an image folder; ``None`` = all).
        seed: seed of the image-folder subset.
    """
    folder = imagefolder_path(spec)
    if folder is not None:
        return StudyData(str(spec), load_imagefolder(folder, limit=n_test, seed=seed))
    source = resolve_source(spec, synthetic_size=(n_train or 50_000, n_test or 10_000))
    return StudyData(str(spec), source)

