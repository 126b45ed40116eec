"""``resnet-probe fit | validate | test``: LightningCLI over ``CifarClassifier`` + ``CifarDataModule``.

Every run writes one folder: ``config.yaml`` (the resolved configuration, by Lightning's
``SaveConfigCallback``), ``metrics.csv`` + ``hparams.yaml`` (CSVLogger) and ``checkpoints/`` with
``last.ckpt``, refreshed every ``--checkpoint_every_n_steps`` optimizer steps inside an epoch (see
``ResumeCheckpoint``) and when training ends.
The default folder ``runs/train/<family><depth>-<option>-s<seed>-<time>[-k]`` is created
exclusively, so two runs started in the same second get two folders. A ``--run_dir`` that already
holds files is refused before anything is written, unless the run resumes into it.

Resume: ``resnet-probe fit --run_dir RUN --ckpt_path last`` (or ``--ckpt_path RUN/checkpoints/X.ckpt``,
whose run folder is then continued); ``last`` with no ``last.ckpt`` in the run's checkpoint folder
is an error naming the folder. The model's hyperparameters come back from the checkpoint; give the
same data options as the original run (or ``--config RUN/config.yaml``). Each checkpoint records how
many ``metrics.csv`` rows the run had logged when it was saved; the resumed run keeps exactly those
rows and logs the rest again, so its ``metrics.csv`` equals an uninterrupted run's.

The training length is set on the model (``--model.epochs`` / ``--model.max_steps``; the paper
recipe defaults to 64k iterations) and linked into the Trainer, as is ``--model.log_every_n_steps``.
On CUDA the default precision is ``bf16-mixed``.
"""
from __future__ import annotations

import csv
import itertools
import os
import re
import time
from pathlib import Path
from typing import Optional

import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, ProgressBar, TQDMProgressBar
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import rank_zero_only

from ..data import CifarDataModule
from .module import CifarClassifier
from .recipes import training_length

RUN_ROOT = Path("runs") / "train"
RUN_DIR_ENV = "RESNET_PROBE_RUN_DIR"  # passes rank 0's run folder to processes launched for DDP
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")  # the data module has no predict split
# set by launchers (torchrun, Lightning's DDP launcher, SLURM) in every process they start for a rank
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")  # --ckpt_path names Lightning resolves itself
METRICS_ROWS = "metrics_rows"  # checkpoint key: metrics.csv rows logged when the checkpoint was saved


class RunDirError(ValueError):
    """A run folder cannot be used as asked (it holds another run, or has no checkpoint to resume)."""


def default_precision() -> str:
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def _max_epochs(recipe: str, epochs: Optional[int], max_steps: Optional[int]) -> int:
    return training_length(recipe, epochs, max_steps)["max_epochs"]


def _max_steps(recipe: str, epochs: Optional[int], max_steps: Optional[int]) -> int:
    return training_length(recipe, epochs, max_steps)["max_steps"]


