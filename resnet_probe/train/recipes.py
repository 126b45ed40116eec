"""Training recipes: optimiser, learning-rate schedule and training length.

``paper`` is He et al. 2016's CIFAR-10 recipe (section 4.2): SGD with momentum 0.9, weight decay
1e-4, batch 128, lr 0.1 divided by 10 at 32k and 48k iterations, stop at 64k. The schedule is
iteration based; with a shorter ``max_steps`` the divisions stay at 50 % and 75 % of the run, so a
short run keeps the paper's shape. Networks of depth >= 110 warm up at lr 0.01 until the training
error falls below 80 % (about 400 iterations in the paper) and then go back to 0.1.

``fast`` is a one-cycle schedule (Smith & Topin 2019) over a given number of epochs with Nesterov
SGD: the lr rises linearly from ``lr / 10`` to ``lr`` over the first quarter and falls linearly to
``lr / 1000`` by the end. It reaches useful accuracy in a few epochs and is meant for exploration.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Any, Iterable

import torch
from torch.optim.lr_scheduler import LRScheduler

RECIPES = ("paper", "fast")

# Every default of a recipe in one place.  lr: initial (paper) or peak (fast) learning rate.
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "paper": dict(lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
                  max_steps=64_000,            # iterations (optimizer steps) when neither length is given
                  milestones=(0.5, 0.75),      # lr /= 10 at these fractions of the run: 32k, 48k of 64k
                  gamma=0.1,
                  warmup_depth=110),           # depth from which warm-up is on by default
    "fast": dict(lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4,
                 epochs=15,                    # epochs when neither length is given
                 pct_start=0.25,               # fraction of the run spent rising to the peak lr
                 div_factor=10.0,              # start lr = peak / div_factor
                 final_div_factor=100.0),      # end lr = start lr / final_div_factor
}


def check_recipe(recipe: str) -> None:
    """Raise ``ValueError`` naming the valid recipes unless ``recipe`` is one of them."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(RECIPES)}")


def recipe_default(recipe: str, key: str, value: Any = None) -> Any:
    """``value`` if given, else the recipe's default for ``key``."""
    check_recipe(recipe)
    return RECIPE_DEFAULTS[recipe][key] if value is None else value


