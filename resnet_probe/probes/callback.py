"""``ProbeCallback``: response, gradient and refinement probes during Lightning training, written as tidy CSV.

The callback opens a probe session on ``pl_module.model`` in ``setup`` and closes it in
``teardown`` and ``on_exception``. Every ``every_n_epochs`` epochs it records the response
statistics over the whole validation set; every ``every_n_steps`` optimisation steps it records the
per-block gradient norms (just before the optimizer step, after gradient accumulation and the DDP
all-reduce); every ``refinement_every_n_steps`` steps it records, over that step's training batch,
the refinement statistics (``RefinementProbe``: per block the cosine between the branch output and the
negative gradient of the training loss there, and ``||F(x)|| / ||x||``). Refinement needs a backward
pass, which Lightning's validation loop (run under ``torch.inference_mode``) does not make: it is
recorded on training steps, with the module's training loss and BN in train mode, so each example's
gradient also carries the other examples of its batch through BN's batch statistics (the
``refinement`` study measures eval-mode nets with per-example losses). Under DDP the sums and counts
are all-reduced over the ranks before any division, and only global rank 0 writes. Tables (rewritten atomically after each record) go into the run folder
(``trainer.log_dir`` unless ``out_dir`` is given):

- ``probe_responses.csv``: one row per (site, metric, epoch);
- ``probe_gradients.csv``: one row per (block, metric, step);
- ``probe_refinement.csv``: one row per (block, metric, step).

Columns: run, seed, model, site, metric, value, step, epoch, then kind, stage, block,
downsampling, path (see ``ProbeSession.table`` for the metrics). On a ``GroupedClassifier`` (S
seeds side by side) every row is one model's, and its ``seed`` column is that model's seed.

Under DDP the validation sampler may repeat a few examples to give every rank the same number; use
a validation set whose size divides evenly for exact single-process equality.

Probes and compiled networks (``CifarClassifier`` runs its network through ``torch.compile`` on
CUDA, held beside ``pl_module.model``, which stays eager; a network compiled in place works the
same): the session is opened in ``setup`` on ``pl_module.model`` and disarmed at once, so the network
carries nothing of the probes while it does not record.

- A step that records gradient norms opens every block's gradient tap
  (``resnet_probe.models.gradient_tap``) and runs the compiled network: in a CIFAR block the tap is an
  operation of the block's own graph, so the network is compiled once with the taps and once
  without, each variant runs whole, without graph breaks, and the taps' sinks keep their addresses
  from one recording step to the next, as CUDA graphs need. A block whose tap is a hook
  (torchvision's, or one whose slot another session holds) is not seen by compiled code: such a
  step runs eagerly, under ``torch.compiler.set_stance("force_eager")``.
- A validation epoch that records responses attaches the response hooks and runs eagerly the same way;
  so does a training step that records refinement (its taps are hooks on the branch outputs).

The recorded values equal an eager run's. No private attribute of a torch object is written.
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
import torch

from ..atomic import atomic_write_csv
from .session import ProbeSession, probe

CSV_COLUMNS = ("run", "seed", "model", "site", "metric", "value", "step", "epoch",
               "kind", "stage", "block", "downsampling", "path")
RESPONSES_CSV = "probe_responses.csv"
GRADIENTS_CSV = "probe_gradients.csv"
REFINEMENT_CSV = "probe_refinement.csv"


class ProbeCallback(pl.Callback):
    """Record response statistics on the validation set and gradient norms during training.

    Args:
        sites: site names or patterns for the response probe (see ``resnet_probe.probes.probe``).
        every_n_epochs: record responses at the validation of every n-th epoch (0 = never).
        every_n_steps: record gradient norms every n-th optimisation step (0 = never).
        refinement_every_n_steps: record refinement statistics every n-th optimisation step (0 = never).
        out_dir: folder for the CSV tables; default ``trainer.log_dir``.
        run: run name for the ``run`` column; default the name of the output folder.
        model_name: ``model`` column; default ``{family}-{depth}`` from the module's hparams.
    """

    def __init__(self, sites="*", every_n_epochs: int = 1, every_n_steps: int = 50,
                 out_dir: str | Path | None = None, run: str | None = None, model_name: str | None = None,
                 refinement_every_n_steps: int = 0):
        for name, v in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps),
                        ("refinement_every_n_steps", refinement_every_n_steps)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer; got {v!r}")
        if every_n_epochs == 0 and every_n_steps == 0 and refinement_every_n_steps == 0:
            raise ValueError("nothing to record: every_n_epochs, every_n_steps and refinement_every_n_steps are all 0")
        self.sites = sites
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.refinement_every_n_steps = refinement_every_n_steps
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.run = run
        self.model_name = model_name
        self.session: ProbeSession | None = None
        self.response_rows: list[dict] = []
        self.gradient_rows: list[dict] = []
        self.refinement_rows: list[dict] = []
        self._recording_val = False
        self._eager: ExitStack | None = None  # holds the "force_eager" stance while recording eagerly
        self._folder: Path | None = None

    # -- lifetime -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()
        model = self._model(pl_module)
        metrics = ((("response",) if self.every_n_epochs else ()) + (("gradient",) if self.every_n_steps else ())
                   + (("refinement",) if self.refinement_every_n_steps else ()))
        self.session = probe(model, sites=self.sites, metrics=metrics)
        self.session.arm(response=False, gradient=False, refinement=False)
        if trainer is not None:
            # trainer.log_dir is a collective under DDP: resolve it here, where every rank runs
            self._folder = self.out_dir or Path(trainer.log_dir or trainer.default_root_dir)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        self._end_eager()
        if self.session is not None:
            self.session.close()
            self.session = None

    @staticmethod
    def _model(pl_module: pl.LightningModule):
        model = getattr(pl_module, "model", None)
        if model is None:
            raise AttributeError(f"{type(pl_module).__name__} has no `.model`; ProbeCallback measures "
                                 "the network at `pl_module.model`")
        return model

    def _run_eagerly(self) -> None:
        """Run compiled code eagerly, so that the probe hooks run, until ``_end_eager``."""
        if self._eager is None:
            self._eager = ExitStack()
            self._eager.enter_context(torch.compiler.set_stance("force_eager"))

    def _end_eager(self) -> None:
        if self._eager is not None:
            self._eager.close()
            self._eager = None

    # -- responses on the validation set ------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.session is None or self.session.response is None or trainer.sanity_checking:
            return
        fitting = trainer.state.fn == "fit"
        if fitting and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._run_eagerly()
        self.session.response.reset()
        self.session.arm(response=True)
        self._recording_val = True

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._recording_val:
            return
        self._recording_val = False
        self.session.arm(response=False)
        self._end_eager()
        self.session.all_reduce(metrics=("response",))
        self.session.check_finite()
        rows = self.session.response.rows()
        self.session.response.reset()
        self.response_rows += [self._tidy(r, trainer, pl_module) for r in rows]
        self._write(trainer, RESPONSES_CSV, self.response_rows)

    # -- gradient norms during training --------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.session is None:
            return
        if self.session.refinement is not None and trainer.global_step % self.refinement_every_n_steps == 0:
            self.session.arm(refinement=True)
            self._run_eagerly()
        if self.session.gradient is None:
            return
        if trainer.global_step % self.every_n_steps == 0:
            self.session.arm(gradient=True)
            if not all(self.session.gradient.tapped):  # hooks: compiled code runs without them
                self._run_eagerly()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self.session is not None and self.session.armed.get("gradient"):
            self.session.record_gradients(step=trainer.global_step)
            self.session.arm(gradient=False)
            self._end_eager()
        if self.session is not None and self.session.armed.get("refinement"):
            self.session.record_refinement(step=trainer.global_step)
            self.session.arm(refinement=False)
            self._end_eager()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_steps(trainer, pl_module, "gradient", self.gradient_rows, GRADIENTS_CSV)
        self._write_steps(trainer, pl_module, "refinement", self.refinement_rows, REFINEMENT_CSV)

    def _write_steps(self, trainer: pl.Trainer, pl_module: pl.LightningModule, metric: str, kept: list[dict],
                     filename: str) -> None:
        """Reduce the steps ``metric`` recorded this epoch over the ranks, add their rows to ``kept`` and
        rewrite ``filename``."""
        part = None if self.session is None else getattr(self.session, metric)
        if part is None or not part.history:  # the same steps are recorded on every rank
            return
        self.session.all_reduce(metrics=(metric,))
        self.session.check_finite()
        rows = part.rows()
        part.reset()
        if rows:
            kept += [self._tidy(row, trainer, pl_module) for row in rows]
            self._write(trainer, filename, kept)

    # -- output -------------------------------------------------------------------------------
    @property
    def folder(self) -> Path | None:
        """Where the tables go: ``out_dir`` or the trainer's log folder (known after ``setup``)."""
        return self._folder

    def _tidy(self, row: dict, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        hp = getattr(pl_module, "hparams", {}) or {}
        model = self.model_name or (f"{hp['family']}-{hp['depth']}" if "family" in hp and "depth" in hp
                                    else type(pl_module.model).__name__)
        step = row.get("step")
        seed = hp["seeds"][row["model_index"]] if "model_index" in row else hp.get("seed")
        return {"run": self.run or self.folder.name, "seed": seed, "model": model,
                "site": row["site"], "metric": row["metric"], "value": row["value"],
                "step": trainer.global_step if step is None else step, "epoch": trainer.current_epoch,
                "kind": row["kind"], "stage": row["stage"], "block": row["block"],
                "downsampling": row["downsampling"], "path": row["path"]}

    def _write(self, trainer: pl.Trainer, name: str, rows: list[dict]) -> None:
        if not trainer.is_global_zero:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_csv(pd.DataFrame(rows, columns=list(CSV_COLUMNS)), self.folder / name)
