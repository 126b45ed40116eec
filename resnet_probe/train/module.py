"""``CifarClassifier``: the one LightningModule that trains every CIFAR family.

Its hyperparameters are primitives only (strings, numbers, booleans, ``None``), saved with
``save_hyperparameters()``, so ``CifarClassifier.load_from_checkpoint(path)`` rebuilds the network
from the file alone, also under ``torch.load(..., weights_only=True)``. The network is
``self.model`` (a ``resnet_probe.models.CifarNet``); probes and studies use ``pl_module.model``.

Metrics (cross-entropy and top-1 error, both per sample) are summed on the device during an epoch;
the host reads them only every ``log_every_n_steps`` optimizer steps and at epoch end, never per
step. Logged per epoch: ``train_loss``, ``train_error`` (running over the epoch's augmented
batches, in training mode), ``val_loss``, ``val_error`` and in ``test`` ``test_loss``,
``test_error``; every ``log_every_n_steps`` steps also ``train_loss_step`` / ``train_error_step``
(means over those steps) and ``lr``.

On CUDA the network runs channels_last and, with ``compile=True``, through ``torch.compile``; bf16
autocast comes from the Trainer (``precision="bf16-mixed"``). None of it is touched on a CPU.
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn

from ..models import CifarNet
from .recipes import PaperSchedule, build_optimization, check_recipe, training_length

STAGES = ("train", "val", "test")


class CifarClassifier(pl.LightningModule):
    """A plain / residual / highway / pre-activation CIFAR classifier and its training recipe.

    Args:
        family: ``plain``, ``residual``, ``highway`` or ``preact``.
        depth: 6n+2 weighted layers (20, 32, 44, 56, 110, ...).
        option: shortcut option at dimension changes, ``A``, ``B`` or ``C``.
        width: filter multiplier.
        gate_bias: initial highway gate bias; ``None`` = by depth (-1, -2, -3).
        num_classes: number of classes.
        recipe: ``paper`` or ``fast`` (see ``resnet_probe.train.recipes``).
        lr: initial (paper) or peak (fast) learning rate; ``None`` = the recipe's.
        momentum: SGD momentum; ``None`` = the recipe's (0.9).
        weight_decay: L2 weight decay; ``None`` = the recipe's (1e-4 paper, 5e-4 fast).
        nesterov: Nesterov momentum; ``None`` = the recipe's.
        epochs: training length in epochs (``None`` = by ``max_steps`` or the recipe).
        max_steps: training length in optimizer steps (paper default 64,000). These two set the
            Trainer's limits in the CLI and ``train_quick`` (``trainer_limits``); the schedule
            itself spans whatever the Trainer runs (``trainer.estimated_stepping_batches``).
        warmup: paper recipe: warm up at ``warmup_lr`` until the training error < ``warmup_until_error``;
            ``None`` = for depth >= 110.
        warmup_lr: warm-up learning rate (0.01).
        warmup_until_error: training error (fraction) that ends the warm-up (0.8).
        seed: seed of the weight initialisation.
        compile: compile the network with ``torch.compile`` on CUDA (ignored on CPU).
        log_every_n_steps: optimizer steps between host reads of the running training metrics
            (logging and the warm-up check).
    """

    def __init__(self, family: str = "residual", depth: int = 20, option: str = "A", width: int = 1,
                 gate_bias: float | None = None, num_classes: int = 10, recipe: str = "paper",
                 lr: float | None = None, momentum: float | None = None, weight_decay: float | None = None,
                 nesterov: bool | None = None, epochs: int | None = None, max_steps: int | None = None,
                 warmup: bool | None = None, warmup_lr: float = 0.01, warmup_until_error: float = 0.8,
                 seed: int = 0, compile: bool = False, log_every_n_steps: int = 50):
        super().__init__()
        check_recipe(recipe)
        training_length(recipe, epochs, max_steps)  # validates the lengths
        if not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be a positive integer; got {log_every_n_steps!r}")
        self.save_hyperparameters()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = CifarNet(family, depth, option, width, gate_bias, num_classes)
        self._sums: dict[str, torch.Tensor | None] = dict.fromkeys(STAGES)  # (loss sum, errors) per epoch
        self._counts: dict[str, int] = dict.fromkeys(STAGES, 0)
        self._window: torch.Tensor | None = None  # train (loss sum, errors) since the last host read
        self._window_count = 0
        self._window_read_at = 0      # global step of the last host read
        self._restored_epoch: int | None = None
        self._prepared_for: str | None = None  # device type the network was last prepared for

    # ---- the network ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @property
    def trainer_limits(self) -> dict[str, int]:
        """``max_epochs`` / ``max_steps`` for a Trainer running this recipe (``-1`` = no limit)."""
        return training_length(self.hparams.recipe, self.hparams.epochs, self.hparams.max_steps)

    def _prepare_device(self) -> None:
        """channels_last and optional compile, once per device type, on CUDA only."""
        if self._prepared_for == self.device.type:
            return
        self._prepared_for = self.device.type
        if self.device.type != "cuda":
            if self.hparams.compile:
                rank_zero_warn("compile=True is ignored off CUDA; the network runs eagerly")
            return
        self.model.to(memory_format=torch.channels_last)
        if self.hparams.compile:
            self.model.compile()  # compiles in place: state_dict keys and pl_module.model stay the same

    def on_fit_start(self) -> None:
        self._prepare_device()

    def on_validation_start(self) -> None:
        self._prepare_device()

    def on_test_start(self) -> None:
        self._prepare_device()

    def on_predict_start(self) -> None:
        self._prepare_device()

    # ---- steps: device-side sums -----------------------------------------------------------------

    @staticmethod
    def _accumulate(acc: torch.Tensor | None, stats: torch.Tensor) -> torch.Tensor:
        if acc is None:
            return stats.clone()
        if acc.device != stats.device:  # restored from a checkpoint onto the CPU
            acc = acc.to(stats.device)
        return acc.add_(stats)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        with torch.no_grad():
            n = y.shape[0]
            wrong = (logits.argmax(dim=1) != y).sum()
            dtype = torch.float32 if loss.device.type == "mps" else torch.float64
            stats = torch.stack([loss.detach().to(dtype) * n, wrong.to(dtype)])
            self._sums[stage] = self._accumulate(self._sums[stage], stats)
            self._counts[stage] += n
            if stage == "train":
                self._window = self._accumulate(self._window, stats)
                self._window_count += n
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return self(x)

    def on_train_start(self) -> None:
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError("the training length is unbounded: set epochs or max_steps "
                             f"(Trainer limits for this recipe: {self.trainer_limits})")
        scheduler = self.lr_schedulers()
        if hasattr(scheduler, "set_total_steps"):
            scheduler.set_total_steps(int(total))

    # ---- host reads: every log_every_n_steps and at epoch end --------------------------------------

    def on_train_epoch_start(self) -> None:
        if self._restored_epoch == self.current_epoch:  # resumed mid-epoch: keep the restored sums
            self._restored_epoch = None
            return
        self._restored_epoch = None
        self._sums["train"], self._counts["train"] = None, 0

    def on_validation_epoch_start(self) -> None:
        self._sums["val"], self._counts["val"] = None, 0

    def on_test_epoch_start(self) -> None:
        self._sums["test"], self._counts["test"] = None, 0

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # The window of the last N steps is read before the next step rather than after the Nth, so a
        # run resumed from a checkpoint saved after step k reads it exactly where the original run did.
        step = self.global_step
        if step == 0 or step % self.hparams.log_every_n_steps or step == self._window_read_at:
            return
        self._window_read_at = step
        if self._window is None or self._window_count == 0:
            return
        # summed over processes first, so every rank takes the same warm-up decision
        window = self._reduced_sums(self._window, self._window_count)
        loss_sum, wrong, n = window.tolist()  # the one host read of this window
        self._window, self._window_count = None, 0
        error = wrong / n
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, PaperSchedule) and scheduler.warming_up:
            scheduler.observe_train_error(error)
        metrics = {"train_loss_step": loss_sum / n, "train_error_step": error,
                   "lr": self.trainer.optimizers[0].param_groups[0]["lr"]}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()  # flushed now: a run killed later still has these rows
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=True, logger=False)

    def _reduced_sums(self, sums: torch.Tensor, count: int) -> torch.Tensor:
        """``(loss sum, errors, count)`` summed over processes: means are taken after, never of means."""
        sums = sums.to(self.device)  # sums restored from a checkpoint sit on the CPU
        count_t = torch.tensor([float(count)], dtype=sums.dtype, device=sums.device)
        return self.trainer.strategy.reduce(torch.cat([sums, count_t]), reduce_op="sum")

    def _log_epoch(self, stage: str) -> None:
        sums = self._sums[stage]
        if sums is None:
            return
        total = self._reduced_sums(sums, self._counts[stage])
        loss, error = (total[:2] / total[2]).float()
        self.log_dict({f"{stage}_loss": loss, f"{stage}_error": error},
                      on_step=False, on_epoch=True, prog_bar=stage != "test", logger=True)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    # ---- checkpoints: running sums travel with the weights, so a resumed run reads what the original did

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["running_sums"] = {
            "epoch": self.current_epoch, "train": self._sums["train"], "train_count": self._counts["train"],
            "window": self._window, "window_count": self._window_count, "window_read_at": self._window_read_at}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("running_sums")
        if not state:
            return
        self._restored_epoch = state["epoch"]
        self._sums["train"], self._counts["train"] = state["train"], state["train_count"]
        self._window, self._window_count = state["window"], state["window_count"]
        self._window_read_at = state["window_read_at"]

    # ---- optimisation -------------------------------------------------------------------------------

    def configure_optimizers(self):
        # The schedule's length is set in on_train_start: asking Lightning for it here, before a
        # resumed run has restored its loader state, would make it skip that restore.
        h = self.hparams
        optimizer, scheduler = build_optimization(
            self.model.parameters(), h.recipe, None, depth=h.depth, lr=h.lr, momentum=h.momentum,
            weight_decay=h.weight_decay, nesterov=h.nesterov, warmup=h.warmup, warmup_lr=h.warmup_lr,
            warmup_until_error=h.warmup_until_error)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