def training_length(recipe: str, epochs: int | None = None, max_steps: int | None = None) -> dict[str, int]:
    """Trainer limits for a recipe: ``{"max_epochs": ..., "max_steps": ...}`` (``-1`` = no limit).

    With neither length given, ``paper`` trains 64k iterations and ``fast`` 15 epochs. With both
    given, training stops at whichever comes first.

    Args:
        recipe: one of ``RECIPES``.
        epochs: number of epochs, or ``None``.
        max_steps: number of optimizer steps, or ``None``.

    Returns:
        keyword arguments for ``pytorch_lightning.Trainer``.
    """
    check_recipe(recipe)
    for name, v in (("epochs", epochs), ("max_steps", max_steps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer or None; got {v!r}")
    if epochs is None and max_steps is None:
        defaults = RECIPE_DEFAULTS[recipe]
        epochs, max_steps = defaults.get("epochs"), defaults.get("max_steps")
    return {"max_epochs": -1 if epochs is None else epochs, "max_steps": -1 if max_steps is None else max_steps}


class _LengthAwareSchedule(LRScheduler):
    """A per-iteration schedule whose length may be set after construction.

    Lightning knows the number of steps of an epoch-based run only once the training data is set
    up; asking earlier (``trainer.estimated_stepping_batches`` inside ``configure_optimizers``)
    makes Lightning 2.6 skip restoring a stateful loader on resume. So the length can be given
    later with ``set_total_steps``, before the first step; the lr of iteration 0 never depends on it.
    """

    total_steps: int | None

    @staticmethod
    def _checked_length(total_steps: int | None) -> int | None:
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1; got {total_steps}")
        return None if total_steps is None else int(total_steps)

    def _apply(self, lrs: list[float]) -> None:
        """Write ``lrs`` into the optimizer now, so that the next step already uses them."""
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = list(lrs)

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the schedule's length and rewrite the optimizer's lr for the current iteration."""
        self.total_steps = self._checked_length(total_steps)
        self._apply(self.get_lr())

    def _length(self) -> int:
        if self.total_steps is None:
            if self.last_epoch <= 0:
                return 1
            raise RuntimeError(f"{type(self).__name__}: set_total_steps() must be called before stepping")
        return self.total_steps


class PaperSchedule(_LengthAwareSchedule):
    """Step schedule of He et al. 2016 with the optional depth-110 warm-up.

    The lr used for iteration ``t`` (0-based) is ``base_lr * gamma ** k`` with ``k`` the number of
    milestones ``<= t`` (milestones at the given fractions of ``total_steps``); while warming up it
    is ``warmup_lr`` instead. The warm-up ends, and the lr RETURNS to the base schedule at once, when
    ``observe_train_error`` is given a training error below ``warmup_until_error``. The caller
    decides how often to read the error (on a GPU a read costs a host-device synchronisation).

    Args:
        optimizer: the optimizer; its lr is the base lr (0.1 in the paper).
        total_steps: length of the run in iterations (or ``None`` and ``set_total_steps`` later).
        milestones: fractions of ``total_steps`` at which the lr is multiplied by ``gamma``.
        gamma: the factor applied at each milestone.
        warmup_lr: lr during warm-up, or ``None`` for no warm-up.
        warmup_until_error: warm-up ends once the training error is below this fraction.
        last_epoch: index of the last iteration done (``-1`` for a fresh start).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int | None,
                 milestones: Iterable[float] = (0.5, 0.75), gamma: float = 0.1,
                 warmup_lr: float | None = None, warmup_until_error: float = 0.8, last_epoch: int = -1):
        fractions = [float(m) for m in milestones]
        if any(not 0.0 < m < 1.0 for m in fractions) or fractions != sorted(fractions):
            raise ValueError(f"milestones must be increasing fractions in (0, 1); got {fractions}")
        self.total_steps = self._checked_length(total_steps)
        self.milestone_fractions = fractions
        self.gamma = float(gamma)
        self.warmup_lr = None if warmup_lr is None else float(warmup_lr)
        self.warmup_until_error = float(warmup_until_error)
        self.warming_up = warmup_lr is not None
        self.warmup_ended_at: int | None = None
        super().__init__(optimizer, last_epoch)

    @property
    def milestones(self) -> list[int]:
        """Iterations from which the lr is divided once more (32k and 48k of 64k in the paper)."""
        return [round(f * self._length()) for f in self.milestone_fractions]

    def _scheduled_lrs(self) -> list[float]:
        k = bisect_right(self.milestones, self.last_epoch)
        return [base * self.gamma ** k for base in self.base_lrs]

    def get_lr(self) -> list[float]:
        if self.warming_up:
            return [self.warmup_lr for _ in self.base_lrs]
        return self._scheduled_lrs()

    def observe_train_error(self, error: float) -> bool:
        """Feed a training-error reading (a fraction); ends the warm-up once it is below the threshold.

        The new lr is written into the optimizer immediately, so the next step already uses it.

        Returns:
            ``True`` while the warm-up goes on, ``False`` once it has ended.
        """
        if self.warming_up and error < self.warmup_until_error:
            self.warming_up = False
            self.warmup_ended_at = self.last_epoch
            self._apply(self._scheduled_lrs())
        return self.warming_up


class OneCycleSchedule(_LengthAwareSchedule):
    """One-cycle lr (Smith & Topin 2019), linear up then linear down, per iteration.

    Iteration ``t`` of ``T``: from ``peak / div_factor`` up to ``peak`` at ``t = pct_start * T``, then
    down to ``peak / div_factor / final_div_factor`` at ``t = T - 1``.

    Args:
        optimizer: the optimizer; its lr is the peak lr.
        total_steps: length of the run in iterations (or ``None`` and ``set_total_steps`` later).
        pct_start: fraction of the run spent rising.
        div_factor: peak / start lr.
        final_div_factor: start lr / final lr.
        last_epoch: index of the last iteration done (``-1`` for a fresh start).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int | None, pct_start: float = 0.25,
                 div_factor: float = 10.0, final_div_factor: float = 100.0, last_epoch: int = -1):
        if not 0.0 < pct_start < 1.0:
            raise ValueError(f"pct_start must be in (0, 1); got {pct_start}")
        self.total_steps = self._checked_length(total_steps)
        self.pct_start, self.div_factor, self.final_div_factor = pct_start, div_factor, final_div_factor
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        t, total = self.last_epoch, self._length()
        rise = max(1.0, self.pct_start * total)
        fall = max(1.0, total - 1 - rise)
        out = []
        for peak in self.base_lrs:
            start, end = peak / self.div_factor, peak / self.div_factor / self.final_div_factor
            if t <= rise:
                out.append(start + (peak - start) * t / rise)
            else:
                out.append(peak + (end - peak) * min(1.0, (t - rise) / fall))
        return out


def paper_warmup(depth: int, warmup: bool | None) -> bool:
    """Whether the paper recipe warms up: as given, or by default for depth >= 110."""
    return depth >= RECIPE_DEFAULTS["paper"]["warmup_depth"] if warmup is None else bool(warmup)


def parameter_groups(model: torch.nn.Module, gate_bias_decay: bool = False) -> list[dict]:
    """The optimizer's parameter groups: every parameter with the recipe's weight decay, except the
    highway gate biases ``b_T`` (parameters named ``*gate.conv.bias``), which get none unless
    ``gate_bias_decay``: decay would pull their carry-biased initial value (-1 to -3) towards zero
    whatever the data says, and the highway study reports where training took them."""
    gate = [p for name, p in model.named_parameters() if name.endswith("gate.conv.bias")]
    if gate_bias_decay or not gate:
        return [{"params": list(model.parameters())}]
    ids = {id(p) for p in gate}
    return [{"params": [p for p in model.parameters() if id(p) not in ids]}, {"params": gate, "weight_decay": 0.0}]


def build_optimization(params, recipe: str, total_steps: int | None, *, depth: int = 20, lr: float | None = None,
                       momentum: float | None = None, weight_decay: float | None = None,
                       nesterov: bool | None = None, warmup: bool | None = None, warmup_lr: float = 0.01,
                       warmup_until_error: float = 0.8) -> tuple[torch.optim.SGD, PaperSchedule | OneCycleSchedule]:
    """The optimizer and per-iteration lr scheduler of a recipe.

    Args:
        params: parameters (or parameter groups, see ``parameter_groups``) to optimise.
        recipe: one of ``RECIPES``.
        total_steps: optimizer steps in the whole run (the schedule's length), or ``None`` to give
            it later with ``scheduler.set_total_steps``.
        depth: network depth (the paper recipe warms up from depth 110).
        lr, momentum, weight_decay, nesterov: overrides of the recipe's defaults (``None`` = default).
        warmup: paper recipe only; ``None`` = by depth.
        warmup_lr: lr during the paper warm-up.
        warmup_until_error: the paper warm-up ends when the training error is below this.

    Returns:
        ``(optimizer, scheduler)``; step the scheduler once per optimizer step.
    """
    check_recipe(recipe)
    d = RECIPE_DEFAULTS[recipe]
    lr = recipe_default(recipe, "lr", lr)
    opt = torch.optim.SGD(params, lr=lr, momentum=recipe_default(recipe, "momentum", momentum),
                          weight_decay=recipe_default(recipe, "weight_decay", weight_decay),
                          nesterov=recipe_default(recipe, "nesterov", nesterov))
    if recipe == "paper":
        sched = PaperSchedule(opt, total_steps, d["milestones"], d["gamma"],
                              warmup_lr=warmup_lr if paper_warmup(depth, warmup) else None,
                              warmup_until_error=warmup_until_error)
    else:
        sched = OneCycleSchedule(opt, total_steps, d["pct_start"], d["div_factor"], d["final_div_factor"])
    return opt, sched
