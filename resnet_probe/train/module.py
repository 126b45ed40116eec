"""``CifarClassifier``: the one LightningModule that trains every CIFAR family.

Its hyperparameters are primitives only (strings, numbers, booleans, ``None``), saved with
``save_hyperparameters()``, so ``CifarClassifier.load_from_checkpoint(path)`` rebuilds the network
from the file alone, also under ``torch.load(..., weights_only=True)``. The network is
``self.model`` (a ``resnet_probe.models.CifarNet``); probes and studies use ``pl_module.model``.

Metrics (cross-entropy and top-1 error, both per sample) are summed on the device during an epoch;
the host reads them only every ``log_every_n_steps`` optimizer steps and at epoch end, never per
step (``base.RecipeModule`` holds that machinery and the recipe). Logged per epoch: ``train_loss``, ``train_error`` (running over the epoch's augmented
batches, in training mode), ``val_loss``, ``val_error`` and in ``test`` ``test_loss``,
``test_error``; every ``log_every_n_steps`` steps also ``train_loss_step`` / ``train_error_step``
(means over those steps) and ``lr``.

On CUDA the network runs channels_last and, unless ``compile=False``, through ``torch.compile`` (CUDA
graphs by default; see ``compile_mode``), held beside ``self.model``, which stays eager; bf16 autocast
comes from the Trainer (``precision="bf16-mixed"``). On a CPU the network runs eagerly unless
``compile=True`` (experimental there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.cifar import seeded_model
from .base import RecipeModule, check_training_args


class CifarClassifier(RecipeModule):
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
        compile: run the network through ``torch.compile`` (held beside ``model``, which stays eager);
            ``None`` (the default) = on CUDA only; ``True`` also on the CPU, where it is experimental
            (it warns).
        compile_mode: its ``torch.compile`` mode: ``reduce-overhead`` (CUDA graphs; the default),
            ``default``, ``max-autotune`` or ``max-autotune-no-cudagraphs``.
        log_every_n_steps: optimizer steps between host reads of the running training metrics
            (logging and the warm-up check).
        gate_bias_decay: weight-decay the highway gate biases too (default: not; see
            ``recipes.parameter_groups``).
    """

    def __init__(self, family: str = "residual", depth: int = 20, option: str = "A", width: int = 1,
                 gate_bias: float | None = None, num_classes: int = 10, recipe: str = "paper",
                 lr: float | None = None, momentum: float | None = None, weight_decay: float | None = None,
                 nesterov: bool | None = None, epochs: int | None = None, max_steps: int | None = None,
                 warmup: bool | None = None, warmup_lr: float = 0.01, warmup_until_error: float = 0.8,
                 seed: int = 0, compile: bool | None = None, compile_mode: str = "reduce-overhead",
                 log_every_n_steps: int = 50, gate_bias_decay: bool = False):
        super().__init__()
        check_training_args(recipe, epochs, max_steps, log_every_n_steps, compile_mode)
        self.save_hyperparameters()
        self.model = seeded_model(seed, family=family, depth=depth, option=option, width=width,
                                  gate_bias=gate_bias, num_classes=num_classes)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(self._layout(x))
        loss = F.cross_entropy(logits, y)
        self._record(stage, loss, (logits.argmax(dim=1) != y).sum(), y.shape[0])
        return loss

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(self._layout(x))
