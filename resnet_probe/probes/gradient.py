"""Gradient probe: per-block parameter-gradient norms and activation-gradient norms at block outputs.

Definitions, per block and per optimisation step:

- ``param_grad_norm``: the L2 norm of the gradient of all the block's parameters together
  (branch, shortcut projection, gate), read from ``.grad`` after the backward pass
  (``GradientProbe.record``, called after ``loss.backward()`` / from ``on_after_backward``);
- ``activation_grad_norm``: the L2 norm of the gradient of the loss with respect to the block
  output over the whole batch. Several backward passes before one ``record`` add up their squared
  norms;
- what those norms are relative to: ``param_norm`` (the L2 norm of the block's parameters when the
  gradients are read), ``param_count`` (how many parameters) and ``activation_count`` (how many
  output elements the activation-gradient norm was taken over), so that ``||g|| / sqrt(count)``
  (RMS per element) and ``||g|| / ||theta||`` (relative gradient) compare blocks of different sizes.

How the activation gradient is read: every block gets a gradient tap
(``resnet_probe.models.gradient_tap``, the one mechanism, which says where the tap sits and what that
means for compiled code): in a CIFAR block's own graph when its slot is free, else by a forward hook.
The tap's sink is kept for the probe's lifetime, so re-arming reuses the same tensor.

For a grouped network of S models side by side (``GroupedCifarNet``) both norms are taken per model:
model ``s``'s share of a parameter is its ``s``-th slice along the first axis, and its share of a
block output is channel block ``s``; rows then carry ``model_index``.

Norms are kept on the device; ``history`` holds one (5, S, blocks) float64 tensor per recorded step
(S = 1 for an ordinary network): squared parameter-gradient, activation-gradient and parameter norms,
then parameter and activation-element counts; it is copied to the host only when read.
"""
from __future__ import annotations

import warnings
from functools import partial

import torch
from torch import nn

from ..models import BlockAnatomy
from ..models.gradient_tap import Tap
from .nonfinite import NonFiniteWatch
from .stats import zeros

GRADIENT_METRICS = ("param_grad_norm", "activation_grad_norm", "param_norm", "param_count", "activation_count")
_NORMS = 3  # the first three entries of a record are squared norms: rows report their square roots


