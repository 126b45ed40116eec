"""``make_trainer`` / ``fit``: the one place a Lightning ``Trainer`` is configured.

The command line (``resnet-probe fit``), the studies and ``train_quick`` all build their Trainer
here, so they train the same way: on CUDA in bf16 autocast (``precision="bf16-mixed"``), on the
CPU in float32; no sanity validation and no model summary; a CSV log (``metrics.csv``) in
``out_dir`` when one is given; a progress bar only where stderr is a terminal, refreshed on CUDA
every ``log_every_n_steps`` steps (each refresh reads logged values back from the device).
"""
from __future__ import annotations

import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.warnings import PossibleUserWarning

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU raises.

    Raises:
        ValueError: an unknown name, or ``cuda`` asked for where there is no GPU (naming the choices).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or str(name).startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError("device cuda asked for, but no CUDA GPU is available; use cpu or auto")
        return torch.device(name)
    raise ValueError(f"unknown device {name!r}; valid: {', '.join(DEVICES)}")


def default_precision(device: str | torch.device = "auto") -> str:
    """``bf16-mixed`` on a CUDA GPU that supports it, else ``32-true``."""
    cuda = resolve_device(str(device)).type == "cuda"
    return "bf16-mixed" if cuda and torch.cuda.is_bf16_supported() else "32-true"


def progress_wanted() -> bool:
    """Whether a progress bar is useful: stderr is a terminal."""
    return sys.stderr.isatty()


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


def make_trainer(device: str = "auto", *, out_dir: str | Path | None = None, checkpoints: bool = False,
                 progress: bool | None = None, callbacks: Sequence[pl.Callback] = (),
                 log_every_n_steps: int = 50, **options: Any) -> pl.Trainer:
    """A Trainer with the project's defaults; ``options`` (any ``pl.Trainer`` argument) win over them.

    Args:
        device: ``auto``, ``cpu`` or ``cuda``; sets the accelerator (one device) and the precision.
        out_dir: folder of the CSV log (``metrics.csv``) and, with ``checkpoints``, ``checkpoints/last.ckpt``;
            ``None``: no log, no checkpoint.
        checkpoints: keep ``out_dir/checkpoints/last.ckpt`` (refreshed at every epoch end).
        progress: show a progress bar; ``None``: where stderr is a terminal.
        callbacks: further callbacks.
        log_every_n_steps: optimizer steps between logged training points (and progress-bar refreshes
            on CUDA).
        **options: other ``pl.Trainer`` arguments (``max_epochs``, ``max_steps``, ``val_check_interval``...).
    """
    dev = resolve_device(device) if device in DEVICES else None
    callbacks = list(callbacks)
    if checkpoints and out_dir is not None and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        callbacks.append(ModelCheckpoint(dirpath=Path(out_dir) / "checkpoints", save_last=True, save_top_k=0))
    show = progress_wanted() if progress is None else progress
    if show and not any(isinstance(c, ProgressBar) for c in callbacks):
        cuda = dev is not None and dev.type == "cuda"
        callbacks.append(TQDMProgressBar(refresh_rate=log_every_n_steps if cuda else 1))
    defaults: dict[str, Any] = dict(
        accelerator="gpu" if dev is not None and dev.type == "cuda" else "cpu", devices=1,
        precision=default_precision(device) if dev is not None else "32-true",
        logger=CSVLogger(str(out_dir), name="", version="") if out_dir is not None else False,
        enable_checkpointing=checkpoints and out_dir is not None, enable_progress_bar=show,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=log_every_n_steps)
    return pl.Trainer(**{**defaults, **options, "callbacks": callbacks})


def fit(module: pl.LightningModule, datamodule: pl.LightningDataModule | None = None, *,
        train_dataloaders: Any = None, val_dataloaders: Any = None, ckpt_path: str | None = None,
        **trainer_options: Any) -> pl.Trainer:
    """Train ``module`` with ``make_trainer(**trainer_options)`` (quietly) and return the Trainer.

    The training length is the module's recipe (``module.trainer_limits``) unless ``max_epochs`` /
    ``max_steps`` are given.
    """
    limits = getattr(module, "trainer_limits", {})
    with quiet_lightning():
        trainer = make_trainer(**{**limits, **trainer_options})
        trainer.fit(module, datamodule=datamodule, train_dataloaders=train_dataloaders,
                    val_dataloaders=val_dataloaders, ckpt_path=ckpt_path)
    return trainer
