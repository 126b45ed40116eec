"""``train_quick``: a short, CPU-friendly training run through the same LightningModule and Trainer.

Used by the studies' quick scale and by the test suite. It trains on a seeded subset of the
training split with the ``fast`` (one-cycle) recipe, validates each epoch on a held-out part of
the training set, and returns the trained module with its final metrics. No progress bar, no
logger and no checkpoints unless ``out_dir`` is given; the Trainer is ``train.fit``'s, like every
other. On a CPU a run is deterministic for a seed.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..data import CifarDataModule
from .fit import fit
from .module import CifarClassifier

QUICK_BATCH_SIZE = 32       # images a step: a few short epochs learn more from more, smaller steps
QUICK_LR_PER_IMAGE = 0.2 / 128  # one-cycle peak lr per image of batch (linear scaling): 0.05 at 32


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
    start = time.perf_counter()
    trainer = fit(model, dm, out_dir=out_dir, checkpoints=out_dir is not None, progress=False, max_epochs=epochs,
                  max_steps=-1, log_every_n_steps=model.hparams.log_every_n_steps)
    seconds = time.perf_counter() - start
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()
                               if k in ("train_loss", "train_error", "val_loss", "val_error")}
    if "val_error" in metrics:
        metrics["val_accuracy"] = 1.0 - metrics["val_error"]
    metrics.update(steps=trainer.global_step, epochs=trainer.current_epoch, seconds=seconds,
                   data=dm.source.name, synthetic=bool(dm.source.synthetic))
    model.eval()
    return model, metrics
