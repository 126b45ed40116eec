"""``GroupedClassifier``: S seeds of one CIFAR architecture trained side by side as one network.

The network is a ``resnet_probe.models.grouped.GroupedCifarNet`` (convolutions grouped by model);
the loss is the sum over models of each model's mean cross-entropy, so every model gets exactly
the gradient it would get alone, and the recipe's SGD (momentum, weight decay: per parameter)
updates each model as if it were trained alone. Training batches are either shared by all models
(``shared_batches=True``: ordinary ``(x, y)`` batches) or one per model, in per-model orders:
``(x, y)`` with ``x`` of shape ``(S, B, 3, H, W)`` (or ``(S*B, 3, H, W)``, S consecutive blocks)
and ``y`` of shape ``(S, B)`` (or ``(S*B,)``), as ``PerModelBatches`` makes from S loaders with
their own seeds. Validation and test batches are shared: every model sees the same images.

Metrics are summed per model on the device and read by the host only every ``log_every_n_steps``
steps and at epoch end. Logged: ``{stage}_loss`` and ``{stage}_error`` (means over models) and
``{stage}_loss/model{s}``, ``{stage}_error/model{s}`` per model. Depth >= 110 paper warm-up: the
models share one learning rate, so the warm-up ends when *every* model's training error is below
the threshold (the lone recipe ends it per model).

``export_checkpoints(dir)`` writes one ordinary ``CifarClassifier`` checkpoint per model, which
``CifarClassifier.load_from_checkpoint`` and every study read as if the model had been trained alone.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Iterable, Sequence

import pytorch_lightning as pl
import torch

from ..atomic import atomic_path
from ..models.grouped import GroupedCifarNet, grouped_cross_entropy
from ..data import ResidentLoader
from .base import RecipeModule, check_training_args
from .module import CifarClassifier


class PerModelBatches:
    """S loaders zipped into per-model batches ``(x (S, B, ...), y (S, B))``, one loader per model.

    Give each loader its own shuffling seed so that each model sees its own data order. Its length
    is the shortest loader's; all loaders must yield batches of one size (use ``drop_last``).

    Args:
        loaders: one iterable of ``(x, y)`` batches per model.
    """

    def __init__(self, loaders: Sequence[Iterable]):
        self.loaders = list(loaders)
        if not self.loaders:
            raise ValueError("PerModelBatches needs one loader per model; got none")

    def __len__(self) -> int:
        return min(len(loader) for loader in self.loaders)

    def __iter__(self):
        for batches in zip(*self.loaders):
            xs, ys = zip(*((b[0], b[1]) for b in batches))
            yield torch.stack(xs), torch.stack(ys)

    @property
    def sampler(self) -> "PerModelBatches":
        """Its own sampler, so that Lightning's per-epoch ``sampler.set_epoch`` call reaches the loaders."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Forward ``epoch`` to every loader whose sampler has ``set_epoch``."""
        for loader in self.loaders:
            set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)

    def state_dict(self) -> dict:
        """The loaders' states (for exact mid-epoch resume), where they have one."""
        return {"loaders": [loader.state_dict() if hasattr(loader, "state_dict") else None
                            for loader in self.loaders]}

    def load_state_dict(self, state: dict) -> None:
        states = state["loaders"]
        if len(states) != len(self.loaders):
            raise ValueError(f"state holds {len(states)} loaders; this has {len(self.loaders)}")
        for loader, st in zip(self.loaders, states):
            if st is not None:
                loader.load_state_dict(st)


def per_model_train_batches(datamodule, data_seeds: Sequence[int]) -> PerModelBatches:
    """Per-model training batches from a ``CifarDataModule``'s training split, one order per seed.

    Each model gets a ``ResidentLoader`` with the data module's batch size, augmentation and
    ``drop_last``, seeded with its own data seed (pass the model seeds to pair model ``s``'s order
    with its initialisation); the images are moved to the data module's device once and shared.

    Args:
        datamodule: a ``resnet_probe.data.CifarDataModule``.
        data_seeds: one shuffling / augmentation seed per model.

    Returns:
        ``PerModelBatches`` yielding ``(x (S, B, 3, 32, 32), y (S, B))``.
    """

    images, labels = datamodule.resident_split("train")
    hp = datamodule.hparams
    return PerModelBatches([
        ResidentLoader(images, labels, hp.batch_size, shuffle=True, augment=hp.augment, drop_last=hp.drop_last,
                       seed=int(seed), num_classes=datamodule.num_classes) for seed in data_seeds])


