"""Every analysis reads the network inside DataParallel / DDP and torch.compile wrappers."""
from __future__ import annotations

import socket

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from torch import nn

from resnet_probe.lesion import (all_subsets_sweep, evaluate_deletion_sets, evaluate_orders,
                                 gate_closing_sweep, k_random_sweep, lesion, reorder_sweep, reordered,
                                 single_block_sweep)
from resnet_probe.models import build_model
from resnet_probe.models.wrappers import analysed_network, unwrap_parallel
from resnet_probe.paths import (path_gradient_stack, record_paths, sampled_path_gradients,
                                single_path_gradients)
from resnet_probe.probes import probe


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)


def _with_lesion(model, x, y):
    with torch.no_grad(), lesion(model, blocks=[1, 2]):
        return model(x)


def _with_order(model, x, y):
    with torch.no_grad(), reordered(model, [1, 0, 2, 3, 4, 5]):
        return model(x)


def _stack_sum(model, x, y):
    return path_gradient_stack(model.double(), x.double(), y).sum(0)


TOOLS = {
    "lesion": _with_lesion,
    "reordered": _with_order,
    "evaluate_deletion_sets": lambda m, x, y: evaluate_deletion_sets(m, [[0], [2, 4]], x, y).loss,
    "evaluate_orders": lambda m, x, y: evaluate_orders(m, [[1, 0, 2, 3, 4, 5]], x, y).loss,
    "single_block_sweep": lambda m, x, y: single_block_sweep(m, x, y, n_resamples=10),
    "k_random_sweep": lambda m, x, y: k_random_sweep(m, x, y, ks=[2], n_sets=2, n_resamples=10),
    "all_subsets_sweep": lambda m, x, y: all_subsets_sweep(m, x, y, k=5, n_resamples=10),
    "reorder_sweep": lambda m, x, y: reorder_sweep(m, x, y, k_swaps=[1], n_sets=2, n_resamples=10),
    "path_gradient_stack": _stack_sum,
    "record_paths": lambda m, x, y: record_paths(m.double(), x.double(), y).top,
    "single_path_gradients": lambda m, x, y: single_path_gradients(m.double(), x.double(), y, [[0, 3]]),
    "sampled_path_gradients": lambda m, x, y: sampled_path_gradients(m.double(), x.double(), y, ks=[2],
                                                                     samples_per_k=3),
}


def _net(family="residual"):
    torch.manual_seed(0)
    return build_model(family, 14).eval()


def _same(a, b):
    if isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-process gloo group, so a DistributedDataParallel wrapper can be built on the CPU."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("wrapper", ["DataParallel", "DistributedDataParallel", "both"])
def test_every_analysis_looks_through_data_parallel_wrappers(wrapper, one_rank_group):
    x, y = _data()
    for name, tool in TOOLS.items():
        model = _net()
        expected = tool(model, x, y)
        model = _net()
        wrapped = model
        if wrapper != "DataParallel":
            wrapped = nn.parallel.DistributedDataParallel(wrapped)
        if wrapper != "DistributedDataParallel":
            wrapped = nn.DataParallel(wrapped)
        assert unwrap_parallel(wrapped) is model
        _same(tool(wrapped, x, y), expected)
    highway = _net("highway")
    _same(gate_closing_sweep(nn.DataParallel(highway), x, y, n_resamples=10),
          gate_closing_sweep(highway, x, y, n_resamples=10))
    with probe(nn.DataParallel(highway), sites="*.branch") as session, torch.no_grad():
        highway(x)
    assert session.model is highway and len(session.table()) > 0


@pytest.mark.parametrize("name", [*(t for t in TOOLS if t not in ("lesion", "reordered")), "gate_closing_sweep"])
def test_a_torch_compile_wrapper_is_looked_through_to_the_eager_network(name):
    """Every analysis reads the eager network a torch.compile wrapper holds: the same tables as on that network.
    (``lesion`` / ``reordered`` change that network too, but a forward of the wrapper then runs compiled code.)"""
    x, y = _data()
    model = _net("highway" if name == "gate_closing_sweep" else "residual")
    tool = TOOLS.get(name, lambda m, x, y: gate_closing_sweep(m, x, y, n_resamples=10))
    wrapped = nn.DataParallel(torch.compile(model))
    assert analysed_network(wrapped, name) is model
    _same(tool(wrapped, x, y), tool(model, x, y))
