"""``RecipeModule``: what the CIFAR training modules share -- recipe, device set-up, device-side metrics.

``CifarClassifier`` (one model) and ``GroupedClassifier`` (S models side by side) differ only in
their network and in how a batch becomes per-model losses. Everything else lives here:

- the recipe: ``configure_optimizers`` builds SGD and the schedule from the hyperparameters, and
  ``on_train_start`` gives the schedule the Trainer's length (read there, not in
  ``configure_optimizers``, because asking Lightning for it earlier makes a resumed run skip
  restoring its stateful loader);
- the device: on CUDA channels_last and, unless ``compile=False``, ``torch.compile`` (by default in
  mode ``reduce-overhead``: CUDA graphs, which a small CIFAR net needs, its step being bound by
  kernel launches), prepared once per device type; on the CPU compilation is opt-in
  (``compile=True``) and experimental. ``self.model`` is never compiled in place: the compiled
  network (``compiled``, a ``models.compiled.CompiledCall``) is held beside it, so
  ``pl_module.model`` is always the eager network that probes, lesions, folding and checkpoints
  expect, during and after training. ``forward`` runs the compiled network on batches of the size
  it first saw in the current mode (training or evaluation) and runs any other size eagerly: the
  last, smaller batch of an epoch then costs one eager step instead of another compiled graph
  (and, under CUDA graphs, another recording);
- metrics: per model, the (loss sum, errors) pair of each stage is summed on the device, a tensor of
  shape ``(S, 2)``. The host reads the running training window every ``log_every_n_steps`` steps
  (logging it and feeding the paper warm-up, which ends when every model's training error is
  below the threshold) and each stage at epoch end. Sums and counts are added over processes
  before any division: never a mean of means. The training sums travel in checkpoints, so a
  resumed run reads exactly what the original run read.
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch

from ..models.compiled import CompiledCall, warn_cpu_compile
from .recipes import PaperSchedule, build_optimization, parameter_groups, training_length

STAGES = ("train", "val", "test")
# torch.compile modes; "reduce-overhead" runs the compiled network through CUDA graphs
COMPILE_MODES = ("reduce-overhead", "default", "max-autotune", "max-autotune-no-cudagraphs")


def check_training_args(recipe: str, epochs: int | None, max_steps: int | None, log_every_n_steps: int,
                        compile_mode: str) -> None:
    """Raise ``ValueError`` for an unknown recipe, a bad training length, a bad logging interval or an
    unknown ``torch.compile`` mode."""
    training_length(recipe, epochs, max_steps)  # checks the recipe too
    if not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
        raise ValueError(f"log_every_n_steps must be a positive integer; got {log_every_n_steps!r}")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile_mode {compile_mode!r}; valid modes: {', '.join(COMPILE_MODES)}")


class RecipeModule(pl.LightningModule):
    """Base of the training modules: subclasses set ``self.model``, save their hyperparameters
    (``recipe``, ``lr``, ``momentum``, ``weight_decay``, ``nesterov``, ``epochs``, ``max_steps``,
    ``warmup``, ``warmup_lr``, ``warmup_until_error``, ``depth``, ``compile``, ``compile_mode``,
    ``log_every_n_steps``), and implement ``_step(batch, stage)``, which calls ``_record``."""

    def __init__(self):
        super().__init__()
        self._sums: dict[str, torch.Tensor | None] = dict.fromkeys(STAGES)  # (S, 2): loss sum, errors
        self._counts: dict[str, int] = dict.fromkeys(STAGES, 0)             # images per model
        self._window: torch.Tensor | None = None  # training sums since the last host read
        self._window_count = 0
        self._window_read_at = 0                  # global step of the last host read
        self._restored_epoch: int | None = None
        self._prepared_for: str | None = None     # device type the network was last prepared for
        self._compiled: CompiledCall | None = None
        self._compiled_batch: dict[bool, int] = {}  # training mode -> the batch size compiled for it

    @property
    def trainer_limits(self) -> dict[str, int]:
        """``max_epochs`` / ``max_steps`` for a Trainer running this recipe (``-1`` = no limit)."""
        return training_length(self.hparams.recipe, self.hparams.epochs, self.hparams.max_steps)

    # ---- the device ------------------------------------------------------------------------------

    def _prepare_device(self) -> None:
        """channels_last on CUDA, and the compiled network (``compile``: ``None`` = on CUDA only), once
        per device type."""
        if self._prepared_for == self.device.type:
            return
        self._prepared_for = self.device.type
        cuda = self.device.type == "cuda"
        if cuda:
            self.model.to(memory_format=torch.channels_last)
        self._compiled, self._compiled_batch = None, {}
        if self.hparams.compile if self.hparams.compile is not None else cuda:
            if not cuda:
                warn_cpu_compile(f"{type(self).__name__}(compile=True)")
            # static shapes: one graph per mode, whatever sizes later batches have (they run eagerly)
            self._compiled = CompiledCall(self.model, mode=self.hparams.compile_mode, dynamic=False)

    def __getstate__(self) -> dict:
        # a copy or pickle (ddp_spawn, deepcopy) gets the eager network; it compiles its own when it runs
        state = super().__getstate__()
        state.update(_compiled=None, _compiled_batch={}, _prepared_for=None)
        return state

    @property
    def compiled(self) -> CompiledCall | None:
        """The compiled network held beside ``self.model`` (prepared when a stage starts), or ``None``."""
        return self._compiled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network's logits (``GroupedClassifier``: ``(S, N, classes)``): compiled for batches of
        the size first seen in the current mode, eager otherwise."""
        if self._compiled is not None:
            size = self._compiled_batch.setdefault(self.model.training, x.shape[0])
            if size == x.shape[0]:
                return self._compiled(x)
        return self.model(x)

    @staticmethod
    def _layout(x: torch.Tensor) -> torch.Tensor:
        """A CUDA batch in channels_last, the network's layout there (``_prepare_device``)."""
        return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x

    def on_fit_start(self) -> None:
        self._prepare_device()

    def on_validation_start(self) -> None:
        self._prepare_device()

    def on_test_start(self) -> None:
        self._prepare_device()

    def on_predict_start(self) -> None:
        self._prepare_device()

    # ---- steps: device-side sums -------------------------------------------------------------------

    def _step(self, batch, stage: str) -> torch.Tensor:
        """The loss to minimise; records the batch's per-model losses and errors with ``_record``."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    @staticmethod
    def _accumulate(acc: torch.Tensor | None, stats: torch.Tensor) -> torch.Tensor:
        if acc is None:
            return stats.clone()
        if acc.device != stats.device:  # restored from a checkpoint onto the CPU
            acc = acc.to(stats.device)
        return acc.add_(stats)

    def _record(self, stage: str, losses: torch.Tensor, wrong: torch.Tensor, n: int) -> None:
        """Add a batch: ``losses`` / ``wrong`` hold each model's mean loss / error count over ``n`` images."""
        with torch.no_grad():
            dtype = torch.float32 if losses.device.type == "mps" else torch.float64
            stats = torch.stack([losses.detach().reshape(-1).to(dtype) * n, wrong.reshape(-1).to(dtype)], dim=1)
            self._sums[stage] = self._accumulate(self._sums[stage], stats)
            self._counts[stage] += n
            if stage == "train":
                self._window = self._accumulate(self._window, stats)
                self._window_count += n

    # ---- host reads: every log_every_n_steps and at epoch end --------------------------------------

    def _metrics(self, name: str, values: list[float]) -> dict[str, float]:
        """Named metrics from one value per model (one model: ``{name: value}``)."""
        return {name: values[0]}

    def _reduced_means(self, sums: torch.Tensor, count: int) -> list[list[float]]:
        """Per model ``[mean loss, error]`` after summing sums and counts over processes (one host read)."""
        sums = sums.to(self.device)  # sums restored from a checkpoint sit on the CPU
        count_t = torch.tensor([float(count)], dtype=sums.dtype, device=sums.device)
        total = self.trainer.strategy.reduce(torch.cat([sums.reshape(-1), count_t]), reduce_op="sum")
        return (total[:-1].reshape(-1, 2) / total[-1]).tolist()

    def on_train_epoch_start(self) -> None:
        restored, self._restored_epoch = self._restored_epoch, None
        if restored != self.current_epoch:  # else resumed mid-epoch: keep the restored sums
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
        means = self._reduced_means(self._window, self._window_count)
        self._window, self._window_count = None, 0
        losses, errors = [m[0] for m in means], [m[1] for m in means]
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, PaperSchedule) and scheduler.warming_up:
            scheduler.observe_train_error(max(errors))
        metrics = {**self._metrics("train_loss_step", losses), **self._metrics("train_error_step", errors),
                   "lr": self.trainer.optimizers[0].param_groups[0]["lr"]}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()  # flushed now: a run killed later still has these rows
        for name, value in metrics.items():  # per-model values ("name/model{s}") stay off the progress bar
            self.log(name, value, on_step=True, on_epoch=False, prog_bar="/" not in name, logger=False)

    def _log_epoch(self, stage: str) -> None:
        sums = self._sums[stage]
        if sums is None:
            return
        means = self._reduced_means(sums, self._counts[stage])
        metrics = {**self._metrics(f"{stage}_loss", [m[0] for m in means]),
                   **self._metrics(f"{stage}_error", [m[1] for m in means])}
        shown = stage != "test"
        for name, value in metrics.items():
            self.log(name, value, on_step=False, on_epoch=True, prog_bar=shown and "/" not in name, logger=True)

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
        as_pairs = lambda t: None if t is None else t.reshape(-1, 2)  # noqa: E731 (older files: shape (2,))
        self._restored_epoch = state["epoch"]
        self._sums["train"], self._counts["train"] = as_pairs(state["train"]), state["train_count"]
        self._window, self._window_count = as_pairs(state["window"]), state["window_count"]
        self._window_read_at = state["window_read_at"]

    # ---- optimisation -------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError("the training length is unbounded: set epochs or max_steps "
                             f"(Trainer limits for this recipe: {self.trainer_limits})")
        scheduler = self.lr_schedulers()
        if hasattr(scheduler, "set_total_steps"):
            scheduler.set_total_steps(int(total))

    def configure_optimizers(self):
        h = self.hparams
        optimizer, scheduler = build_optimization(
            parameter_groups(self.model, h.get("gate_bias_decay", False)), h.recipe, None, depth=h.depth,
            lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay, nesterov=h.nesterov, warmup=h.warmup,
            warmup_lr=h.warmup_lr, warmup_until_error=h.warmup_until_error)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
