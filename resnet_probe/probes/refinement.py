"""Refinement probe: does each block move its representation down the loss gradient? (Jastrzebski et al. 2018)

Jastrzebski et al. ("Residual connections encourage iterative inference", ICLR 2018) expand the loss
after a residual block, ``h_i = h_{i-1} + F_i(h_{i-1})``, to first order in the branch output:
``L(h_i) ~ L(h_{i-1}) + <F_i, dL/dh>``. A block lowers the loss when its branch output points against
the loss gradient, and they measure that per block as a cosine (negative: refinement) together with the
relative size of the step ``||F_i|| / ||h_{i-1}||`` (small: an iterative, incremental step).

Definitions, per block, per example ``n``, and per model of a grouped network:

- ``cos_n = <F(x_n), -g_n> / (||F(x_n)|| ||g_n||)`` with ``F(x_n)`` the block's branch output as the
  anatomy defines it (after its last BN, before the combine step) and ``g_n = dL/dF(x_n)``, the loss
  gradient *at the branch output where it enters the combine*. Positive ``cos_n`` means the branch moves
  the representation along ``-g``: Jastrzebski et al. plot ``cos(F, dL/dh)`` and find it negative, which
  is ``cos_n > 0`` here (the sign is flipped so that refinement reads positive, as the issue words it:
  the cosine with the *negative* gradient);
- ``ratio_n = ||F(x_n)|| / ||x_n||`` with ``x_n`` the block input;
- norms and inner products over all of one example's (C, H, W) (of one model's channel block).

Why ``dL/dF`` and not the gradient at the block input ``dL/dx``: for every additive combine
(``ReLU(F + S)`` of residual and torchvision blocks, ``F + S`` of pre-activation ones)
``dL/dF = dL/dS = dL/dz`` with ``z = F(x) + S(x)``: the gradient of the rest of the network's loss at the
representation that ``F`` is added to, which is what the expansion pairs ``F`` with. It is defined for
downsampling blocks too (``F`` and ``S(x)`` have one shape where ``x`` has another), so one definition
serves every block. The autograd gradient at the block input, ``dL/dx = S'^T dL/dz + J_F^T dL/dz``, adds
the backward path through the branch itself, a term of the order ``||J_F||`` that the first-order
expansion neglects alongside the difference between evaluating the gradient before and after the step;
for small steps (``ratio_n << 1``) the two agree. The rows of downsampling blocks are marked.

Highway blocks: ``F`` is the anatomy's branch, the transform ``H`` before its ReLU, and
``g = dL/dF = T * 1[F > 0] * dL/d(out)``; the block's step ``out - S = T (ReLU(F) - S)`` is gated,
so its cosine is not Jastrzebski's quantity. Plain blocks have no shortcut: ``F`` is the whole new
representation (``out = ReLU(F)``), not a step added to ``x``, and ``cos_n`` there measures only how the
representation lines up with its own loss gradient; Jastrzebski et al. compare residual nets only.
Both are measured with the same definition and labelled by family.

Which loss. The probe reads whatever is backpropagated. With ``L = sum_n CE_n`` (``reduction="sum"``)
and BN in eval mode, ``g_n`` is exactly the gradient of example n's own loss; a mean-reduced loss scales
every ``g_n`` by ``1/N``, which no cosine sees. In train mode BN couples the examples of a batch, so
``g_n`` also carries the other examples' losses.

Streaming: per block and model, the count, sum and sum of squares of ``cos_n`` and of ``ratio_n`` over
the examples (float64), added by the backward pass of a ``BranchTap`` (``resnet_probe.models.gradient_tap``,
the one gradient-tap mechanism) into a sink whose gradient autograd accumulates over backward passes.
The state is 6 numbers per block and model; the means and (unbiased) stds over the examples are exact,
and ``all_reduce`` sums the sums over ranks before any division. The tap is put on the branch output
by forward hooks: compiled code runs without them (record eagerly).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..models import BlockAnatomy
from ..models.gradient_tap import REFINEMENT_SUMS, branch_tapped, example_sums, new_sink, take_sink
from .nonfinite import NonFiniteWatch
from .stats import zeros

REFINEMENT_METRICS = ("refinement_cos_mean", "refinement_cos_std", "refinement_cos_count",
                      "branch_to_input_norm_mean", "branch_to_input_norm_std", "branch_to_input_norm_count")


def summarise(sums: torch.Tensor) -> torch.Tensor:
    """``REFINEMENT_METRICS`` from ``REFINEMENT_SUMS`` (first axis), float64: mean, unbiased std and count of
    the cosine, then of the norm ratio (NaN mean without a value, NaN std below two values)."""
    out = []
    for k in (0, 3):
        n, s, q = sums[k], sums[k + 1], sums[k + 2]
        mean = torch.where(n > 0, s / n.clamp_min(1), torch.nan)
        var = torch.where(n > 1, ((q - s * s / n.clamp_min(1)) / (n - 1).clamp_min(1)).clamp_min(0.0), torch.nan)
        out += [mean, var.sqrt(), n]
    return torch.stack(out)


class RefinementProbe:
    """Per-block cosine between the branch output and the negative loss gradient, and the branch-to-input
    norm ratio (see the module docstring), accumulated over backward passes.

    Args:
        blocks: the blocks to measure.
        watch: where non-finite values are recorded.
        num_models: S, the models laid side by side in the network (1 for an ordinary network).
    """

    def __init__(self, blocks: list[BlockAnatomy], watch: NonFiniteWatch, num_models: int = 1):
        self.blocks = list(blocks)
        self.num_models = num_models
        self.watch = watch
        self.watch_index = [watch.register(f"{b.name} (refinement)") for b in self.blocks]
        self.active = True
        self._sinks: list[torch.Tensor | None] = [None] * len(self.blocks)
        self._x_sq: list[torch.Tensor | None] = [None] * len(self.blocks)
        self._open: torch.Tensor | None = None         # (6, S, blocks): sums since the last record
        self.history: list[tuple[int | None, torch.Tensor]] = []

    # -- hooks --------------------------------------------------------------------------------
    def hooks(self) -> list[tuple[nn.Module, str, object]]:
        """Per block: a forward pre-hook on the block that keeps ``||x_n||^2`` of its input, and a forward
        hook on its branch-output module that returns the output through a ``BranchTap``."""
        plan = []
        for i, b in enumerate(self.blocks):
            plan.append((b.module, "pre", partial(self._input, i)))
            plan.append((b.branch_module, "forward", partial(self._branch, i)))
        return [(module, kind, torch.compiler.disable(fn)) for module, kind, fn in plan]

    def _input(self, i: int, module, args) -> None:
        if not self.active or not args or not torch.is_grad_enabled():
            self._x_sq[i] = None
            return
        x = args[0].detach()
        with torch.no_grad():
            self._x_sq[i] = example_sums(x * x, self.num_models)

    def _branch(self, i: int, module, args, output):
        x_sq, self._x_sq[i] = self._x_sq[i], None
        if not self.active or x_sq is None or not isinstance(output, torch.Tensor):
            return None
        return branch_tapped(output, x_sq, self._sink(i, output.device))

    def _sink(self, i: int, device: torch.device) -> torch.Tensor:
        sink = self._sinks[i]
        if sink is None or sink.device != device:
            if sink is not None:
                self._drain([i])
            sink = self._sinks[i] = new_sink(len(REFINEMENT_SUMS), self.num_models, device)
        return sink

    @property
    def sinks(self) -> list[torch.Tensor]:
        """The leaves the taps add into, of the blocks that ran: ``loss.backward(inputs=probe.sinks)``
        measures without computing any parameter gradient."""
        return [s for s in self._sinks if s is not None]

    # -- accumulation -------------------------------------------------------------------------
    def _drain(self, indices) -> None:
        """Move what the taps of blocks ``indices`` added since the last drain into the open sums."""
        for i in indices:
            sink = self._sinks[i]
            q = None if sink is None else take_sink(sink)
            if q is None:
                continue
            with torch.no_grad():
                if self._open is None:
                    self._open = zeros((len(REFINEMENT_SUMS), self.num_models, len(self.blocks)), q.device)
                self._open[:, :, i] += q.to(self._open.device, torch.float64)
            self.watch.check(self.watch_index[i], q)

    def sums(self) -> torch.Tensor:
        """The open (not yet recorded) sums, (6, S, blocks) float64 (zeros before any backward pass)."""
        self._drain(range(len(self.blocks)))
        if self._open is None:
            return zeros((len(REFINEMENT_SUMS), self.num_models, len(self.blocks)), torch.device("cpu"))
        return self._open

    def record(self, step: int | None = None) -> None:
        """Close the sums accumulated so far as one recorded step (``step`` labels its rows)."""
        if not self.active:
            raise RuntimeError("this probe session is closed")
        entry = self.sums().clone()
        self._open = None
        self.history.append((None if step is None else int(step), entry))

    def reset(self) -> None:
        self.history.clear()
        self._open = None
        for s in self._sinks:
            if s is not None:
                take_sink(s)

    def reducible(self) -> list[torch.Tensor]:
        """The sums of every recorded step and the open ones (summed over ranks by all_reduce)."""
        self.sums()
        if self._open is None:
            self._open = zeros((len(REFINEMENT_SUMS), self.num_models, len(self.blocks)), torch.device("cpu"))
        return [entry for _, entry in self.history] + [self._open]

    # -- results ------------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """Tidy rows ``(site = block name, kind="refinement", metric, value, step, ...)``: one set per recorded
        step, and one with ``step`` None for the sums since the last record when there are any; with
        several models side by side, one row per model, labelled ``model_index``."""
        entries = list(self.history)
        open_sums = self.sums()
        if open_sums[0].sum() > 0 or open_sums[3].sum() > 0:
            entries.append((None, open_sums))
        if not entries:
            return []
        values = torch.stack([summarise(e.to(torch.float64)) for _, e in entries]).cpu().tolist()
        grouped = self.num_models > 1
        rows = []
        for (step, _), per_step in zip(entries, values):
            for s in range(self.num_models):
                for i, b in enumerate(self.blocks):
                    for k, metric in enumerate(REFINEMENT_METRICS):
                        row = {"site": b.name, "stage": b.stage, "block": b.index, "kind": "refinement",
                               "metric": metric, "value": per_step[k][s][i], "downsampling": b.downsampling,
                               "path": b.path, "step": step}
                        rows.append({**row, "model_index": s} if grouped else row)
        return rows
