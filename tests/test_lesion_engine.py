"""The batched engine (prefix cache + per-sample gates) equals one context-manager pass per variant.

The two run the same float32 operations on batches of different sizes (examples x variants), and
a CPU's convolution kernels need not add a batch's products in the same order at every size
(oneDNN promises no such thing): the logits agree to float32 rounding, and the predictions, hence
the errors, agree exactly wherever the top two logits are further apart than that rounding.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from resnet_probe.lesion import (evaluate_deletion_sets, evaluate_orders, random_swaps,
                                 single_block_sweep)
from resnet_probe.models import FAMILIES, anatomy, build_model

from test_lesion_context import _randomise_bn


def _net(family, depth=14):
    torch.manual_seed(0)
    if family == "resnet18":
        model = torchvision.models.resnet18(num_classes=10)
    else:
        model = build_model(family, depth)
    _randomise_bn(model)
    return model


def _data(n=7, size=8):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


LOGITS = dict(rtol=1e-4, atol=1e-5)  # float32 logits of order 1-10, from up to ~20 layers


def _assert_same_predictions(logits: torch.Tensor, reference: torch.Tensor) -> None:
    """The same top-1 class for every example. The reference's top two logits are at least 1e-4
    apart for each (checked: at least 5e-4 in these nets), far beyond float32 rounding (~1e-6), so
    no CPU's rounding can reorder them."""
    top2 = reference.topk(2, dim=-1).values
    assert ((top2[..., 0] - top2[..., 1]) > 1e-4).all()
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))


def _deletion_sets(n: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    sets = [[], [0], [n - 1], list(range(n)), [1, n - 2]]
    sets += [sorted(rng.choice(n, size=k, replace=False).tolist()) for k in (1, 2, 3, 3)]
    return sets


@pytest.mark.parametrize("family, mode", [(f, "zero_branch") for f in (*FAMILIES, "resnet18")]
                         + [("residual", "shortcut_only"), ("resnet18", "shortcut_only")])
def test_batched_deletion_sets_equal_one_lesion_context_per_set(family, mode):
    model = _net(family)
    x, y = _data(size=16 if family == "resnet18" else 8)
    sets = _deletion_sets(len(anatomy(model).blocks))
    # 7 examples in chunks of 3 and 4 (a trailing single example joins its chunk); at most 3 sets a pass
    kwargs = dict(mode=mode, batch_size=3, return_logits=True)
    batched = evaluate_deletion_sets(model, sets, x, y, max_batch=12, **kwargs)
    loop = evaluate_deletion_sets(model, sets, x, y, engine="loop", **kwargs)
    torch.testing.assert_close(batched.logits, loop.logits, **LOGITS)
    _assert_same_predictions(batched.logits, loop.logits)
    for name in ("loss", "kl", "intact_loss"):
        np.testing.assert_allclose(getattr(batched, name), getattr(loop, name), rtol=1e-4, atol=1e-5)
    for name in ("error", "intact_error"):  # the error of an example follows its prediction
        np.testing.assert_array_equal(getattr(batched, name), getattr(loop, name))


def test_batched_orders_equal_one_reordered_context_per_order():
    model = _net("residual", 20)
    anat = anatomy(model)
    x, y = _data()
    rng = np.random.default_rng(1)
    orders = [list(range(len(anat.blocks)))] + [random_swaps(anat, k, rng) for k in (1, 2, 3, 5, 8)]
    batched = evaluate_orders(model, orders, x, y, batch_size=4, max_batch=12, return_logits=True)
    loop = evaluate_orders(model, orders, x, y, batch_size=4, engine="loop", return_logits=True)
    torch.testing.assert_close(batched.logits, loop.logits, **LOGITS)
    _assert_same_predictions(batched.logits, loop.logits)
    np.testing.assert_array_equal(batched.error, loop.error)


def test_single_block_sweep_with_prefix_reuse_equals_the_loop_of_contexts():
    model = _net("residual", 14)
    x, y = _data(n=10)
    batched = single_block_sweep(model, x, y, batch_size=5, n_resamples=50, max_batch=15)
    loop = single_block_sweep(model, x, y, batch_size=5, n_resamples=50, engine="loop")
    logits = evaluate_deletion_sets(model, [[i] for i in range(len(anatomy(model).blocks))], x, y,
                                    engine="loop", return_logits=True).logits
    _assert_same_predictions(logits, logits)  # clear predictions: the errors below agree exactly
    errors = [f"error{s}" for s in ("", "_lo", "_hi")]
    pd.testing.assert_frame_equal(batched[errors], loop[errors])
    # the same bootstrap resamples of per-example losses that agree to float32 rounding
    pd.testing.assert_frame_equal(batched.drop(columns=errors), loop.drop(columns=errors), rtol=1e-4, atol=1e-6)
    assert batched.attrs["intact_error"] == loop.attrs["intact_error"]


def test_the_empty_deletion_set_has_zero_kl_and_the_intact_error():
    model = _net("residual")
    x, y = _data()
    result = evaluate_deletion_sets(model, [[], []], x, y)
    assert (result.kl == 0).all()
    np.testing.assert_array_equal(result.error[0], result.intact_error)
    np.testing.assert_array_equal(result.loss[0], result.intact_loss)
    with torch.no_grad():
        model.eval()
        assert result.intact_error.mean() == (model(x).argmax(1) != y).double().mean().item()


def test_a_plain_net_with_every_block_deleted_ignores_its_blocks_and_is_at_chance():
    model = _net("plain", 8)
    n = len(anatomy(model).blocks)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(400, 3, 8, 8, generator=g), torch.randint(0, 10, (400,), generator=g)
    everything = evaluate_deletion_sets(model, [list(range(n))], x, y, batch_size=200, return_logits=True)
    with torch.no_grad():
        for block in anatomy(model).blocks:
            for p in block.module.parameters():
                p.mul_(-3.0)
    again = evaluate_deletion_sets(model, [list(range(n))], x, y, batch_size=200, return_logits=True)
    assert torch.equal(everything.logits, again.logits)  # no block parameter reaches the output
    assert 0.84 < everything.error.mean() < 0.96  # random labels: 10 classes


def test_evaluation_restores_the_training_mode_and_accepts_datasets_and_loaders():
    model = _net("residual", 8).train()
    x, y = _data()
    from_tensors = evaluate_deletion_sets(model, [[0], [1, 2]], x, y)
    assert model.training
    dataset = torch.utils.data.TensorDataset(x, y)
    from_dataset = evaluate_deletion_sets(model, [[0], [1, 2]], dataset)
    from_loader = evaluate_deletion_sets(model, [[0], [1, 2]], torch.utils.data.DataLoader(dataset, batch_size=5))
    for other in (from_dataset, from_loader):
        np.testing.assert_array_equal(other.loss, from_tensors.loss)
    with pytest.raises(ValueError, match="valid engines: batched, loop"):
        evaluate_deletion_sets(model, [[0]], x, y, engine="fast")
