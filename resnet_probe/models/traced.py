"""A model's stem and head, read from its ``forward`` with ``torch.fx``.

For a model built from declared blocks (``declared.py``), ``forward`` is traced symbolically with
the blocks kept whole (leaf modules). The trace must call the blocks one after the other, each
taking the previous one's output and nothing else using it; then everything before the first
block is the stem and everything after the last block is the head, each a ``GraphModule`` that
calls the model's own submodules (the same objects, so their parameters, buffers and hooks are
the model's). The model itself is not changed. Functional code in ``forward`` (``F.relu``,
``F.avg_pool2d(out, out.size(3))``, ``out.view(out.size(0), -1)``) is kept as written.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import fx, nn

Fn = Callable[[torch.Tensor], torch.Tensor]


class _BlockTracer(fx.Tracer):
    def __init__(self, is_block: Callable[[nn.Module], bool]):
        super().__init__()
        self.is_block = is_block

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self.is_block(m) or super().is_leaf_module(m, qualname)


def _fingerprint(model: nn.Module) -> tuple:
    return tuple((name, id(m)) for name, m in model.named_modules())


# model -> (its module tree when traced, result); weak keys: the cache never keeps a model alive
_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def split_forward(model: nn.Module, is_block: Callable[[nn.Module], bool]) -> tuple[Fn, list[str], Fn]:
    """``(stem, block_paths, head)`` with ``model(x) == head(block_n(...block_1(stem(x))))``.

    Args:
        model: the model.
        is_block: whether a submodule is a block (kept whole in the trace).

    Returns:
        The stem, the module paths of the blocks in the order ``forward`` calls them, the head.

    Raises:
        TypeError: ``forward`` cannot be traced, or does not run its blocks as one chain (a block
            called twice, a computation between two blocks, an intermediate block output used
            elsewhere, or a head reading something computed before the blocks).
    """
    key = _fingerprint(model)
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    result = _split(model, is_block)
    _CACHE[model] = (key, result)
    return result


def _split(model: nn.Module, is_block) -> tuple[Fn, list[str], Fn]:
    name = type(model).__name__
    try:
        graph = _BlockTracer(is_block).trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure is reported the same way
        raise TypeError(f"cannot read the stem and head of {name}: torch.fx could not trace its forward "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); the blocks must be called "
                        "one after the other in a forward without data-dependent control flow") from None
    nodes = list(graph.nodes)
    blocks = [n for n in nodes if n.op == "call_module" and is_block(model.get_submodule(n.target))]
    if not blocks:
        raise TypeError(f"{name}.forward calls none of its declared blocks")
    paths = [str(n.target) for n in blocks]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise TypeError(f"{name}.forward calls block {twice[0]} more than once; the anatomy needs each "
                        "block run once")
    first, last = nodes.index(blocks[0]), nodes.index(blocks[-1])
    for prev, node in zip(blocks, blocks[1:]):
        if node.args != (prev,) or node.kwargs:
            raise TypeError(f"{name}.forward does not feed block {prev.target} straight into {node.target}; "
                            "the anatomy needs the blocks to run one after the other")
    for node in nodes[first:last + 1]:
        if node not in blocks:
            raise TypeError(f"{name}.forward computes {node.format_node()} between its blocks; the "
                            "anatomy needs the blocks to run one after the other")
        users = set(node.users)
        if node is not blocks[-1] and users != {nodes[nodes.index(node) + 1]}:
            raise TypeError(f"{name}.forward uses the output of block {node.target} outside the next "
                            "block; the anatomy needs each block's output to feed only the next one")
    stem = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes[:first]:
        env[node] = stem.node_copy(node, lambda a: env[a])
    stem.output(env[blocks[0].args[0]])
    head = fx.Graph()
    env = {blocks[-1]: head.placeholder("h")}
    for node in nodes[last + 1:]:
        missing = [a for a in node.all_input_nodes if a not in env]
        if missing:
            raise TypeError(f"the head of {name}.forward uses {missing[0].name}, computed before the blocks; "
                            "the anatomy needs the head to read only the last block's output")
        env[node] = head.node_copy(node, lambda a: env[a])
    return (fx.GraphModule(model, stem, class_name=f"{name}Stem"), paths,
            fx.GraphModule(model, head, class_name=f"{name}Head"))
