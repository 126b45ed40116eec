"""torch.compile in this toolkit: compiled code held beside eager modules, never compiled in place.

Two uses, each leaving the module it compiles an ordinary eager ``nn.Module`` that probes, lesions,
folding and checkpoints see unchanged:

- training: ``CompiledCall(module, mode=...)`` is ``torch.compile(module)`` held beside ``module``
  (``RecipeModule`` keeps it next to ``self.model`` and calls it in its ``forward``);
- evaluation: ``evaluation_model(model, "compiled")`` folds every BatchNorm into its convolution
  (``fold.fold_batchnorm``) and gives every block of that copy, and every top-level part outside the
  blocks (the stem's layers, the head), a compiled forward (``compile_blocks``). Compiling block by
  block, rather than the whole forward pass, keeps the block anatomy: the lesion engine calls each
  block on any number of rows (examples x variants), deleted or not, and every intact block it runs
  is compiled code; ``model(x)`` runs the same compiled pieces in order. The logits equal the folded
  copy's up to float rounding (kernels fuse and reorder sums). The copy is for evaluation: probes
  refuse it (attach them to the original or to the folded copy), and it does not train.

The recompile limit. torch.compile keeps one cache of compiled variants per Python code object,
shared by every module whose class runs that code (every block of one class; every ``CifarNet`` of
the process), and by default it stops compiling a code object after 8 variants and runs it eagerly
from then on, with only a logged warning. A deep net compiled block by block has more block variants
than that (shapes, strides, row counts), and a process that trains several architectures holds a
few variants per network. So every call of compiled code made here runs inside ``compile_scope()``:
a recompile limit of ``RECOMPILE_LIMIT``, and a ``RecompileLimitError`` instead of a silent eager
fallback when it is reached. The setting holds only during those calls: other compiled code in the
process, and what runs before or after, see torch's own setting.

On the CPU, compiled code comes from inductor's C++ code generation, which has crashed (heap
corruption) and produced wrong values on some CPUs: there it is opt-in and warns that it is
experimental (``warn_cpu_compile``); the CPU paths are ``eager`` and ``folded``.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Iterator

import torch
from torch import nn

from .anatomy import anatomy
from .fold import fold_batchnorm

EVALUATION_PATHS = ("eager", "folded", "compiled")
RECOMPILE_LIMIT = 64  # compiled variants per code object inside compile_scope()

_scope = threading.local()  # depth of nested compile_scope() calls in this thread


class RecompileLimitError(RuntimeError):
    """torch.compile reached ``RECOMPILE_LIMIT`` variants of one function inside ``compile_scope()``."""


@contextlib.contextmanager
def compile_scope() -> Iterator[None]:
    """Run compiled code under a recompile limit of ``RECOMPILE_LIMIT`` that fails loudly when reached.

    Raises:
        RecompileLimitError: compiling one more variant would pass the limit (torch would otherwise
            run that code eagerly from then on, silently).
    """
    depth = getattr(_scope, "depth", 0)
    if depth:  # already inside: the setting is in force
        yield
        return
    _scope.depth = 1
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            yield
    except torch._dynamo.exc.FailOnRecompileLimitHit as err:
        raise RecompileLimitError(
            f"torch.compile reached its limit of {RECOMPILE_LIMIT} compiled variants of one function; it would "
            "run that code eagerly from here on. The variants of every network compiled in this process count: "
            "compile fewer networks per process, or call torch._dynamo.reset() between them") from err
    finally:
        _scope.depth = 0


def warn_cpu_compile(what: str) -> None:
    """Warn that ``what`` runs torch.compile'd code on the CPU, which is experimental there."""
    warnings.warn(f"{what} on the CPU is experimental: inductor's C++ code generation has crashed and given "
                  "wrong values on some CPUs; the CPU paths are eager and BN-folded evaluation",
                  UserWarning, stacklevel=3)