def new_run_dir(name: str, root: Path = RUN_ROOT) -> Path:
    """Create and return a new run folder ``root/name-YYYYmmdd-HHMMSS[-k]``.

    The folder is made with ``mkdir`` without ``exist_ok``: when another process took a name first,
    the next ``-k`` is tried, so two runs started in the same second never share a folder.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for k in itertools.count():
        path = root / (f"{name}-{stamp}" + (f"-{k}" if k else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _launched_for_a_rank() -> bool:
    """Whether a launcher started this process for a rank other than global rank 0."""
    return any(os.environ.get(v, "0") != "0" for v in RANK_VARIABLES)


def resolve_run_dir(run_dir: Optional[str], subcommand: str, ckpt_path: Optional[str], name: str) -> Path:
    """The folder a run writes to.

    An explicit ``run_dir`` wins; processes Lightning launches for DDP reuse rank 0's folder; a fit
    resumed from a checkpoint file inside ``RUN/checkpoints/`` continues ``RUN``; otherwise a new
    folder under ``runs/train/``, created here (under ``torchrun``, pass ``--run_dir`` so all ranks
    agree; only rank 0 creates a default folder).

    Raises:
        RunDirError: ``--ckpt_path last`` without ``--run_dir`` (there is no run to find it in).
    """
    if run_dir:
        return Path(run_dir)
    if os.environ.get(RUN_DIR_ENV) and "LOCAL_RANK" in os.environ:  # a process Lightning launched for DDP
        return Path(os.environ[RUN_DIR_ENV])
    if ckpt_path in LIGHTNING_CKPT_NAMES:
        raise RunDirError(f"--ckpt_path {ckpt_path} needs --run_dir RUN: the run folder whose "
                          "checkpoints/ to resume from")
    if subcommand == "fit" and ckpt_path and Path(ckpt_path).parent.name == "checkpoints":
        return Path(ckpt_path).resolve().parent.parent
    suffix = "" if subcommand == "fit" else f"-{subcommand}"
    if _launched_for_a_rank():
        return RUN_ROOT / f"{name}{suffix}-{time.strftime('%Y%m%d-%H%M%S')}"
    return new_run_dir(name + suffix)


def check_run_dir_free(run_dir: Path, subcommand: str) -> None:
    """Raise ``RunDirError`` if ``run_dir`` exists and is not an empty folder (a new run would overwrite it).

    Called before anything is written: Lightning's CSV logger deletes the ``metrics.csv`` of the
    folder it logs to, and the checkpoints would be replaced.
    """
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunDirError(f"--run_dir {run_dir} is a file, not a folder; give a new folder")
    held = sorted(p.name for p in run_dir.iterdir())
    if held:
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        resume = " resume it with --ckpt_path last," if subcommand == "fit" else ""
        raise RunDirError(f"--run_dir {run_dir} already holds a run ({shown}); nothing was written:{resume} "
                          "give a new --run_dir, or leave it out for a new folder under runs/train/")


def last_checkpoint(trainer, run_dir: Path) -> Path:
    """The checkpoint ``--ckpt_path last`` resumes: the newest ``last*.ckpt`` of the checkpoint folders.

    Lightning looks in the folder of each ``ModelCheckpoint`` (``RUN/checkpoints`` when it has none)
    and, when it finds nothing, warns and trains from scratch; here that is an error naming the folder.

    Raises:
        RunDirError: no such checkpoint (an empty, new or mistyped ``--run_dir``).
    """
    folders = sorted({Path(cb.dirpath) if cb.dirpath else run_dir / "checkpoints"
                      for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)})
    pattern = re.compile(rf"^{ModelCheckpoint.CHECKPOINT_NAME_LAST}(-\d+)?$")
    found = [p for folder in folders if folder.is_dir() for p in folder.iterdir()
             if p.suffix == ModelCheckpoint.FILE_EXTENSION and pattern.match(p.stem)]
    if not found:
        where = ", ".join(str(f) for f in folders) or f"{run_dir} (no checkpoint callback)"
        state = "does not exist" if not run_dir.exists() else "holds no last.ckpt"
        raise RunDirError(f"--ckpt_path last: run folder {run_dir} {state} (looked in {where}); "
                          "give the --run_dir of the run to resume, or --ckpt_path FILE.ckpt")
    return max(found, key=lambda p: p.stat().st_mtime)


def _resumed_rows(metrics_csv: Path, ckpt: Path) -> list[dict[str, str]]:
    """The rows of an earlier ``metrics.csv`` that were logged before the checkpoint was saved.

    The checkpoint records that number (``METRICS_ROWS``); later rows are logged again by the resumed
    run. Checkpoints without it keep the rows up to their step.
    """
    if not metrics_csv.is_file() or not ckpt.is_file():
        return []
    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if METRICS_ROWS in state:
        return rows[:state[METRICS_ROWS]]
    step = state.get("global_step", 0)
    return [row for row in rows if row.get("step", "").isdigit() and int(row["step"]) <= step]


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` that counts the rows it has logged, the earlier run's rows kept on resume included."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows_logged = 0

    @rank_zero_only
    def keep_rows(self, rows: list[dict[str, str]]) -> None:
        """Start from an earlier run's rows, written back at once (the CSV writer has just removed the file)."""
        self.experiment.metrics.extend(rows)
        self.rows_logged += len(rows)
        self.experiment.save()

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics(metrics, step)
        self.rows_logged += 1


