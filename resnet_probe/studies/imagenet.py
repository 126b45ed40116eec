"""ImageNet inputs for the studies: a class-per-folder image set and torchvision weights from the hub cache.

torchvision ResNets are ImageNet models, so the studies that accept them (``lesion``,
``response_std``) also take

- ``--data imagefolder=PATH``: an ImageNet-style validation set, one sub-folder per class (any
  image format Pillow reads). Images go through the standard evaluation transform: resize the
  short side to 256, center-crop 224, ImageNet mean / std normalisation. Labels are the class
  folders in sorted order, as ``torchvision.datasets.ImageFolder`` numbers them; for ImageNet's
  WordNet-id folders (``n01440764`` ...) that is the class order of torchvision's weights.
  ``--limit N`` evaluates a seeded random subset of ``N`` images (drawn over all classes).
- ``--weights NAME``: a torchvision weights enum member (``IMAGENET1K_V2``, ``DEFAULT`` or the
  full ``ResNet50_Weights.IMAGENET1K_V2``) for ``torchvision:ARCH`` models. The file is read from
  the torch hub cache, ``torch.hub.get_dir()/checkpoints/<file name of the enum's url>`` (where
  torchvision itself saves downloads), with ``torch.load(weights_only=True)``. When it is missing
  it is downloaded if ``download.pytorch.org`` answers; offline, ``WeightsNotFoundError`` names the
  exact path to put the file at.

Recent weights (``IMAGENET1K_V2``) were evaluated by their authors with a resize to 232, not 256;
the studies keep one transform for every model, which moves top-1 error by a few tenths of a point.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.models import get_model_weights

from ..checkpoints import (TORCHVISION_ARCHS, CheckpointError, load_model, load_strict, read_checkpoint,
                           torchvision_model)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE = 256   # pixels, short side
CROP = 224     # pixels, square center crop
IMAGEFOLDER_PREFIX = "imagefolder="
WEIGHTS_HOST = "download.pytorch.org"


class WeightsNotFoundError(FileNotFoundError):
    """torchvision weights that are neither in the hub cache nor downloadable; names the path to use."""


# ---- the image folder ---------------------------------------------------------------------------

@dataclass(eq=False)
class ImageFolderData:
    """Evaluation images of a class-per-folder set, transformed and normalised.

    Attributes:
        root: the folder.
        images: ``float32 (N, 3, 224, 224)``, ImageNet-normalised.
        labels: ``int64 (N,)``, index of the class folder in sorted order.
        classes: class folder names in label order.
        files: the image files, relative to ``root``, in the order of ``images``.
        n_total: images in the folder before ``limit``.
        seed: seed of the subset drawn for ``limit``.
    """

    root: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    files: tuple[str, ...]
    n_total: int
    seed: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def provenance(self) -> dict[str, Any]:
        """JSON-ready description of the data, for run folders (``synthetic`` is false)."""
        return {"name": "imagefolder", "kind": "imagefolder", "path": self.root, "synthetic": False,
                "n_test": len(self.labels), "n_total": self.n_total, "n_classes": self.num_classes,
                "classes": list(self.classes[:20]) + (["..."] if self.num_classes > 20 else []),
                "subset_seed": self.seed,
                "transform": f"resize {RESIZE}, center crop {CROP}, ImageNet mean/std normalisation",
                "description": (f"{len(self.labels)} of {self.n_total} images in {self.num_classes} class "
                                f"folders under {self.root}")}


def imagefolder_path(spec: str | os.PathLike | None) -> Path | None:
    """The folder of an ``imagefolder=PATH`` data spec, or ``None`` for any other spec.

    Raises:
        ValueError: ``imagefolder=`` without a path.
    """
    if spec is None:
        return None
    text = os.fspath(spec).strip()
    if not text.startswith(IMAGEFOLDER_PREFIX):
        return None
    path = text[len(IMAGEFOLDER_PREFIX):].strip()
    if not path:
        raise ValueError("--data imagefolder=PATH needs a folder: imagefolder=/data/imagenet/val")
    return Path(path).expanduser()


def imagenet_transform():
    """Resize the short side to 256, center-crop 224, to a float tensor, ImageNet normalisation."""
    return transforms.Compose([transforms.Resize(RESIZE), transforms.CenterCrop(CROP), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def load_imagefolder(root: str | os.PathLike, limit: int | None = None, seed: int = 0,
                     batch_size: int = 64, num_workers: int = 0) -> ImageFolderData:
    """Read and transform an ImageNet-style class-per-folder image set.

    Args:
        root: a folder with one sub-folder of images per class.
        limit: evaluate at most this many images, a seeded random subset over all classes
            (``None`` = all).
        seed: seed of that subset.
        batch_size: images decoded per batch.
        num_workers: decoding processes (``DataLoader``).

    Returns:
        The ``ImageFolderData``.

    Raises:
        FileNotFoundError: ``root`` is missing or holds no class folder with images.
        ValueError: ``limit`` is not positive.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; --data imagefolder=PATH needs a folder "
                                "with one sub-folder of images per class (e.g. ImageNet's val/n01440764/...)")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images; got {limit}")
    try:
        dataset = ImageFolder(str(root), transform=imagenet_transform())
    except (FileNotFoundError, RuntimeError) as e:
        raise FileNotFoundError(f"{root} is not a class-per-folder image set ({e}); expected "
                                f"{root}/<class>/<image>.JPEG") from None
    n_total = len(dataset)
    indices = np.arange(n_total)
    if limit is not None and limit < n_total:
        indices = np.sort(np.random.default_rng(seed).choice(n_total, size=limit, replace=False))
    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    files = tuple(str(Path(dataset.samples[i][0]).relative_to(root)) for i in indices)
    return ImageFolderData(root=str(root.resolve()), images=torch.cat(xs), labels=torch.cat(ys).long(),
                           classes=tuple(dataset.classes), files=files, n_total=n_total, seed=seed)


