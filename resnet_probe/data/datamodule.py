"""``CifarDataModule``: CIFAR-10 (or the synthetic stand-in) for Lightning, split 45k/5k/10k as in He et al.

Two ways to deliver batches, both yielding ``(x, y)`` with ``x`` float32 normalised
``(N, 3, 32, 32)`` and ``y`` int64:
- ``resident`` (default): the uint8 set lives whole on the training device (the GPU when there is
  one) and ``ResidentLoader`` gathers, augments and normalises each batch there; it is stateful,
  so a run resumed from a mid-epoch checkpoint sees exactly the batches of an uninterrupted run.
- ``dataloader``: ordinary torch DataLoaders over the uint8 tensors, augmenting each batch in the
  collate function (chosen by ``auto`` when ``num_workers > 0``).
"""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset, get_worker_info

from ._seeding import seeded_generator
from .augment import normalize, random_crop_flip
from .loader import ResidentLoader
from .resolve import resolve_source
from .source import DataSource
from .split import random_subset, train_val_split

LOADERS = ("auto", "resident", "dataloader")


class _AugmentNormalize:
    """Collate for the DataLoader path: stack, crop + flip (training), normalise.

    Each worker process seeds its own generator from the DataLoader's per-worker seed, so workers
    draw different crops and a run is reproducible for a fixed ``seed``.
    """

    def __init__(self, augment: bool, seed: int):
        self.augment, self.seed = augment, seed
        self._generator: torch.Generator | None = None

    def __call__(self, items):
        x = torch.stack([item[0] for item in items])
        y = torch.stack([item[1] for item in items])
        if self.augment:
            if self._generator is None:
                info = get_worker_info()
                self._generator = seeded_generator(self.seed, "collate", 0 if info is None else info.seed)
            x = random_crop_flip(x, self._generator)
        return normalize(x), y


