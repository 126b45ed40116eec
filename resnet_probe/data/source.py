"""``DataSource``: one resolved image set (train + test, uint8 NCHW, int64 labels) and its provenance.

Every source (the JPEG pack, torchvision's CIFAR-10, the synthetic set) produces this one
dataclass, validated on construction, so nothing downstream needs to know where pixels came from;
``synthetic`` is carried into every report made from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (3, 32, 32)
SOURCE_KINDS = ("pack", "torchvision", "synthetic")


def check_images_labels(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        what: str = "data", image_shape: tuple[int, ...] | None = IMAGE_SHAPE) -> None:
    """Raise ``ValueError`` unless ``images`` / ``labels`` form a non-empty, consistent labelled set.

    Args:
        images: expected ``torch.uint8`` of shape ``(N, *image_shape)`` (any ``(N, C, H, W)`` when
            ``image_shape`` is ``None``).
        labels: expected ``torch.int64`` of shape ``(N,)`` with values in ``0..num_classes-1``.
        num_classes: number of classes.
        what: name used in the error message (e.g. ``"train"``).
        image_shape: required per-image shape, or ``None`` to accept any 3-d image.
    """
    want = "(N, " + ", ".join(map(str, image_shape)) + ")" if image_shape else "(N, C, H, W)"
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{type(images).__name__} {getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}"
        raise ValueError(f"{what} images must be a torch.uint8 tensor of shape {want}; got {got}")
    if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"{what} images must have shape {want}; got {tuple(images.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
        got = f"{type(labels).__name__} {getattr(labels, 'dtype', '')} {tuple(getattr(labels, 'shape', ()))}"
        raise ValueError(f"{what} labels must be a torch.int64 tensor of shape (N,); got {got}")
    if len(images) != len(labels):
        raise ValueError(f"{what}: {len(images)} images but {len(labels)} labels; they must match")
    if len(images) == 0:
        raise ValueError(f"{what} is empty: at least one image is needed")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{what} labels must lie in 0..{num_classes - 1}; got values in {lo}..{hi}")


@dataclass(eq=False)
class DataSource:
    """A labelled image set with a train and a test split.

    Attributes:
        name: short identifier (``cifar10-jpeg``, ``cifar10``, ``synthetic``).
        kind: ``"pack"``, ``"torchvision"`` or ``"synthetic"``.
        path: file or directory the data came from (``None`` for synthetic data).
        synthetic: ``True`` when the images are not CIFAR-10; reports made from it must say so.
        train_images, test_images: ``torch.uint8`` tensors of shape ``(N, 3, 32, 32)``.
        train_labels, test_labels: ``torch.int64`` tensors of shape ``(N,)``.
        classes: class names in label order.
        description: one human-readable line.
        details: kind-specific provenance (file size and mtime, seed, subset indices, ...).
    """

    name: str
    kind: str
    path: str | None
    synthetic: bool
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    description: str
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"unknown source kind {self.kind!r}; valid kinds: {', '.join(SOURCE_KINDS)}")
        self.classes = tuple(str(c) for c in self.classes)
        if not self.classes:
            raise ValueError("a data source needs at least one class name")
        check_images_labels(self.train_images, self.train_labels, len(self.classes), f"{self.name} train")
        check_images_labels(self.test_images, self.test_labels, len(self.classes), f"{self.name} test")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def provenance(self) -> dict[str, Any]:
        """JSON-ready description of where the data came from, for reports and run folders."""
        return {"name": self.name, "kind": self.kind, "path": self.path, "synthetic": self.synthetic,
                "n_train": len(self.train_labels), "n_test": len(self.test_labels),
                "classes": list(self.classes), "description": self.description, **self.details}

    def __repr__(self) -> str:
        flag = " SYNTHETIC" if self.synthetic else ""
        return (f"DataSource({self.name!r}, kind={self.kind!r}{flag}, train={len(self.train_labels)}, "
                f"test={len(self.test_labels)}, path={self.path!r})")