# ---- torchvision weights --------------------------------------------------------------------------

def resolve_weights(arch: str, name: str):
    """The torchvision weights enum member ``name`` of architecture ``arch``.

    Args:
        arch: a torchvision model name (``resnet50``).
        name: a member (``IMAGENET1K_V2``, ``DEFAULT``) or a full name (``ResNet50_Weights.IMAGENET1K_V2``,
            whose class must belong to ``arch``).

    Raises:
        ValueError: the architecture has no weights enum, or the name is none of its members
            (naming the valid ones).
    """
    try:
        enum = get_model_weights(arch)
    except (ValueError, KeyError):
        raise ValueError(f"torchvision has no weights for {arch!r}") from None
    members = [m for m in enum.__members__ if m != "DEFAULT"] + ["DEFAULT"]
    cls_name, dot, member = name.rpartition(".")
    if dot and cls_name != enum.__name__:
        raise ValueError(f"weights {name!r} are not for {arch} (its weights are {enum.__name__}.*: "
                         f"{', '.join(members)})")
    if member not in enum.__members__:
        raise ValueError(f"unknown weights {name!r} for {arch}; valid: {', '.join(members)} "
                         f"(or {enum.__name__}.<NAME>)")
    return enum[member]


def weights_file(weights) -> Path:
    """Where the torch hub cache keeps a weights enum's file: ``torch.hub.get_dir()/checkpoints/<name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _host_reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def weights_state_dict(weights, download: bool = True) -> dict[str, torch.Tensor]:
    """The state_dict of a torchvision weights enum member, from the hub cache.

    Args:
        weights: e.g. ``ResNet50_Weights.IMAGENET1K_V2`` (see ``resolve_weights``).
        download: fetch a missing file into the cache when ``download.pytorch.org`` answers.

    Raises:
        WeightsNotFoundError: the file is missing and cannot be downloaded; the message gives the
            exact path to put it at and the url to get it from.
    """
    path = weights_file(weights)
    if not path.is_file():
        how = ""
        if download and _host_reachable(WEIGHTS_HOST):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(weights.url, str(path), progress=True)
            except Exception as e:  # noqa: BLE001 - reported with the manual route below
                how = f" (download failed: {type(e).__name__}: {e})"
        else:
            how = " (download not allowed)" if not download else f" ({WEIGHTS_HOST} is unreachable: offline?)"
        if not path.is_file():
            raise WeightsNotFoundError(
                f"torchvision weights {weights} are not in the torch hub cache{how}. Put the file at "
                f"{path} (download it from {weights.url}; the cache folder is torch.hub.get_dir() = "
                f"{torch.hub.get_dir()}, set by $TORCH_HOME)")
    return read_checkpoint(path)


def torchvision_pretrained(arch: str, weights: str, download: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """A torchvision ResNet with named ImageNet weights from the hub cache, in eval mode on the CPU.

    Args:
        arch: ``resnet18`` ... (``resnet_probe.checkpoints.TORCHVISION_ARCHS``).
        weights: enum member name (see ``resolve_weights``).
        download: allow downloading a missing file.

    Returns:
        ``(model, info)`` like ``resnet_probe.checkpoints.load_model``, ``kind="torchvision-weights"``.
    """
    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"unknown torchvision architecture {arch!r}; valid: {', '.join(TORCHVISION_ARCHS)}")
    member = resolve_weights(arch, weights)
    sd = weights_state_dict(member, download=download)
    model = torchvision_model(arch, num_classes=len(member.meta["categories"]))
    try:
        load_strict(model, sd, weights_file(member), f"torchvision {arch}")
    except CheckpointError as e:
        raise CheckpointError(f"{e} (a corrupt or foreign file in the hub cache? delete it and retry)") from None
    return model.eval(), {"kind": "torchvision-weights", "arch": arch, "hparams": {"weights": str(member)},
                          "path": str(weights_file(member))}


def load_study_model(source: str, *, weights: str | None = None, arch: str | None = None,
                     allow_unsafe: bool = False, download: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Load a study's model: ``resnet_probe.checkpoints.load_model``, or named weights for ``torchvision:ARCH``.

    Args:
        source: a project ``.ckpt``, a torchvision state_dict file, or ``torchvision:ARCH``.
        weights: torchvision weights for ``torchvision:ARCH`` sources (``None``: random weights).
        arch: torchvision architecture of a state_dict file (``None``: inferred).
        allow_unsafe: load files needing arbitrary unpickling (trusted files only).
        download: allow downloading missing weights.

    Raises:
        ValueError: ``weights`` given for a source that is not ``torchvision:ARCH``.
    """
    if weights is None:
        return load_model(source, arch=arch, allow_unsafe=allow_unsafe)
    if not (isinstance(source, str) and source.startswith("torchvision:")):
        raise ValueError(f"--weights {weights} applies to torchvision:ARCH models; {source!r} is a file "
                         "that carries its own weights")
    return torchvision_pretrained(source.split(":", 1)[1], weights, download=download)