class GroupedClassifier(RecipeModule):
    """S CIFAR classifiers of one architecture, one per seed, trained as one grouped network.

    Args:
        family, depth, option, width, gate_bias, num_classes: the architecture, as ``CifarClassifier``.
        seeds: one initialisation seed per model; model ``s`` starts as ``CifarClassifier(seed=seeds[s])``.
        shared_batches: every model trains on the same batches (``True``) or on its own batch of a
            per-model data order (``False``; see the module docstring for the batch layout).
        recipe, lr, momentum, weight_decay, nesterov, epochs, max_steps, warmup, warmup_lr,
            warmup_until_error: the training recipe, as ``CifarClassifier``.
        compile: run the network through ``torch.compile`` (held beside ``model``, which stays eager);
            ``None`` (the default) = on CUDA only; ``True`` also on the CPU, where it is experimental
            (it warns).
        compile_mode: its ``torch.compile`` mode: ``reduce-overhead`` (CUDA graphs; the default),
            ``default``, ``max-autotune`` or ``max-autotune-no-cudagraphs``.
        log_every_n_steps: optimizer steps between host reads of the running training metrics.
        gate_bias_decay: weight-decay the highway gate biases too (see ``recipes.parameter_groups``).
    """

    def __init__(self, family: str = "residual", depth: int = 20, option: str = "A", width: int = 1,
                 gate_bias: float | None = None, num_classes: int = 10, seeds: Sequence[int] = (0, 1, 2, 3),
                 shared_batches: bool = False, recipe: str = "paper", lr: float | None = None,
                 momentum: float | None = None, weight_decay: float | None = None,
                 nesterov: bool | None = None, epochs: int | None = None, max_steps: int | None = None,
                 warmup: bool | None = None, warmup_lr: float = 0.01, warmup_until_error: float = 0.8,
                 compile: bool | None = None, compile_mode: str = "reduce-overhead",
                 log_every_n_steps: int = 50, gate_bias_decay: bool = False):
        super().__init__()
        check_training_args(recipe, epochs, max_steps, log_every_n_steps, compile_mode)
        seeds = list(seeds)  # saved as a list (save_hyperparameters reads the local variables)
        self.save_hyperparameters()
        self.model = GroupedCifarNet(family, depth, option, width, gate_bias, num_classes, seeds=seeds)

    @property
    def num_models(self) -> int:
        return self.model.num_models

    # ---- steps -----------------------------------------------------------------------------------

    def _grouped_batch(self, batch, per_model: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Grouped inputs ``(B, S*3, H, W)`` and targets ``(S, B)`` from a shared or per-model batch."""
        x, y = batch[0], batch[1]
        s = self.num_models
        if per_model:
            if x.dim() == 4:
                if x.shape[0] % s:
                    raise ValueError(f"a per-model batch of {x.shape[0]} images does not split into "
                                     f"{s} models; give (S, B, 3, H, W) or S*B images")
                x = x.reshape(s, x.shape[0] // s, *x.shape[1:])
            y = y.reshape(s, -1)
            if x.dim() != 5 or x.shape[0] != s:
                raise ValueError(f"per-model batches must have shape (S={s}, B, 3, H, W); got {tuple(x.shape)}")
        else:
            if x.dim() != 4:
                raise ValueError(f"shared batches must have shape (B, 3, H, W); got {tuple(x.shape)} "
                                 "(per-model batches need shared_batches=False)")
            y = y.expand(s, -1)
        return self._layout(self.model.stack_inputs(x)), y

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = self._grouped_batch(batch, per_model=stage == "train" and not self.hparams.shared_batches)
        logits = self(x)  # through forward, so the compiled network runs when there is one
        losses = grouped_cross_entropy(logits, y)
        self._record(stage, losses, (logits.argmax(dim=2) != y).sum(dim=1), y.shape[1])
        return losses.sum()

    def _metrics(self, name: str, values: list[float]) -> dict[str, float]:
        """The mean over models as ``name`` and each model's value as ``name/model{s}``."""
        return {name: sum(values) / len(values), **{f"{name}/model{s}": v for s, v in enumerate(values)}}

    # ---- export ----------------------------------------------------------------------------------------

    def export_checkpoints(self, directory: str | Path,
                           filename: str = "model{index}-seed{seed}.ckpt") -> list[Path]:
        """Write one ordinary ``CifarClassifier`` checkpoint per model: ``directory / filename``.

        Each holds that model's exact weights and BatchNorm buffers and the ``CifarClassifier``
        hyperparameters of its lone counterpart (``seed = seeds[s]``), so
        ``CifarClassifier.load_from_checkpoint`` rebuilds it; ``"grouped"`` records where it came
        from. No optimizer or loop state is written (they are not separable per model on resume).

        Args:
            directory: destination folder (created if missing); files are written atomically.
            filename: the file name, formatted with the model's ``index`` (0..S-1) and ``seed``; it
                may name a subfolder (``"residual-20-seed{seed}/last.ckpt"``).

        Returns:
            The checkpoint paths, in model order.
        """

        directory = Path(directory)
        try:
            paths = [directory / filename.format(index=s, seed=seed) for s, seed in enumerate(self.hparams.seeds)]
        except (KeyError, IndexError) as err:
            raise ValueError(f"filename {filename!r} names an unknown field ({err}); valid fields: "
                             "{index}, {seed}") from None
        if len(set(paths)) < len(paths):
            raise ValueError(f"filename {filename!r} gives several models the same path; use {{index}} "
                             "(or {seed} with distinct seeds)")
        accepted = inspect.signature(CifarClassifier.__init__).parameters
        shared = {k: v for k, v in self.hparams.items() if k in accepted and k != "seeds"}
        for s, (model, seed, path) in enumerate(zip(self.model.export(), self.hparams.seeds, paths)):
            lone = CifarClassifier(**shared, seed=seed)
            lone.model.load_state_dict(model.state_dict())
            checkpoint = {
                "state_dict": {k: v.detach().cpu() for k, v in lone.state_dict().items()},
                "hyper_parameters": dict(lone.hparams),
                "pytorch-lightning_version": pl.__version__,
                "epoch": self.current_epoch, "global_step": self.global_step,
                "grouped": {"model_index": s, "num_models": self.num_models, "seeds": list(self.hparams.seeds),
                            "shared_batches": bool(self.hparams.shared_batches)},
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        return paths