class CompiledCall:
    """``torch.compile(module, **options)`` held beside ``module``, which itself stays eager.

    A plain object, not an ``nn.Module``: assigned to an attribute of a module it is not registered
    as a submodule, so the module tree and ``state_dict`` keys stay those of the eager network.
    Each call runs inside ``compile_scope()``.

    Args:
        module: the network to compile.
        **options: ``torch.compile`` options (``mode``, ``dynamic``, ...).
    """

    def __init__(self, module: nn.Module, **options):
        self.module = module
        self.options = options
        self._compiled = torch.compile(module, **options)

    def __call__(self, *args, **kwargs):
        with compile_scope():
            return self._compiled(*args, **kwargs)


class CompiledForward:
    """A module's own ``forward``, compiled, installed as its instance ``forward`` by ``compile_blocks``.

    The class's ``forward`` function is compiled unbound and called with the module, so a deep copy of
    the module (which copies this object with it) runs the copy's parameters, not the original's.
    Hooks on the module itself run eagerly around it; an instance ``forward`` set on top of it (a
    lesion, ``lesion.context.override_forwards``) replaces it until it is restored.
    """

    def __init__(self, module: nn.Module, **options):
        self.module = module
        self._forward = torch.compile(type(module).forward, **options)

    def __call__(self, *args, **kwargs):
        with compile_scope():
            return self._forward(self.module, *args, **kwargs)


def evaluation_model(model: nn.Module, path: str = "folded", mode: str | None = None,
                     channels_last: bool | None = None) -> nn.Module:
    """The network to evaluate along ``path``.

    Args:
        model: a CIFAR net or torchvision ResNet (``anatomy`` supports it); it is not modified.
        path: ``eager`` (the model itself, as it is), ``folded`` (an eval-mode copy with BatchNorm
            folded into the convolutions) or ``compiled`` (that copy, compiled block by block; see
            the module docstring; experimental on the CPU, where it warns).
        mode: ``torch.compile`` mode for ``compiled`` (``None``: the default; on a GPU
            ``"max-autotune-no-cudagraphs"`` tunes the convolutions).
        channels_last: lay the copy's weights out channels_last (NHWC), the layout in which bf16
            and TF32 convolutions run without transposes on a GPU; ``None`` = when the model is on
            CUDA. Inputs need not be converted: a convolution with channels_last weights returns
            channels_last outputs.

    Raises:
        ValueError: an unknown path, naming the valid ones.
    """
    if path not in EVALUATION_PATHS:
        raise ValueError(f"unknown evaluation path {path!r}; valid paths: {', '.join(EVALUATION_PATHS)}")
    if path == "eager":
        return model
    folded = fold_batchnorm(model)
    first = next(folded.parameters(), None)
    on_cuda = first is not None and first.is_cuda
    if channels_last if channels_last is not None else on_cuda:
        folded.to(memory_format=torch.channels_last)
    if path == "compiled":
        if not on_cuda:
            warn_cpu_compile('evaluation_model(..., "compiled")')
        compile_blocks(folded, mode)
    return folded


def compile_blocks(model: nn.Module, mode: str | None = None) -> nn.Module:
    """Give every block of ``model``, and every top-level child holding no block, a compiled forward
    (``CompiledForward``, dynamic shapes); returns ``model``.

    The modules keep their class, name and parameters, so the anatomy, the lesion engine and
    ``state_dict`` see the same network.
    """
    blocks = [b.module for b in anatomy(model).blocks]
    block_ids = {id(b) for b in blocks}
    parts = blocks + [child for child in model.children()
                      if not any(id(m) in block_ids for m in child.modules())]
    for part in parts:
        part.forward = CompiledForward(part, dynamic=True, mode=mode)
    return model


def compiled_module(model: nn.Module) -> str | None:
    """The name of the first module in ``model`` that runs compiled code (``""``: the model itself),
    or ``None`` when nothing is compiled: a ``torch.compile`` wrapper, a module compiled in place
    (``nn.Module.compile``) or a module given a ``CompiledForward``."""
    for name, m in model.named_modules():
        if (hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None
                or isinstance(vars(m).get("forward"), CompiledForward)):
            return name
    return None
