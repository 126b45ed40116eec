"""The papers' findings, reproduced on real CIFAR-10 images at a CPU-sized budget.

Budget (``conftest.SCIENCE_BUDGET``): plain-20 and residual-20, 5,000 training images of the JPEG
pack, 3 epochs of the one-cycle ``fast`` recipe, evaluated on 1,000 test images.
"""
import torch

from resnet_probe.lesion import single_block_sweep
from resnet_probe.probes import probe


def _error(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) != y).float().mean().item()


def test_a_small_residual_net_learns_real_cifar10(trained_nets, pack_test_slice):
    model, metrics = trained_nets["residual"]
    assert metrics["val_accuracy"] > 0.40 and not metrics["synthetic"]
    assert _error(model, *pack_test_slice) < 0.60  # chance is 0.90


def _branch_std(model, x):
    with probe(model, sites="*.branch") as session:
        with torch.no_grad():
            model(x)
    table = session.table()
    return table[table.metric == "std"].set_index("site")["value"]


def test_residual_responses_are_smaller_than_plain_responses(trained_nets, pack_test_slice):
    """He et al. 2016, Fig. 7: the std of the branch output F(x) is smaller in the residual net."""
    x = pack_test_slice[0][:500]
    plain = _branch_std(trained_nets["plain"][0], x)
    residual = _branch_std(trained_nets["residual"][0], x)
    assert list(plain.index) == list(residual.index) and len(plain) == 9
    # Measured at this budget: residual 0.85 vs plain 0.97 on average, smaller at all 9 blocks.
    assert residual.mean() < 0.92 * plain.mean()
    assert (residual < plain).sum() >= 7


def test_deleting_a_residual_block_hurts_far_less_than_deleting_a_plain_block(trained_nets, pack_test_slice):
    """Veit et al. 2016, Fig. 3: residual nets survive the deletion of a block; plain nets fall to chance."""
    x, y = pack_test_slice
    rows = {}
    for family in ("plain", "residual"):
        model = trained_nets[family][0]
        sweep = single_block_sweep(model, x, y, n_resamples=100)
        rows[family] = (sweep[~sweep.downsampling]["error"], _error(model, x, y))
    plain_errors, plain_intact = rows["plain"]
    residual_errors, residual_intact = rows["residual"]
    # Measured at this budget: plain deletions 0.80-0.94 error (chance 0.90) from 0.62 intact;
    # residual deletions cost 0.09 on average (median 0.05) from 0.55 intact.
    assert plain_errors.min() > 0.75
    assert (residual_errors - residual_intact).mean() < 0.5 * (plain_errors - plain_intact).mean()
    assert (residual_errors - residual_intact).median() < 0.15
