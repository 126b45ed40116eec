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
        dtype = torch.float32 if device.type == "mps" else torch.float64
        with torch.inference_mode(False), torch.no_grad():  # a normal leaf, also when made in inference mode
            sink = torch.zeros(2, self.num_models, device=device, dtype=dtype)
        return sink.requires_grad_()

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
        grad = self.sink.grad
        if grad is None:
            return None
        self.sink.grad = None
        return grad.detach()


def _device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
