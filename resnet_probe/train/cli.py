"""``resnet-probe fit | validate | test``: LightningCLI over ``CifarClassifier`` + ``CifarDataModule``.

Every run writes one folder (default ``runs/train/<family><depth>-<option>-s<seed>-<time>``, never
reused unless asked): ``config.yaml`` (the resolved configuration, by Lightning's
``SaveConfigCallback``), ``metrics.csv`` + ``hparams.yaml`` (CSVLogger) and ``checkpoints/`` with
``last.ckpt``, refreshed every ``--checkpoint_every_n_steps`` optimizer steps and at every epoch end.

Resume: ``resnet-probe fit --run_dir RUN --ckpt_path last`` (or ``--ckpt_path RUN/checkpoints/X.ckpt``,
whose run folder is then continued). The model's hyperparameters come back from the checkpoint;
give the same data options as the original run (or ``--config RUN/config.yaml``). The metrics
logged up to the checkpoint are kept in ``metrics.csv``; the resumed run appends to them.

The training length is set on the model (``--model.epochs`` / ``--model.max_steps``; the paper
recipe defaults to 64k iterations) and linked into the Trainer, as is ``--model.log_every_n_steps``.
On CUDA the default precision is ``bf16-mixed``.
"""
from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Optional

import torch
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger

from ..data import CifarDataModule
from .module import CifarClassifier
from .recipes import training_length

RUN_ROOT = Path("runs") / "train"
RUN_DIR_ENV = "RESNET_PROBE_RUN_DIR"  # passes rank 0's run folder to processes launched for DDP
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")  # the data module has no predict split


def default_precision() -> str:
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def _max_epochs(recipe: str, epochs: Optional[int], max_steps: Optional[int]) -> int:
    return training_length(recipe, epochs, max_steps)["max_epochs"]


def _max_steps(recipe: str, epochs: Optional[int], max_steps: Optional[int]) -> int:
    return training_length(recipe, epochs, max_steps)["max_steps"]


def new_run_dir(name: str, root: Path = RUN_ROOT) -> Path:
    """A run folder under ``root`` that does not exist yet: ``name-YYYYmmdd-HHMMSS[-k]``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, k = root / f"{name}-{stamp}", 1
    while path.exists():
        path, k = root / f"{name}-{stamp}-{k}", k + 1
    return path


def resolve_run_dir(run_dir: Optional[str], subcommand: str, ckpt_path: Optional[str], name: str) -> Path:
    """The folder a run writes to.

    An explicit ``run_dir`` wins; processes Lightning launches for DDP reuse rank 0's folder; a fit
    resumed from a checkpoint file inside ``RUN/checkpoints/`` continues ``RUN``; otherwise a new
    folder under ``runs/train/`` (under ``torchrun``, pass ``--run_dir`` so all ranks agree).

    Raises:
        ValueError: ``--ckpt_path last`` without ``--run_dir`` (there is no run to find it in).
    """
    if run_dir:
        return Path(run_dir)
    if os.environ.get(RUN_DIR_ENV) and "LOCAL_RANK" in os.environ:  # a process Lightning launched for DDP
        return Path(os.environ[RUN_DIR_ENV])
    if ckpt_path in ("last", "best", "hpc", "registry"):
        raise ValueError(f"--ckpt_path {ckpt_path} needs --run_dir RUN: the run folder whose "
                         "checkpoints/ to resume from")
    if subcommand == "fit" and ckpt_path and Path(ckpt_path).parent.name == "checkpoints":
        return Path(ckpt_path).resolve().parent.parent
    suffix = "" if subcommand == "fit" else f"-{subcommand}"
    return new_run_dir(name + suffix)


def _resumed_rows(metrics_csv: Path, ckpt: Path) -> list[dict[str, str]]:
    """Rows of an earlier ``metrics.csv`` logged up to the checkpoint's step (later ones are redone)."""
    if not metrics_csv.is_file() or not ckpt.is_file():
        return []
    step = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0)
    with open(metrics_csv, newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("step", "").isdigit() and int(row["step"]) <= step]


class ResnetProbeCLI(LightningCLI):
    """LightningCLI with the project's run folders, checkpoints and linked training length."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in LIGHTNING_SUBCOMMANDS}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_dir", type=Optional[str], default=None,
                            help="run folder (default: a new runs/train/<family><depth>-<option>-s<seed>-<time>)")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=1000,
                            help="optimizer steps between refreshes of checkpoints/last.ckpt (for resume)")
        sources = ("model.recipe", "model.epochs", "model.max_steps")
        parser.link_arguments(sources, "trainer.max_epochs", compute_fn=_max_epochs)
        parser.link_arguments(sources, "trainer.max_steps", compute_fn=_max_steps)
        parser.link_arguments("model.log_every_n_steps", "trainer.log_every_n_steps")

    def instantiate_trainer(self, **kwargs):
        cfg = self.config[self.subcommand]
        m = cfg.model
        ckpt_path = cfg.get("ckpt_path")
        run_dir = resolve_run_dir(cfg.run_dir, self.subcommand, ckpt_path,
                                  f"{m.family}{m.depth}-{m.option}-s{m.seed}")
        os.environ[RUN_DIR_ENV] = str(run_dir)
        resuming = self.subcommand == "fit" and bool(ckpt_path)
        self.save_config_kwargs["overwrite"] = resuming
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_cfg.get("callbacks") or [])

        if trainer_cfg.get("logger") in (None, True):
            logger = CSVLogger(save_dir=str(run_dir.parent), name="", version=run_dir.name)
            if resuming:
                ckpt = run_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
                rows = _resumed_rows(run_dir / "metrics.csv", ckpt)
                if rows:
                    logger.experiment.metrics.extend(rows)  # written back with the resumed run's rows
            kwargs["logger"] = logger
        if (self.subcommand == "fit" and trainer_cfg.get("enable_checkpointing") is not False
                and not any(isinstance(c, ModelCheckpoint) for c in callbacks)):
            # Lightning takes step and epoch triggers only from separate callbacks; both refresh last.ckpt
            ckpt_dir = run_dir / "checkpoints"
            callbacks += [ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}-{step}", save_last=True, save_top_k=1,
                                          every_n_train_steps=cfg.checkpoint_every_n_steps,
                                          enable_version_counter=False),
                          ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}-{step}-epoch-end", save_last=True,
                                          save_top_k=1, every_n_epochs=1, enable_version_counter=False)]
        if (trainer_cfg.get("enable_progress_bar") is not False
                and not any(isinstance(c, ProgressBar) for c in callbacks)):
            # refreshing the bar reads logged values back from the device: on CUDA only every N steps
            refresh = m.log_every_n_steps if torch.cuda.is_available() else 1
            callbacks.append(TQDMProgressBar(refresh_rate=refresh))
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def cli_main(args: list[str] | None = None, run: bool = True) -> ResnetProbeCLI:
    """Run ``LightningCLI(CifarClassifier, CifarDataModule)`` on ``args`` (default ``sys.argv[1:]``)."""
    return ResnetProbeCLI(
        CifarClassifier, CifarDataModule, args=args, run=run,
        seed_everything_default=0,
        trainer_defaults={"precision": default_precision()},
        parser_kwargs={"prog": "resnet-probe"},
    )
