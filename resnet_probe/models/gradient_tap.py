"""Gradient tap: the activation-gradient norm at a block output, measured inside the block.

A CIFAR block ends with ``tapped(out, self.grad_sink)``. While ``grad_sink`` is ``None`` (always,
unless a gradient probe records) that is ``out`` itself. While it holds a sink, a float tensor of
shape (S,) that requires grad, the block's output passes, when gradients are enabled, through
``GradientTap``: the identity in the forward pass, and in the backward pass it also returns, as the
sink's gradient,

    sink.grad[s] += sum over the batch of (dL / d out[:, channel block s]) ** 2

the squared L2 norm of the loss gradient at model ``s``'s share of the block output (S = 1 for an
ordinary network). The measurement is an operation of the block's own graph, not a hook, so a
compiled network traces it like any other operation (one more variant, compiled once, with the sink
as an input) and records without leaving its compiled code: no graph break that would keep CUDA
graphs from capturing the step whole.
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
    """``out -> out``; backward adds each model's squared gradient norm to ``sink``'s gradient."""

    @staticmethod
    def forward(out: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
        return out.clone()  # a new tensor: code downstream may modify the block output in place

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        sink = inputs[1]
        ctx.num_models, ctx.sink_dtype, ctx.sink_device = sink.shape[0], sink.dtype, sink.device

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sink_grad = None
        if ctx.needs_input_grad[1]:  # the sink may sit elsewhere: a model moved while a probe records
            sink_grad = squared_norms_by_model(grad, ctx.num_models).to(ctx.sink_device, ctx.sink_dtype)
        return grad, sink_grad


def tapped(out: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """``out`` through a ``GradientTap`` into ``sink``; ``out`` itself without a sink or a backward pass."""
    return out if sink is None or not torch.is_grad_enabled() else GradientTap.apply(out, sink)


def has_gradient_tap(module: nn.Module) -> bool:
    """Whether ``module`` ends with a gradient tap (it holds a ``grad_sink`` attribute)."""
    return "grad_sink" in vars(module)
