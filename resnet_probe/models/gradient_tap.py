"""Activation-gradient norms at block outputs, all measured by one mechanism: the gradient tap.

The quantity, per block and per model ``s`` of a network of S models side by side (S = 1 for an
ordinary network), summed over every backward pass since it was last read:

    q[s] = sum over the batch of (dL / d out[:, channel block s]) ** 2

the squared L2 norm of the loss gradient at the block output (``GradientProbe`` reports sqrt(q)).

How: ``GradientTap`` is an autograd Function, the identity in the forward pass, whose backward pass
also returns, as the gradient of a small *sink* tensor (shape (2, S), float64, requires grad), ``q``
and the number of elements it was summed over (per model), so autograd adds both into ``sink.grad``. A ``Tap`` owns the sink of one block and puts the Function on
the block's output in one of two places:

- inside the block's own forward: a CIFAR block ends with ``tapped(out, self.grad_sink)``, and an
  open tap sets ``grad_sink``. This is an operation of the block's graph, not a hook: torch.compile
  traces it and guards on ``grad_sink`` (a compiled network has one variant with the sink and one
  without), so compiled training steps record without leaving compiled code. The sink is made once
  per ``Tap`` and reused at every opening, so it keeps its address: torch.compile marks tensor
  attributes of modules as static inputs, and a CUDA graph is re-recorded whenever a static input
  moves (after enough re-recordings torch stops using graphs for that function).
- in a forward hook that returns the tapped output, for any other block (torchvision's, or a CIFAR
  block whose ``grad_sink`` another open tap holds). torch.compile does not see hooks added after it
  traced a function, so compiled code must run eagerly while such a tap records
  (``ProbeCallback`` uses ``torch.compiler.set_stance("force_eager")`` for those steps).

The same mechanism measures iterative refinement (Jastrzebski et al. 2018): ``BranchTap`` is the
identity on a block's branch output ``F(x)``, and its backward adds to its sink the per-example sums
of ``cos(F(x_n), -dL/dF(x_n))`` and ``||F(x_n)|| / ||x_n||`` (``refinement_sums``; ``RefinementProbe``
in ``resnet_probe.probes.refinement`` puts it on the branch by forward hooks and says what it measures).

Nothing here writes a private attribute of a torch object.
"""
from __future__ import annotations

import torch
from torch import nn


def squared_norms_by_model(grad: torch.Tensor, num_models: int) -> torch.Tensor:
    """``sum grad^2`` of each model's channel block, shape (S,), float64.

    Each (example, channel) piece is reduced in the gradient's precision (float32 for lower ones),
    a short sum; the pieces are added in float64. One float32 reduction over a whole activation
    would be off by ~1e-4 (relative) at a million values.
    """
    rdt = torch.float64 if grad.dtype == torch.float64 else torch.float32
    pieces = (torch.linalg.vector_norm(grad, dim=tuple(range(2, grad.dim())), dtype=rdt) if grad.dim() > 2
              else grad.abs().to(rdt))
    return pieces.to(torch.float64).square().reshape(grad.shape[0], num_models, -1).sum((0, 2))


