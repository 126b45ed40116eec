"""Gradient probe: per-block parameter-gradient norms and activation-gradient norms at block outputs.

Definitions, per block and per optimisation step:

- ``param_grad_norm``: the L2 norm of the gradient of all the block's parameters together
  (branch, shortcut projection, gate), read from ``.grad`` after the backward pass
  (``GradientProbe.record``, called after ``loss.backward()`` / from ``on_after_backward``);
- ``activation_grad_norm``: the L2 norm of the gradient of the loss with respect to the block
  output over the whole batch. Several backward passes before one ``record`` add up their squared
  norms.

How the activation gradient is read: a CIFAR block (``has_gradient_tap``) is given a sink for its
gradient tap (``resnet_probe.models.gradient_tap``), which measures it as part of the block's own
graph, compiled or not. Any other block (torchvision's, or a CIFAR block whose tap another open
session holds) gets a forward hook that registers a hook on its output tensor
(``Tensor.register_hook``; module backward hooks break on in-place ops and are not used). Both
compute the same sums.

For a grouped network of S models side by side (``GroupedCifarNet``) both norms are taken per model:
model ``s``'s share of a parameter is its ``s``-th slice along the first axis, and its share of a
block output is channel block ``s``; rows then carry ``model_index``.

Norms are kept on the device; ``history`` holds one (2, S, blocks) float64 tensor of squared norms
per recorded step (S = 1 for an ordinary network) and is copied to the host only when read.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..models import BlockAnatomy
from ..models.gradient_tap import has_gradient_tap, squared_norms_by_model
from .nonfinite import NonFiniteWatch
from .stats import zeros

GRADIENT_METRICS = ("param_grad_norm", "activation_grad_norm")


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
        self._sinks: dict[int, torch.Tensor] = {}  # block index -> the sink of its gradient tap
        self.history: list[tuple[int, torch.Tensor]] = []
        self._steps = 0

    def hooks(self) -> list[tuple[nn.Module, str, object]]:
        """``(module, "attach", fn)`` per block: ``fn()`` opens the block's gradient tap, or else
        registers the output hook, and returns a handle whose ``remove()`` undoes it."""
        return [(b.module, "attach", partial(self._attach, i)) for i, b in enumerate(self.blocks)]

    def _attach(self, i: int):
        module = self.blocks[i].module
        if not has_gradient_tap(module) or module.grad_sink is not None:
            return module.register_forward_hook(partial(self._on_output, i))
        param = next(module.parameters(), None)
        dev = param.device if param is not None else torch.device("cpu")
        sink = zeros(self.num_models, dev)
        module.grad_sink = self._sinks[i] = sink.requires_grad_()
        return _TapHandle(self, i)

    @property
    def tapped(self) -> list[bool]:
        """Per block: whether its activation gradient is read by its gradient tap (else by a hook)."""
        return [i in self._sinks for i in range(len(self.blocks))]

    def _on_output(self, i: int, module, args, output) -> None:
        if (self.active and isinstance(output, torch.Tensor)
                and output.requires_grad and torch.is_grad_enabled()):
            output.register_hook(partial(self._on_grad, i))

    def _on_grad(self, i: int, grad: torch.Tensor) -> None:
        if self.active:
            self._add(i, squared_norms_by_model(grad.detach(), self.num_models))

    def _add(self, i: int, q: torch.Tensor) -> None:
        """Add block ``i``'s squared activation-gradient norms ``q`` (S,) to this step's sums."""
        with torch.no_grad():
            if self._act is None:
                self._act = zeros((self.num_models, len(self.blocks)), q.device)
            self._act[:, i] += q
        self.watch.check(self.act_index[i], q)

    def record(self, step: int | None = None) -> None:
        """Read every block's parameter gradients (after backward) and close the step.

        Args:
            step: the optimisation step to label this record with; default: records so far.
        """
        if not self.active:
            raise RuntimeError("this probe session is closed")
        self._drain(list(self._sinks.items()))
        grads, per_block = [], []
        for ps in self.params:
            held = [p.grad.detach() for p in ps if p.grad is not None]
            grads += held
            per_block.append(len(held))
        dev = grads[0].device if grads else (self._act.device if self._act is not None
                                               else torch.device("cpu"))
        shape = (self.num_models, len(self.blocks))
        with torch.no_grad():
            if grads:
                norms = self._squared_norms(grads).to(dev)  # (parameters, S)
                sq = torch.stack([part.sum(0) for part in norms.split(per_block)], dim=1)  # deterministic
            else:
                sq = zeros(shape, dev)
            act = self._act if self._act is not None else zeros(shape, dev)
            entry = torch.stack((sq, act.to(dev)))
            self._act = None
        self.watch.check_all(self.param_first, list(sq.unbind(1)))
        self.history.append((self._steps if step is None else int(step), entry))
        self._steps += 1

    def _drain(self, sinks: list[tuple[int, torch.Tensor]]) -> None:
        """Add what the gradient taps ``(block index, sink)`` measured to this step's sums; empty them."""
        for i, sink in sorted(sinks, key=lambda item: item[0], reverse=True):  # backward order
            if sink.grad is not None:
                self._add(i, sink.grad.detach())
                sink.grad = None

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
        for sink in self._sinks.values():
            sink.grad = None

    def reducible(self) -> list[torch.Tensor]:
        """Squared activation-gradient norms of every recorded step (summed over ranks by all_reduce).

        Parameter gradients are not summed: under DDP every rank already holds the averaged gradient.
        """
        return [entry[1] for _, entry in self.history]

    def rows(self) -> list[dict]:
        """Tidy rows ``(site, kind="gradient", metric, value, step, ...)`` (one host sync); with
        several models side by side, one row per model, labelled ``model_index``."""
        if not self.history:
            return []
        values = torch.stack([e for _, e in self.history]).sqrt().cpu().tolist()
        grouped = self.num_models > 1
        rows = []
        for (step, _), per_step in zip(self.history, values):
            for s in range(self.num_models):
                for i, b in enumerate(self.blocks):
                    for metric, site, v in (("param_grad_norm", b.name, per_step[0][s][i]),
                                            ("activation_grad_norm", f"{b.name}.out", per_step[1][s][i])):
                        row = {"site": site, "stage": b.stage, "block": b.index, "kind": "gradient",
                               "metric": metric, "value": v, "downsampling": b.downsampling,
                               "path": b.path, "step": step}
                        rows.append({**row, "model_index": s} if grouped else row)
        return rows


class _TapHandle:
    """Closes one block's gradient tap: its sink is taken off the block, what it measured is kept."""

    def __init__(self, probe: GradientProbe, index: int):
        self.probe, self.index = probe, index

    def remove(self) -> None:
        sink = self.probe._sinks.pop(self.index, None)
        if sink is None:
            return
        module = self.probe.blocks[self.index].module
        if module.grad_sink is sink:
            module.grad_sink = None
        self.probe._drain([(self.index, sink)])  # what it measured stays for the next record
