"""``ResidentLoader``: batches from a uint8 image set held whole on one device, stateful for exact resume.

The images are moved to the device once; every batch is a gather + pad-4 crop + flip +
normalisation on that device, so a GPU run makes no host round trip per batch. The epoch's order
and augmentation parameters come from a generator seeded by ``(seed, epoch)`` (drawn on the CPU
and copied once per epoch, so a CPU and a GPU loader give the same batches). Because every epoch's
randomness is a function of its coordinates, ``state_dict()`` = ``(epoch, position, seed)`` is the
complete RNG state: a loader that loads it yields exactly the batches an uninterrupted run would.

Lightning (2.x) saves ``state_dict()`` of stateful train loaders in checkpoints and restores it
before iterating again on resume; it also calls ``loader.sampler.set_epoch(epoch)`` at each epoch
start, which this loader (its own ``sampler``) uses to stay in step with the trainer's epoch count.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch

from ._seeding import seeded_generator
from .augment import CIFAR_MEAN, CIFAR_STD, PADDING, crop_flip, crop_flip_params, normalize
from .source import check_images_labels

_STATE_KEYS = ("epoch", "position", "seed", "num_examples", "batch_size")


class ResidentLoader:
    """Iterable of ``(x, y)`` batches: ``x`` float32 normalised ``(B, C, H, W)``, ``y`` int64, on ``device``.

    Args:
        images: ``(N, C, H, W)`` uint8 images (any device; copied to ``device`` once).
        labels: ``(N,)`` int64 labels.
        batch_size: examples per batch.
        shuffle: draw a new seeded order every epoch (else dataset order).
        augment: pad-``padding`` random crop + horizontal flip per image.
        drop_last: drop the last incomplete batch (fixed shapes, e.g. for CUDA graphs).
        seed: seed of the order and augmentation streams.
        device: where data and batches live (default: the images' device).
        num_classes: labels must lie in ``0..num_classes-1`` (default: ``max(labels) + 1``).
        padding: crop padding (4 in He et al. 2016).
        mean, std: normalisation statistics of ``x / 255``.
        shard, num_shards: under data parallelism, rank ``shard`` takes every ``num_shards``-th
            example of each epoch's order.
        even_shards: trim the shards so that all ranks see equally many examples (training: the
            ranks step together); ``False`` keeps every example in exactly one shard, shards then
            differing by at most one (evaluation: sums over ranks cover the set once).
        restart: every pass starts at the first batch of the same epoch, whatever the previous pass
            read (evaluation loaders: Lightning's sanity check reads a few validation batches and
            stops; the first real validation must still see them all).
    """

    batch_sampler = None  # not a torch DataLoader: there is no batch sampler to inspect

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128, *,
                 shuffle: bool = False, augment: bool = False, drop_last: bool = False, seed: int = 0,
                 device: torch.device | str | None = None, num_classes: int | None = None,
                 padding: int = PADDING, mean: tuple[float, ...] = CIFAR_MEAN,
                 std: tuple[float, ...] = CIFAR_STD, shard: int = 0, num_shards: int = 1,
                 even_shards: bool = True, restart: bool = False):
        if num_classes is None and isinstance(labels, torch.Tensor) and labels.numel():
            num_classes = int(labels.max()) + 1
        check_images_labels(images, labels, num_classes or 1, "loader", image_shape=None)
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size}")
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in 0..num_shards-1; got shard={shard}, num_shards={num_shards}")
        self.device = torch.device(device) if device is not None else images.device
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size, self.shuffle, self.augment, self.drop_last = batch_size, shuffle, augment, drop_last
        self.seed, self.padding, self.mean, self.std = seed, padding, tuple(mean), tuple(std)
        self.shard, self.num_shards, self.restart = shard, num_shards, restart
        self.examples_per_epoch = (len(images) // num_shards if even_shards
                                   else len(range(shard, len(images), num_shards)))
        if self.examples_per_epoch == 0 or len(self) == 0:
            raise ValueError(f"{len(images)} examples give no batch of {batch_size} "
                             f"(drop_last={drop_last}, num_shards={num_shards})")
        self._epoch, self._position, self._live = 0, 0, False

    def __len__(self) -> int:
        m, b = self.examples_per_epoch, self.batch_size
        return m // b if self.drop_last else math.ceil(m / b)

    @property
    def epoch(self) -> int:
        """Epoch the next batch comes from."""
        return self._epoch

    @property
    def position(self) -> int:
        """Batches of the current epoch already yielded."""
        return self._position

    @property
    def sampler(self) -> "ResidentLoader":
        """The loader is its own sampler: Lightning calls ``sampler.set_epoch`` on it."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` the current one; a different epoch starts at its first batch."""
        if epoch != self._epoch:
            self._epoch, self._position = int(epoch), 0
        self._live = False

    def epoch_plan(self, epoch: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Example order and per-position ``(dy, dx, flip)`` crop parameters of ``epoch``, on the device."""
        g = seeded_generator(self.seed, "resident-loader", epoch)
        n = len(self.images)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if self.num_shards > 1:
            order = order[self.shard::self.num_shards][:self.examples_per_epoch]
        params = crop_flip_params(len(order), g, self.padding) if self.augment else None
        cuda = self.device.type == "cuda"

        def put(t: torch.Tensor) -> torch.Tensor:
            return (t.pin_memory() if cuda else t).to(self.device, non_blocking=True)

        return put(order), None if params is None else tuple(put(t) for t in params)

    def batch(self, order: torch.Tensor, params: tuple[torch.Tensor, ...] | None, b: int):
        """Batch ``b`` of an epoch plan: gather, augment and normalise on the device."""
        sl = slice(b * self.batch_size, min((b + 1) * self.batch_size, len(order)))
        idx = order[sl]
        x = self.images[idx]
        if params is not None:
            dy, dx, flip = params
            x = crop_flip(x, dy[sl], dx[sl], flip[sl], self.padding)
        return normalize(x, self.mean, self.std), self.labels[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.restart:
            self._position, self._live = 0, False
        if self._live:  # the previous pass was abandoned mid-epoch: like a DataLoader, start the next epoch
            self._epoch, self._position = self._epoch + 1, 0
        self._live = True
        epoch = self._epoch
        order, params = self.epoch_plan(epoch)
        for b in range(self._position, len(self)):
            out = self.batch(order, params, b)
            self._position = b + 1
            yield out
        self._live = False
        self._epoch, self._position = (epoch if self.restart else epoch + 1), 0

    def state_dict(self) -> dict[str, Any]:
        """Epoch, batches already yielded in it, and the seed that fixes every epoch's order and crops."""
        epoch, position = self._epoch, self._position
        if position >= len(self):  # the epoch's last batch is out: the next one starts the next epoch
            epoch, position = epoch + 1, 0
        return {"epoch": epoch, "position": position, "seed": self.seed,
                "num_examples": len(self.images), "batch_size": self.batch_size,
                "shuffle": self.shuffle, "augment": self.augment, "drop_last": self.drop_last,
                "num_shards": self.num_shards, "shard": self.shard}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``: the next iteration continues at the saved batch.

        Raises:
            ValueError: the state belongs to a different data size or batch size, or is incomplete.
        """
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing}; expected keys {list(_STATE_KEYS)}")
        for key, mine in (("num_examples", len(self.images)), ("batch_size", self.batch_size)):
            if int(state[key]) != mine:
                raise ValueError(f"loader state was saved with {key}={state[key]} but this loader has "
                                 f"{key}={mine}: resuming would not reproduce the original batches")
        if not 0 <= int(state["position"]) <= len(self):
            raise ValueError(f"loader state position {state['position']} outside 0..{len(self)}")
        self.seed = int(state["seed"])
        self._epoch, self._position, self._live = int(state["epoch"]), int(state["position"]), False

    def __repr__(self) -> str:
        return (f"ResidentLoader(n={len(self.images)}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"augment={self.augment}, device={self.device}, epoch={self._epoch}, position={self._position})")
