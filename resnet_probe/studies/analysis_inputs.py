"""Models and evaluation images of the analysis studies (lesion, paths, highway).

A study's positional ``CHECKPOINT...`` arguments may be project ``.ckpt`` files, ``train_zoo`` run
folders (every model in them of a family the study can analyse), torchvision ResNet state_dict
files or ``torchvision:ARCH`` names (random weights seeded by the first ``--seeds`` value, or
``--weights NAME`` from the torch hub cache). With no checkpoint the study trains its own nets with
``train_quick`` (the scale's families, depth and length, one per seed) and keeps their checkpoints
in ``<run>/models/`` so notebooks can reopen them without retraining.

Evaluation images are a seeded subset of the CIFAR-10 test split (``--data``, CIFAR
normalisation) or, with ``--data imagefolder=PATH``, an ImageNet-style folder (see ``imagenet``).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch
from torch import nn

from .imagenet import imagefolder_path, load_imagefolder, load_study_model
from .options import (add_imagenet_arguments, add_load_arguments, resolve_data, resolve_device, scale_settings,
                      set_threads)
from .train_zoo import data_sizes


@dataclass(eq=False)
class StudyModel:
    """One model a study analyses.

    Attributes:
        name: its label in every table (``residual-20``, ``resnet18 (random init)``).
        model: the network, in eval mode, on the study's device.
        seed: training seed (trained / project nets) or the seed its analysis draws with.
        info: ``kind``, ``arch``, ``path`` and, for nets trained here, ``metrics``.
    """

    name: str
    model: nn.Module
    seed: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def blocks(self):
        from ..models import anatomy
        return anatomy(self.model).blocks


@dataclass(eq=False)
class EvalData:
    """Evaluation images and labels, their provenance and (CIFAR) the source to train on."""

    images: torch.Tensor
    labels: torch.Tensor
    provenance: dict[str, Any]
    kind: str                     # "cifar" or "imagefolder"
    source: Any = None            # the CIFAR DataSource (None for an image folder)


def add_model_arguments(p: argparse.ArgumentParser, families: tuple[str, ...] = ("plain", "highway",
                                                                                  "residual", "preact")) -> None:
    """Positional ``CHECKPOINT...`` plus the loading, ImageNet and own-training options."""
    from ..checkpoints import TORCHVISION_ARCHS
    p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT",
                   help="project .ckpt, train_zoo run folder, torchvision state_dict file or torchvision:ARCH; "
                        "none: train the scale's nets here")
    add_load_arguments(p, TORCHVISION_ARCHS)
    add_imagenet_arguments(p)
    p.add_argument("--families", nargs="+", choices=families, default=None, help="families trained without CHECKPOINT")
    p.add_argument("--depth", type=int, default=None, help="depth (6n+2) trained without CHECKPOINT")
    p.add_argument("--epochs", type=int, default=None, help="training epochs without CHECKPOINT")
    p.add_argument("--train-limit", dest="train_limit", type=int, default=None, help="training images")


def eval_images(spec: str, n: int, seed: int, limit: int | None, purpose: str, n_train: int | None = 1) -> EvalData:
    """``n`` images from an image folder (``spec`` = ``imagefolder=PATH``; ``limit`` caps them) or
    a seeded subset of ``n`` CIFAR test images, named by ``purpose``, from ``resolve_data(spec)``
    (``n_train``: training images the source must hold; 1 when nothing is trained)."""
    from ..data import normalize, random_subset

    folder = imagefolder_path(spec)
    if folder is not None:
        d = load_imagefolder(folder, limit=limit or n, seed=seed)
        return EvalData(d.images, d.labels, d.provenance(), "imagefolder")
    source = resolve_data(spec, n_train, n)
    idx = random_subset(len(source.test_labels), n, seed, purpose)
    prov = {**source.provenance(), "n_evaluated": len(idx), "evaluated": "seeded subset of the test split"}
    return EvalData(normalize(source.test_images[idx]), source.test_labels[idx].long(), prov, "cifar", source)


def evaluation_data(args: argparse.Namespace, s: dict) -> EvalData:
    """The images a study evaluates: ``s["n_examples"]`` CIFAR test images, or an image folder."""
    if imagefolder_path(args.data) is not None and not args.checkpoints:
        raise ValueError("--data imagefolder=PATH evaluates given models (e.g. torchvision:resnet50 --weights "
                         "IMAGENET1K_V2); without CHECKPOINT the study would train CIFAR nets, which needs CIFAR data")
    n_train = 1 if args.checkpoints else data_sizes(s)[0]  # a synthetic set sized for what is trained
    return eval_images(args.data, s["n_examples"], args.seeds[0], args.limit, "analysis-eval", n_train)


def open_analysis(parser: argparse.ArgumentParser, argv: list[str] | None, quick: dict,
                  paper: dict) -> tuple[argparse.Namespace, dict, torch.device, EvalData, dict]:
    """Parse an analysis study's command line and resolve what it runs on.

    Returns:
        ``(args, settings, device, data, config)``: the parsed arguments (threads set), the scale's
        settings, the device, the evaluation data, and the config the run records.
    """
    args = parser.parse_args(argv)
    set_threads(args.threads)
    s = scale_settings(args, quick, paper)
    device = resolve_device(args.device)
    data = evaluation_data(args, s)
    config = {**s, "scale": args.scale, "seeds": list(args.seeds), "checkpoints": list(args.checkpoints),
              "weights": args.weights, "device": device.type}
    return args, s, device, data, config


def model_label(info: dict, source: str | None = None) -> str:
    """How a loaded model is named in tables: its architecture, weights or file (``load_model``'s info)."""
    if info["kind"] == "project":
        return info["arch"]
    if info["kind"] == "torchvision-random":
        return f"{info['arch']} (random init)"
    if info["kind"] == "torchvision-weights":
        return f"{info['arch']} {info['hparams']['weights'].split('.')[-1]}"
    return f"{info['arch']} ({Path(source or info['path']).name})"


def expand_checkpoints(sources: list[str], families: tuple[str, ...]) -> list[tuple[str, int | None]]:
    """Checkpoint arguments -> ``(source, seed)``; run folders become their models of ``families``."""
    out = []
    for src in sources:
        if Path(src).is_dir():
            from .train_zoo import zoo_checkpoints
            zoo = zoo_checkpoints(src)
            zoo = zoo[zoo["family"].isin(families)]
            if zoo.empty:
                raise ValueError(f"{src}: no model of a family this study analyses ({', '.join(families)})")
            out += [(c, int(seed)) for c, seed in zip(zoo["checkpoint"], zoo["seed"])]
        else:
            out.append((src, None))
    return out


def _train(family: str, seed: int, s: dict, data: EvalData, out_dir: Path):
    from ..data import CifarDataModule
    from ..train.quick import train_quick
    dm = CifarDataModule.from_source(data.source, batch_size=128, val_size=s["val_size"], split_seed=seed,
                                     train_limit=s["train_limit"], augment=s["augment"], seed=seed)
    module, metrics = train_quick(family, s["depth"], data=dm, epochs=s["epochs"], seed=seed, recipe=s["recipe"],
                                  lr=s["lr"], out_dir=out_dir)
    return module.model, metrics


def study_models(args: argparse.Namespace, s: dict, data: EvalData, device: torch.device, run,
                 families: tuple[str, ...]) -> Iterator[StudyModel]:
    """The models of a study, one at a time (loaded or trained as the module docstring says).

    Args:
        args: parsed arguments (``checkpoints``, ``arch``, ``allow_unsafe_load``, ``weights``,
            ``download``, ``seeds``).
        s: the scale's settings (``families``, ``depth``, ``epochs``, ``train_limit``, ``val_size``,
            ``recipe``, ``lr``, ``augment`` for training).
        data: the evaluation data (its CIFAR source is trained on).
        device: where the models are put.
        run: the study's ``Run``; trained checkpoints go to ``<run>/models/`` and a ``models`` table
            lists every model.
        families: families taken from ``train_zoo`` folders.
    """
    rows: list[dict] = []
    seen: dict[tuple[str, int], int] = {}

    def record(sm: StudyModel) -> StudyModel:
        key = (sm.name, sm.seed)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            sm.name = f"{sm.name} #{seen[key]}"
        sm.model.to(device).eval()
        keys = {"run": run.path.name, "seed": sm.seed, "model": sm.name, "site": "network",
                "kind": sm.info["kind"], "checkpoint": str(sm.info.get("path") or "")}
        rows.append({**keys, "metric": "n_blocks", "value": float(len(sm.blocks))})
        for k, v in sm.info.get("metrics", {}).items():
            if k in ("val_error", "train_error") and v is not None:
                rows.append({**keys, "metric": f"{k}_percent", "value": 100.0 * float(v)})
        run.add_table("models", pd.DataFrame(rows))
        return sm

    if args.checkpoints:
        for src, zoo_seed in expand_checkpoints(list(args.checkpoints), tuple(families)):
            seed = zoo_seed if zoo_seed is not None else args.seeds[0]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # torchvision:ARCH random weights are reproducible
                model, info = load_study_model(src, weights=args.weights, arch=args.arch,
                                               allow_unsafe=args.allow_unsafe_load, download=args.download)
            seed = int(info["hparams"].get("seed", seed)) if info["kind"] == "project" else seed
            yield record(StudyModel(model_label(info, src), model, seed, info))
        return
    if data.source is None:
        raise ValueError("training needs CIFAR data; pass CHECKPOINTs to evaluate on an image folder")
    for family in s["families"]:
        for seed in args.seeds:
            name = f"{family}-{s['depth']}"
            print(f"training {name} seed {seed} ({s['epochs']} epochs, recipe {s['recipe']})", flush=True)
            out = run.path / "models" / f"{name}-seed{seed}"
            model, metrics = _train(family, seed, s, data, out)
            path = out / "checkpoints" / "last.ckpt"
            info = {"kind": "trained", "arch": name, "hparams": {}, "metrics": metrics,
                    "path": path.relative_to(run.path).as_posix() if path.is_file() else None}
            yield record(StudyModel(name, model, seed, info))


def check_labels(sm: StudyModel, data: EvalData) -> None:
    """Raise unless the model has an output for every label of the data."""
    with torch.no_grad():
        n_out = sm.model(data.images[:2].to(next(sm.model.parameters()).device)).shape[-1]
    if int(data.labels.max()) >= n_out:
        raise ValueError(f"{sm.name} has {n_out} outputs but the data has labels up to {int(data.labels.max())}; "
                         "evaluate ImageNet models on --data imagefolder=PATH and CIFAR nets on CIFAR data")
