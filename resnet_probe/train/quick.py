"""``train_quick``: a short, CPU-friendly training run through the same LightningModule and Trainer.

Used by the studies' quick scale and by the test suite. It trains on a seeded subset of the
training split with the ``fast`` (one-cycle) recipe, validates each epoch on a held-out part of
the training set, and returns the trained module with its final metrics. No progress bar, no
logger and no checkpoints unless ``out_dir`` is given. On a CPU a run is deterministic for a seed.

Measured (2 idle CPU cores, 2 torch threads, JPEG pack, defaults: batch 32, peak lr 0.05):
residual-20 on 5,000 images for 3 epochs reaches 48.3 % validation accuracy (1,000 held-out
images) in 47 s; 49.5-51.0 % for other seeds / one thread. Batch 128 at lr 0.2 gets ~43 %.
"""
from __future__ import annotations

import logging
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.warnings import PossibleUserWarning

from ..data import CifarDataModule
from .module import CifarClassifier

QUICK_BATCH_SIZE = 32       # images a step: a few short epochs learn more from more, smaller steps
QUICK_LR_PER_IMAGE = 0.2 / 128  # one-cycle peak lr per image of batch (linear scaling): 0.05 at 32


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-run banners (GPU available, tips, summaries) and its sizing hints."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=PossibleUserWarning)
            warnings.filterwarnings("ignore", message=".*but have no logger configured.*")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def train_quick(family: str = "residual", depth: int = 20, *, data: str | CifarDataModule = "auto",
                train_limit: int | None = 5000, val_size: int = 1000, epochs: int = 3,
                batch_size: int = QUICK_BATCH_SIZE, seed: int = 0, width: int = 1,
                out_dir: str | Path | None = None, lr: float | None = None,
                option: str = "A", gate_bias: float | None = None, recipe: str = "fast",
                augment: bool = False, **module_kwargs: Any) -> tuple[CifarClassifier, dict[str, Any]]:
    """Train a CIFAR network briefly and return it with its final metrics.

    Args:
        family: ``plain``, ``residual``, ``highway`` or ``preact``.
        depth: 6n+2.
        data: a data spec for ``CifarDataModule`` (``auto``, ``pack``, ``synthetic``, a path) or a
            ready ``CifarDataModule`` (then ``train_limit``, ``val_size``, ``batch_size`` and
            ``augment`` are its own).
        train_limit: training images used (a seeded subset); ``None`` = all 45k.
        val_size: training images held out for validation.
        epochs: training epochs.
        batch_size: training batch size.
        seed: seeds the weights, the split and the batch order.
        width: filter multiplier.
        out_dir: if given, write ``metrics.csv``, ``hparams.yaml`` and ``checkpoints/last.ckpt`` there.
        lr: peak learning rate of the one-cycle schedule (``recipe="fast"``) or the paper's base lr;
            ``None`` = ``QUICK_LR_PER_IMAGE * batch size`` (0.05 at 32, 0.2 at 128).
        option: shortcut option ``A`` / ``B`` / ``C``.
        gate_bias: highway gate bias (``None`` = by depth).
        recipe: ``fast`` (default) or ``paper``.
        augment: pad-4 crop + flip; off by default because a few epochs learn faster without it.
        **module_kwargs: further ``CifarClassifier`` hyperparameters (``weight_decay``, ``compile``...).

    Returns:
        ``(module, metrics)``: ``metrics`` has ``train_loss``, ``train_error``, ``val_loss``,
        ``val_error``, ``val_accuracy``, ``steps``, ``epochs``, ``seconds``, ``data`` (the source's
        name) and ``synthetic``.
    """
    if isinstance(data, CifarDataModule):
        dm = data
    else:
        dm = CifarDataModule(data=data, batch_size=batch_size, val_size=val_size, split_seed=seed,
                             train_limit=train_limit, augment=augment, seed=seed)
    if lr is None:
        lr = QUICK_LR_PER_IMAGE * dm.hparams.batch_size
    model = CifarClassifier(family, depth, option=option, width=width, gate_bias=gate_bias, recipe=recipe,
                            lr=lr, epochs=epochs, seed=seed, **module_kwargs)
    cuda = torch.cuda.is_available()
    out = Path(out_dir) if out_dir is not None else None
    callbacks = [] if out is None else [ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0)]
    with quiet_lightning():
        trainer = pl.Trainer(
            accelerator="auto", devices=1, precision="bf16-mixed" if cuda else "32-true",
            max_epochs=epochs, logger=False if out is None else CSVLogger(out, name="", version=""),
            callbacks=callbacks, enable_checkpointing=out is not None, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0,
            log_every_n_steps=model.hparams.log_every_n_steps)
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        seconds = time.perf_counter() - start
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()
                               if k in ("train_loss", "train_error", "val_loss", "val_error")}
    if "val_error" in metrics:
        metrics["val_accuracy"] = 1.0 - metrics["val_error"]
    metrics.update(steps=trainer.global_step, epochs=trainer.current_epoch, seconds=seconds,
                   data=dm.source.name, synthetic=bool(dm.source.synthetic))
    model.eval()
    return model, metrics