class MetricsRowsInCheckpoint(Callback):
    """Saves the number of ``metrics.csv`` rows logged so far in every checkpoint (``METRICS_ROWS``)."""

    def __init__(self, logger: RunCSVLogger):
        self.logger = logger

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[METRICS_ROWS] = self.logger.rows_logged


class ResumeCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` every N optimizer steps that skips the last batch of an epoch, and saves at the end.

    Lightning (2.6) resumes exactly only from a checkpoint taken inside an epoch. From one taken at an
    epoch's last batch it skips that epoch's validation and the next ``on_train_epoch_start``; from
    one taken at the epoch's end it starts the next epoch with the sampler of the epoch after it and
    logs the epoch-end rows one step late. So ``last.ckpt`` is refreshed only inside epochs (a
    multiple of N that ends an epoch waits for the next multiple), and once more when training ends,
    so that it holds the final weights; a run killed at an epoch boundary resumes from the last
    checkpoint taken inside an epoch and redoes the steps since.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and trainer.global_step > 0:
            name = self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION
            trainer.save_checkpoint(Path(self.dirpath) / name)


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
        local = ckpt_path and ckpt_path not in LIGHTNING_CKPT_NAMES and "://" not in ckpt_path  # not s3:// etc.
        if local and not Path(ckpt_path).is_file():
            raise RunDirError(f"--ckpt_path {ckpt_path} is not a file; give a checkpoint file or one of "
                              f"{', '.join(LIGHTNING_CKPT_NAMES)}")
        run_dir = resolve_run_dir(cfg.run_dir, self.subcommand, ckpt_path,
                                  f"{m.family}{m.depth}-{m.option}-s{m.seed}")
        resuming = self.subcommand == "fit" and bool(ckpt_path)
        if cfg.run_dir and not resuming and not _launched_for_a_rank():
            check_run_dir_free(run_dir, self.subcommand)
        os.environ[RUN_DIR_ENV] = str(run_dir)
        self.save_config_kwargs["overwrite"] = resuming
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_cfg.get("callbacks") or [])

        logger = None
        if trainer_cfg.get("logger") in (None, True):
            logger = RunCSVLogger(save_dir=str(run_dir.parent), name="", version=run_dir.name)
            kwargs["logger"] = logger
            callbacks.append(MetricsRowsInCheckpoint(logger))
        if (self.subcommand == "fit" and trainer_cfg.get("enable_checkpointing") is not False
                and not any(isinstance(c, ModelCheckpoint) for c in callbacks)):
            callbacks.append(ResumeCheckpoint(dirpath=run_dir / "checkpoints", filename="{epoch}-{step}",
                                              save_last=True, save_top_k=1,
                                              every_n_train_steps=cfg.checkpoint_every_n_steps,
                                              enable_version_counter=False))
        if (trainer_cfg.get("enable_progress_bar") is not False
                and not any(isinstance(c, ProgressBar) for c in callbacks)):
            # refreshing the bar reads logged values back from the device: on CUDA only every N steps
            refresh = m.log_every_n_steps if torch.cuda.is_available() else 1
            callbacks.append(TQDMProgressBar(refresh_rate=refresh))
        kwargs["callbacks"] = callbacks
        trainer = super().instantiate_trainer(**kwargs)
        if resuming and (ckpt_path == "last" or ckpt_path not in LIGHTNING_CKPT_NAMES):
            ckpt = last_checkpoint(trainer, run_dir) if ckpt_path == "last" else Path(ckpt_path)
            if logger is not None:
                logger.keep_rows(_resumed_rows(run_dir / "metrics.csv", ckpt))
        return trainer


def cli_main(args: list[str] | None = None, run: bool = True) -> ResnetProbeCLI:
    """Run ``LightningCLI(CifarClassifier, CifarDataModule)`` on ``args`` (default ``sys.argv[1:]``)."""
    return ResnetProbeCLI(
        CifarClassifier, CifarDataModule, args=args, run=run,
        seed_everything_default=0,
        trainer_defaults={"precision": default_precision()},
        parser_kwargs={"prog": "resnet-probe"},
    )