class GradientProbe:
    """Per-block gradient norms, recorded each optimisation step.

    Args:
        blocks: the blocks to measure.
        watch: where non-finite gradients are recorded.
        num_models: S, the models laid side by side in the network (1 for an ordinary network).
    """

    def __init__(self, blocks: list[BlockAnatomy], watch: NonFiniteWatch, num_models: int = 1):
        self.blocks = list(blocks)
        self.num_models = num_models
        self.params = [[p for p in b.module.parameters() if p.requires_grad] for b in self.blocks]
        self.watch = watch
        self.param_first = [watch.register(f"{b.name} (parameter gradient)") for b in self.blocks][0]  # consecutive
        self.act_index = [watch.register(f"{b.name}.out (activation gradient)") for b in self.blocks]
        self.active = True
        self._act: torch.Tensor | None = None
        self.taps = [Tap(b.module, num_models) for b in self.blocks]
        self.param_counts = [sum(p.numel() for p in ps) / num_models for ps in self.params]
        self.history: list[tuple[int, torch.Tensor]] = []
        self._steps = 0
        self._warned_untapped = False

    def hooks(self) -> list[tuple[nn.Module, str, object]]:
        """``(module, "attach", fn)`` per block: ``fn()`` opens the block's gradient tap and returns a
        handle whose ``remove()`` closes it (what it measured is kept for the next ``record``)."""
        return [(b.module, "attach", partial(self._open, i)) for i, b in enumerate(self.blocks)]

    def _open(self, i: int) -> "_TapHandle":
        self.taps[i].open()
        return _TapHandle(self, i)

    @property
    def tapped(self) -> list[bool]:
        """Per block: whether its tap sits in the block's own graph (else it is a hook, or closed)."""
        return [t.in_block for t in self.taps]

    def _add(self, i: int, q: torch.Tensor) -> None:
        """Add block ``i``'s squared activation-gradient norms and element counts ``q`` (2, S) to this
        step's sums."""
        with torch.no_grad():
            if self._act is None:
                self._act = zeros((2, self.num_models, len(self.blocks)), q.device)
            self._act[:, :, i] += q
        self.watch.check(self.act_index[i], q[0])

    def record(self, step: int | None = None) -> None:
        """Read every block's parameter gradients (after backward) and close the step.

        Args:
            step: the optimisation step to label this record with; default: records so far.
        """
        if not self.active:
            raise RuntimeError("this probe session is closed")
        self._drain(range(len(self.blocks)))
        grads, per_block = [], []
        for ps in self.params:
            held = [p.grad.detach() for p in ps if p.grad is not None]
            grads += held
            per_block.append(len(held))
        dev = grads[0].device if grads else (self._act.device if self._act is not None
                                               else torch.device("cpu"))
        shape = (self.num_models, len(self.blocks))
        with torch.no_grad():
            sq = self._per_block(grads, per_block, dev) if grads else zeros(shape, dev)
            weights = [p.detach() for ps in self.params for p in ps]
            psq = (self._per_block(weights, [len(ps) for ps in self.params], dev) if weights
                   else zeros(shape, dev))
            counts = torch.tensor(self.param_counts, dtype=torch.float64, device=dev).expand(shape)
            act = self._act.to(dev) if self._act is not None else zeros((2, *shape), dev)
            entry = torch.stack((sq, act[0], psq, counts, act[1]))
            self._act = None
        self.watch.check_all(self.param_first, list(sq.unbind(1)))
        self.history.append((self._steps if step is None else int(step), entry))
        self._steps += 1

    def _drain(self, indices) -> None:
        """Add what the taps of blocks ``indices`` measured to this step's sums; empty their sinks.

        An open tap that measured nothing in a step where its block's parameters got gradients was
        skipped by the code that ran (a hook that compiled code traced before it was added): warned once.
        """
        for i in sorted(indices, reverse=True):  # backward order
            tap = self.taps[i]
            q = tap.take()
            if q is not None:
                self._add(i, q)
            elif tap.is_open and not self._warned_untapped and any(p.grad is not None for p in self.params[i]):
                self._warned_untapped = True
                warnings.warn(f"the activation gradient of {self.blocks[i].name} was not measured although its "
                              "parameters have gradients: the block ran torch.compile'd code traced before the "
                              "probe's hook was added (compiled code keeps the hooks it was traced with). Run "
                              "recording steps eagerly, e.g. under torch.compiler.set_stance(\"force_eager\")",
                              UserWarning, stacklevel=3)

    def _per_block(self, tensors: list[torch.Tensor], per_block: list[int], dev) -> torch.Tensor:
        """Squared L2 norm of each block's ``per_block[i]`` consecutive ``tensors`` together, (S, blocks)."""
        norms = self._squared_norms(tensors).to(dev)  # (tensors, S)
        return torch.stack([part.sum(0) for part in norms.split(per_block)], dim=1)  # deterministic

    def _squared_norms(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Squared L2 norm of each gradient's share of each model, shape (parameters, S), float64."""
        if self.num_models == 1:
            return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).square().unsqueeze(1)
        return torch.stack([torch.linalg.vector_norm(g.reshape(self.num_models, -1), dim=1,
                                                     dtype=torch.float64) for g in grads]).square()

    def reset(self) -> None:
        self.history.clear()
        self._act = None
        self._steps = 0
        for tap in self.taps:
            tap.take()

    def reducible(self) -> list[torch.Tensor]:
        """Squared activation-gradient norms and their element counts of every recorded step (summed
        over ranks by all_reduce).

        Parameter gradients are not summed: under DDP every rank already holds the averaged gradient
        (and the same parameters).
        """
        return [entry[k] for _, entry in self.history for k in (1, 4)]

    def rows(self) -> list[dict]:
        """Tidy rows ``(site, kind="gradient", metric, value, step, ...)`` (one host sync); with
        several models side by side, one row per model, labelled ``model_index``."""
        if not self.history:
            return []
        values = torch.stack([e for _, e in self.history])
        values[:, :_NORMS] = values[:, :_NORMS].sqrt()
        values = values.cpu().tolist()
        grouped = self.num_models > 1
        rows = []
        for (step, _), per_step in zip(self.history, values):
            for s in range(self.num_models):
                for i, b in enumerate(self.blocks):
                    for k, metric in enumerate(GRADIENT_METRICS):
                        site = f"{b.name}.out" if metric.startswith("activation") else b.name
                        v = per_step[k][s][i]
                        row = {"site": site, "stage": b.stage, "block": b.index, "kind": "gradient",
                               "metric": metric, "value": v, "downsampling": b.downsampling,
                               "path": b.path, "step": step}
                        rows.append({**row, "model_index": s} if grouped else row)
        return rows


class _TapHandle:
    """Closes one block's gradient tap; what it measured is kept for the next ``record``."""

    def __init__(self, probe: GradientProbe, index: int):
        self.probe, self.index = probe, index

    def remove(self) -> None:
        tap = self.probe.taps[self.index]
        if tap.is_open:
            tap.close()
            q = tap.take()
            if q is not None:
                self.probe._add(self.index, q)