class CifarDataModule(pl.LightningDataModule):
    """CIFAR-10 train / val / test loaders.

    Args:
        data: data spec for ``resolve_source`` (``auto``, ``pack[=PATH]``, ``torchvision[=ROOT]``,
            ``synthetic`` or a path to an ``.npz``).
        batch_size: training batch size (128 in the paper).
        val_size: training images held out for validation (5,000 in the paper; 0 for none).
        split_seed: seed of the train/val split and of the ``test_limit`` subset.
        train_limit: train on only this many of the remaining images (a seeded random subset).
        test_limit: evaluate on only this many test images (a seeded random subset).
        augment: pad-4 random crop + horizontal flip of training images.
        num_workers: DataLoader workers (``loader="dataloader"`` only).
        gpu_resident: keep the data on the GPU; ``None`` = when the trainer (or, without one,
            this machine) uses CUDA.
        eval_batch_size: batch size of the validation and test loaders.
        loader: ``"resident"``, ``"dataloader"`` or ``"auto"`` (resident unless ``num_workers > 0``).
        drop_last: drop the last incomplete training batch (fixed shapes for CUDA graphs).
        seed: seed of the per-epoch shuffle and augmentation.
    """

    def __init__(self, data: str = "auto", batch_size: int = 128, val_size: int = 5000, split_seed: int = 0,
                 train_limit: int | None = None, test_limit: int | None = None, augment: bool = True,
                 num_workers: int = 0, gpu_resident: bool | None = None, eval_batch_size: int = 1000,
                 loader: str = "auto", drop_last: bool = False, seed: int = 0):
        super().__init__()
        if loader not in LOADERS:
            raise ValueError(f"unknown loader {loader!r}; valid loaders: {', '.join(LOADERS)}")
        if loader == "dataloader" and gpu_resident:
            raise ValueError("gpu_resident=True needs loader='resident' (or 'auto'); "
                             "loader='dataloader' keeps the data in host memory")
        if gpu_resident and not torch.cuda.is_available():
            raise ValueError("gpu_resident=True but CUDA is not available; use gpu_resident=None or False")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value}")
        for name, value in (("train_limit", train_limit), ("test_limit", test_limit)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of images or None; got {value}")
        if val_size < 0 or num_workers < 0:
            raise ValueError(f"val_size and num_workers must be >= 0; got {val_size}, {num_workers}")
        self.save_hyperparameters()
        self._source: DataSource | None = None
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._device_splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_source(cls, source: DataSource, **kwargs: Any) -> "CifarDataModule":
        """A data module over an already loaded ``DataSource`` (e.g. a small synthetic set)."""
        dm = cls(data=f"{source.kind}:{source.name}", **kwargs)
        dm._source = source
        return dm

    # ---------------------------------------------------------------- data
    @property
    def source(self) -> DataSource:
        """The resolved data source (resolved on first use)."""
        if self._source is None:
            self._source = resolve_source(self.hparams.data)
        return self._source

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    def splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{"train", "val", "test"}`` -> ``(uint8 images, int64 labels)`` on the CPU."""
        if self._splits is None:
            hp, src = self.hparams, self.source
            train_idx, val_idx = train_val_split(len(src.train_labels), hp.val_size, hp.split_seed)
            if hp.train_limit is not None:
                train_idx = train_idx[:hp.train_limit]
            test_idx = (torch.arange(len(src.test_labels)) if hp.test_limit is None
                        else random_subset(len(src.test_labels), hp.test_limit, hp.split_seed, "test_limit"))
            self._splits = {
                "train": (src.train_images[train_idx], src.train_labels[train_idx]),
                "val": (src.train_images[val_idx], src.train_labels[val_idx]),
                "test": (src.test_images[test_idx], src.test_labels[test_idx]),
            }
        return self._splits

    def setup(self, stage: str | None = None) -> None:
        self.splits()

    # ---------------------------------------------------------------- where batches are made
    def _trainer_device(self) -> torch.device | None:
        trainer = getattr(self, "trainer", None)
        return None if trainer is None else trainer.strategy.root_device

    def resident_device(self) -> torch.device:
        """Device the resident loaders keep the data on."""
        use_gpu, trainer_device = self.hparams.gpu_resident, self._trainer_device()
        if use_gpu is None:
            use_gpu = trainer_device.type == "cuda" if trainer_device is not None else torch.cuda.is_available()
        if not use_gpu:
            return torch.device("cpu")
        if trainer_device is not None and trainer_device.type == "cuda":
            return trainer_device
        return torch.device("cuda", torch.cuda.current_device())

    @property
    def loader_kind(self) -> str:
        """``"resident"`` or ``"dataloader"``."""
        kind = self.hparams.loader
        if kind == "auto":
            on_gpu = self.resident_device().type == "cuda"
            kind = "dataloader" if self.hparams.num_workers > 0 and not on_gpu else "resident"
        return kind

    def _shards(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def resident_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of ``split`` on ``resident_device()``, moved there once and kept."""
        device = self.resident_device()
        cached = self._device_splits.get(split)
        if cached is None or cached[0].device != device:
            images, labels = self.splits()[split]
            cached = self._device_splits[split] = (images.to(device), labels.to(device))
        return cached

    def _loader(self, split: str, train: bool):
        hp = self.hparams
        batch_size = hp.batch_size if train else hp.eval_batch_size
        augment = hp.augment and train
        if self.loader_kind == "resident":
            images, labels = self.resident_split(split)
            shard, num_shards = self._shards()
            return ResidentLoader(images, labels, batch_size, shuffle=train, augment=augment,
                                  drop_last=hp.drop_last and train, seed=hp.seed,
                                  num_classes=self.num_classes, shard=shard, num_shards=num_shards,
                                  even_shards=train, restart=not train)
        images, labels = self.splits()[split]
        return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=train,
                          drop_last=hp.drop_last and train, num_workers=hp.num_workers,
                          persistent_workers=hp.num_workers > 0, pin_memory=torch.cuda.is_available(),
                          collate_fn=_AugmentNormalize(augment, hp.seed),
                          generator=seeded_generator(hp.seed, "dataloader", split) if train else None)

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return [] if self.hparams.val_size == 0 else self._loader("val", train=False)

    def test_dataloader(self):
        return self._loader("test", train=False)

    # ---------------------------------------------------------------- reporting
    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one training epoch on this rank."""
        n = len(self.splits()["train"][1]) // self._shards()[1]
        b = self.hparams.batch_size
        return n // b if self.hparams.drop_last else -(-n // b)

    def provenance(self) -> dict[str, Any]:
        """The data source plus split, loader and augmentation settings, for reports."""
        s, hp = self.splits(), self.hparams
        return {**self.source.provenance(),
                "split": {"n_train": len(s["train"][1]), "n_val": len(s["val"][1]), "n_test": len(s["test"][1]),
                          "val_size": hp.val_size, "split_seed": hp.split_seed,
                          "train_limit": hp.train_limit, "test_limit": hp.test_limit},
                "augment": "pad-4 random crop + horizontal flip" if hp.augment else "none",
                "loader": self.loader_kind, "device": str(self.resident_device()) if self.loader_kind == "resident"
                else "cpu", "batch_size": hp.batch_size, "eval_batch_size": hp.eval_batch_size,
                "drop_last": hp.drop_last, "seed": hp.seed}
