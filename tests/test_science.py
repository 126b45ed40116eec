"""The papers' findings, reproduced on real CIFAR-10 images at a CPU-sized budget.

Budget (``conftest.SCIENCE_BUDGET``): plain-20 and residual-20, 5,000 training images of the JPEG
pack, 3 epochs of the one-cycle ``fast`` recipe, evaluated on 1,000 test images.

What these nets reach depends on the CPU's kernels: their float32 roundings differ, and three
epochs of SGD carry the difference to a few points of accuracy. So each threshold sits well away
from every value measured (an AMD EPYC natively and under ATEN_CPU_CAPABILITY=default, avx2 and
avx512; an Intel Xeon natively) and still fails for a net that did not learn, or for a residual net
that behaves like the plain one (the two start from the same weights).
"""
import torch

from resnet_probe.lesion import single_block_sweep
from resnet_probe.probes import probe


def _error(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) != y).float().mean().item()


def test_a_small_residual_net_learns_real_cifar10(trained_nets, pack_test_slice):
    model, metrics = trained_nets["residual"]
    # Measured: validation accuracy 0.387-0.410, test error 0.578-0.589; chance is 0.10 / 0.90.
    assert metrics["val_accuracy"] > 0.25 and not metrics["synthetic"]
    assert _error(model, *pack_test_slice) < 0.75


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
    # Measured: the residual mean 0.886-0.945 of the plain one, smaller at 8 or 9 of the 9 blocks
    # (a residual net that behaved like the plain one would give 1 and 0).
    assert residual.mean() < plain.mean()
    assert (residual < plain).sum() >= 6


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
    # Measured: plain deletions give at least 0.81 error (chance 0.90) from 0.64-0.65 intact;
    # residual deletions cost 0.086-0.103 on average (median 0.059-0.069), 0.33-0.42 of the plain cost.
    assert plain_errors.min() > 0.72
    assert (residual_errors - residual_intact).mean() < 0.7 * (plain_errors - plain_intact).mean()
    assert (residual_errors - residual_intact).median() < 0.15