class GradientTap(torch.autograd.Function):
    """``out -> out``; backward adds each model's squared gradient norm and element count to ``sink``'s
    gradient (rows 0 and 1)."""

    @staticmethod
    def forward(out: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
        return out.clone()  # a new tensor: code downstream may modify the block output in place

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        sink = inputs[1]
        ctx.num_models, ctx.sink_dtype, ctx.sink_device = sink.shape[-1], sink.dtype, sink.device

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sink_grad = None
        if ctx.needs_input_grad[1]:  # the sink may sit elsewhere: a model moved while a probe records
            q = squared_norms_by_model(grad, ctx.num_models)
            sink_grad = torch.stack((q, torch.full_like(q, grad.numel() / ctx.num_models)))
            sink_grad = sink_grad.to(ctx.sink_device, ctx.sink_dtype)
        return grad, sink_grad


REFINEMENT_SUMS = ("cos_count", "cos_sum", "cos_sumsq", "ratio_count", "ratio_sum", "ratio_sumsq")


def example_sums(t: torch.Tensor, num_models: int) -> torch.Tensor:
    """``sum t`` over each example's share of each model (its channel block, all positions), shape (N, S),
    float64. Each (example, channel) piece is summed in ``t``'s precision (float32 for lower ones), the
    pieces in float64, as ``squared_norms_by_model`` does."""
    rdt = torch.float64 if t.dtype == torch.float64 else torch.float32
    pieces = t.to(rdt).sum(tuple(range(2, t.dim()))) if t.dim() > 2 else t.to(rdt)
    return pieces.to(torch.float64).reshape(t.shape[0], num_models, -1).sum(2)


def refinement_sums(f: torch.Tensor, grad: torch.Tensor, x_sq: torch.Tensor) -> torch.Tensor:
    """Per model, the count, sum and sum of squares over the examples of ``cos_n`` and of ``ratio_n``.

    ``cos_n = <F_n, -g_n> / (||F_n|| ||g_n||)`` and ``ratio_n = ||F_n|| / ||x_n||``, with ``F = f`` (N, S*C,
    ...), ``g = grad`` (its gradient) and ``x_sq`` (N, S) the squared norms of the examples' block inputs;
    every inner product and norm is over all of one example's share of one model. An example with
    ``F_n = 0`` or ``g_n = 0`` has no cosine, one with ``x_n = 0`` (or ``F_n`` undefined) no ratio: they
    are left out of that statistic's count.

    Returns:
        (6, S) float64: ``REFINEMENT_SUMS``.
    """
    num_models = x_sq.shape[1]
    dot = example_sums(f * grad, num_models)
    f_sq = example_sums(f * f, num_models)
    g_sq = example_sums(grad * grad, num_models)
    has_cos = (f_sq > 0) & (g_sq > 0)
    cos = torch.where(has_cos, -dot / (f_sq * g_sq).sqrt().clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    has_ratio = x_sq > 0
    ratio = torch.where(has_ratio, (f_sq / x_sq.clamp_min(torch.finfo(torch.float64).tiny)).sqrt(), 0.0)
    return torch.stack((has_cos.sum(0, dtype=torch.float64), cos.sum(0), cos.square().sum(0),
                        has_ratio.sum(0, dtype=torch.float64), ratio.sum(0), ratio.square().sum(0)))


class BranchTap(torch.autograd.Function):
    """``f -> f`` on a branch output; backward adds ``refinement_sums(f, grad, x_sq)`` to ``sink``'s gradient.

    ``f`` (the branch output) is kept for the backward pass: one activation per tapped block until then.
    """

    @staticmethod
    def forward(f: torch.Tensor, x_sq: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
        return f.clone()  # a new tensor: the block may add its shortcut to it in place

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        f, x_sq, sink = inputs
        ctx.save_for_backward(f.detach(), x_sq)
        ctx.sink_dtype, ctx.sink_device = sink.dtype, sink.device

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sink_grad = None
        if ctx.needs_input_grad[2]:
            f, x_sq = ctx.saved_tensors
            sink_grad = refinement_sums(f, grad, x_sq).to(ctx.sink_device, ctx.sink_dtype)
        return grad, None, sink_grad


def branch_tapped(f: torch.Tensor, x_sq: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """``f`` through a ``BranchTap`` into ``sink``; ``f`` itself when no backward pass can follow."""
    return f if not torch.is_grad_enabled() else BranchTap.apply(f, x_sq, sink)


def new_sink(rows: int, num_models: int, device: torch.device) -> torch.Tensor:
    """A float64 (float32 on MPS) zero leaf of shape (rows, S) that requires grad: a tap adds into its
    ``.grad``. A normal tensor, also when made in inference mode."""
    dtype = torch.float32 if device.type == "mps" else torch.float64
    with torch.inference_mode(False), torch.no_grad():
        sink = torch.zeros(rows, num_models, device=device, dtype=dtype)
    return sink.requires_grad_()


def take_sink(sink: torch.Tensor) -> torch.Tensor | None:
    """What taps added into ``sink`` since the last take (detached), or ``None``; empties it."""
    grad = sink.grad
    if grad is None:
        return None
    sink.grad = None
    return grad.detach()


def tapped(out: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """``out`` through a ``GradientTap`` into ``sink``; ``out`` itself without a sink or a backward pass."""
    return out if sink is None or not torch.is_grad_enabled() else GradientTap.apply(out, sink)


def has_gradient_tap(module: nn.Module) -> bool:
    """Whether ``module`` applies a gradient tap in its own forward (it holds a ``grad_sink`` slot)."""
    return "grad_sink" in vars(module)


class Tap:
    """The gradient tap of one block and the sink it adds into.

    Args:
        block: the block whose output gradient is measured.
        num_models: S, the models laid side by side in the network.
    """

    def __init__(self, block: nn.Module, num_models: int = 1):
        self.block, self.num_models = block, num_models
        self.sink = self._new_sink(_device(block))
        self.in_block = False  # open in the block's own forward
        self._hook = None      # the forward hook, when open by a hook

    def _new_sink(self, device: torch.device) -> torch.Tensor:
        return new_sink(2, self.num_models, device)

    @property
    def is_open(self) -> bool:
        return self.in_block or self._hook is not None

    def open(self) -> None:
        """Put the tap on the block's output: in the block's forward when its slot is free, else by a
        forward hook. The sink stays the same tensor unless the block moved to another device."""
        if self.is_open:
            return
        device = _device(self.block)
        if self.sink.device != device:
            self.sink = self._new_sink(device)
        if has_gradient_tap(self.block) and self.block.grad_sink is None:
            self.block.grad_sink = self.sink
            self.in_block = True
        else:
            self._hook = self.block.register_forward_hook(torch.compiler.disable(self._on_output))

    def close(self) -> None:
        """Take the tap off the block; what it measured stays in the sink until ``take``."""
        if self.in_block:
            if self.block.grad_sink is self.sink:
                self.block.grad_sink = None
            self.in_block = False
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _on_output(self, module, args, output):
        return tapped(output, self.sink) if isinstance(output, torch.Tensor) else None

    def take(self) -> torch.Tensor | None:
        """``q`` and the element counts measured since the last ``take`` (shape (2, S), float64), or
        ``None`` if nothing was; empties the sink."""
        return take_sink(self.sink)


def _device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
