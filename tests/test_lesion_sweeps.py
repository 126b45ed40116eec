"""Sweep tables: one row per deletion set (or order), metrics with bootstrap intervals, seeded."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from resnet_probe.lesion import bootstrap
from resnet_probe.lesion import (all_subsets_sweep, evaluate_deletion_sets, gate_closing_sweep,
                                 k_random_sweep, kendall_tau, bootstrap_mean_ci, reorder_sweep,
                                 single_block_sweep)
from resnet_probe.models import anatomy, build_model

from test_lesion_context import _randomise_bn

METRIC_COLUMNS = [f"{m}{s}" for m in ("error", "loss", "kl") for s in ("", "_lo", "_hi")]


def _net(family="residual", depth=14):
    torch.manual_seed(0)
    model = build_model(family, depth)
    _randomise_bn(model)
    return model


def _data(n=12):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _check_intervals(df):
    for m in ("error", "loss", "kl"):
        assert (df[f"{m}_lo"] <= df[m] + 1e-12).all() and (df[m] <= df[f"{m}_hi"] + 1e-12).all()


def test_single_block_sweep_has_a_row_per_block_with_its_downsampling_flag():
    model = _net()
    x, y = _data()
    df = single_block_sweep(model, x, y, n_resamples=30)
    anat = anatomy(model)
    assert list(df["deleted"]) == anat.names == list(df["block"])
    assert list(df["downsampling"]) == [b.downsampling for b in anat.blocks]
    assert (df["k"] == 1).all()
    assert set(METRIC_COLUMNS) <= set(df.columns)
    _check_intervals(df)
    direct = evaluate_deletion_sets(model, [[i] for i in range(len(anat.blocks))], x, y)
    np.testing.assert_allclose(df["kl"], direct.kl.mean(axis=1), rtol=1e-12)
    assert df.attrs["intact_error"] == direct.intact_error.mean()


def test_k_random_sweep_is_seeded_and_deletes_k_distinct_blocks():
    model = _net()
    x, y = _data()
    a = k_random_sweep(model, x, y, ks=[1, 3], n_sets=4, seed=7, n_resamples=20)
    b = k_random_sweep(model, x, y, ks=[1, 3], n_sets=4, seed=7, n_resamples=20)
    assert a.equals(b)
    assert list(a["k"]) == [1] * 4 + [3] * 4 and list(a["set"]) == [0, 1, 2, 3] * 2
    names = set(anatomy(model).names)
    for deleted, k in zip(a["deleted"], a["k"]):
        parts = deleted.split("+")
        assert len(set(parts)) == k and set(parts) <= names
    with pytest.raises(ValueError, match="0..6"):
        k_random_sweep(model, x, y, ks=[7], n_sets=1)


def test_all_subsets_sweep_enumerates_every_set_or_says_it_was_capped():
    model = _net()
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = all_subsets_sweep(model, x, y, k=2, cap=100, n_resamples=20)
    assert len(full) == math.comb(6, 2) and not full["capped"].any() and not full.attrs["capped"]
    assert full["deleted"].is_unique
    with pytest.warns(UserWarning, match="15 sets of 2 of 6 blocks exceed cap=5"):
        capped = all_subsets_sweep(model, x, y, k=2, cap=5, n_resamples=20)
    assert len(capped) == 5 and capped["capped"].all() and capped.attrs["n_subsets"] == 15
    assert capped["deleted"].is_unique and set(capped["deleted"]) <= set(full["deleted"])


def test_reorder_sweep_reports_kendall_tau_of_each_order():
    model = _net(depth=20)
    x, y = _data()
    df = reorder_sweep(model, x, y, k_swaps=[0, 2], n_sets=3, n_resamples=20)
    assert list(df["k_swaps"]) == [0, 0, 0, 2, 2, 2]
    assert (df.loc[df["k_swaps"] == 0, "kendall_tau"] == 1.0).all()
    assert (df.loc[df["k_swaps"] == 0, "kl"] == 0.0).all()
    for order, tau in zip(df["order"], df["kendall_tau"]):
        order = [int(i) for i in order.split()]
        assert tau == pytest.approx(stats.kendalltau(range(len(order)), order).statistic)
        assert tau == kendall_tau(order)
    _check_intervals(df)


def test_closing_each_highway_gate_is_deleting_its_block():
    model = _net("highway")
    x, y = _data()
    gates = gate_closing_sweep(model, x, y, n_resamples=20)
    deleted = single_block_sweep(model, x, y, n_resamples=20)
    assert list(gates["gate_closed"]) == anatomy(model).names
    for m in METRIC_COLUMNS:
        np.testing.assert_array_equal(gates[m], deleted[m])
    with pytest.raises(ValueError, match="needs a gate in every block"):
        gate_closing_sweep(_net("residual"), x, y)


def test_sweeps_restore_the_training_mode_and_reject_unknown_options():
    model = _net().train()
    x, y = _data()
    single_block_sweep(model, x, y, n_resamples=10)
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="valid options: .*max_batch"):
        single_block_sweep(model, x, y, max_batches=3)


def test_bootstrap_interval_is_scipys_and_is_seeded():
    values = np.random.default_rng(0).random((3, 50))
    values[1] = 0.25  # constant: a degenerate interval
    mean, lo, hi = bootstrap_mean_ci(values, n_resamples=99, seed=3)
    again = bootstrap_mean_ci(values, n_resamples=99, seed=3)
    for a, b in zip((mean, lo, hi), again):
        np.testing.assert_array_equal(a, b)
    assert lo[1] == hi[1] == mean[1] == 0.25
    direct = stats.bootstrap((values[0],), np.mean, n_resamples=99, method="percentile",
                             rng=np.random.default_rng(3)).confidence_interval
    assert (lo[0], hi[0]) == pytest.approx((direct.low, direct.high), rel=1e-12)
    with pytest.raises(ValueError, match="percentile, basic, BCa"):
        bootstrap_mean_ci(values, method="normal")


def _error_rows(n=40):
    """0/1 rows (a variant's per-example errors) with 1, 4, ..., 37 errors, and two constant rows among
    them (all right, all wrong) that get no resampling."""
    rng = np.random.default_rng(0)
    ks = [1, 4, 7, 10, 13, 0, 16, 19, 22, 25, n, 28, 31, 34, 37]
    values = np.zeros((len(ks), n))
    for row, k in zip(values, ks):
        row[:k] = 1
        rng.shuffle(row)
    return values, np.array(ks)


@pytest.mark.parametrize("chunks", ["one call", "rows in chunks of 3", "resamples in batches"])
@pytest.mark.parametrize("method", ["percentile", "basic"])
@pytest.mark.parametrize("level", [0.5, 0.9, 0.99])
def test_bootstrap_intervals_of_error_rates_are_binomial_quantiles(monkeypatch, chunks, method, level):
    """Resampling n examples of which k are errors gives a mean distributed as Binomial(n, k/n) / n, so
    the percentile interval's ends are its (1 -/+ level) / 2 quantiles (the basic interval mirrors them
    about the mean), to one step of 1/n with 2,000 resamples. Every row is checked, however the rows
    and resamples are split between calls to scipy."""
    values, ks = _error_rows()
    n, resamples = values.shape[1], 2000
    limit = {"one call": bootstrap._MAX_ELEMENTS, "rows in chunks of 3": 3 * n * resamples,
             "resamples in batches": n * resamples // 4}[chunks]
    monkeypatch.setattr(bootstrap, "_MAX_ELEMENTS", limit)
    calls = []
    real = bootstrap.stats.bootstrap

    def counted(data, *args, **kwargs):
        calls.append((len(data[0]), kwargs["batch"]))
        return real(data, *args, **kwargs)
    monkeypatch.setattr(bootstrap.stats, "bootstrap", counted)
    mean, lo, hi = bootstrap_mean_ci(values, n_resamples=resamples, confidence_level=level, method=method, seed=1)
    varied = (ks > 0) & (ks < n)
    expected_calls = {"one call": [(varied.sum(), resamples)], "rows in chunks of 3": [(3, resamples)] * 4 + [(1, resamples)],
                      "resamples in batches": [(1, resamples // 4)] * varied.sum()}[chunks]
    assert calls == expected_calls
    np.testing.assert_array_equal(mean, ks / n)
    q_lo = stats.binom.ppf((1 - level) / 2, n, ks / n) / n
    q_hi = stats.binom.ppf((1 + level) / 2, n, ks / n) / n
    if method == "basic":
        q_lo, q_hi = 2 * mean - q_hi, 2 * mean - q_lo
    np.testing.assert_allclose(lo[varied], q_lo[varied], rtol=0, atol=1 / n + 1e-9)
    np.testing.assert_allclose(hi[varied], q_hi[varied], rtol=0, atol=1 / n + 1e-9)
    assert (hi[varied] - lo[varied] > 0).all()
    np.testing.assert_array_equal(lo[~varied], mean[~varied])
    np.testing.assert_array_equal(hi[~varied], mean[~varied])


def test_a_sweeps_confidence_level_sets_its_intervals():
    """The sweep's intervals are bootstrap_mean_ci's at the requested level, narrower at 0.5 than at 0.99."""
    model = _net()
    x, y = _data(40)
    per_example = evaluate_deletion_sets(model, [[i] for i in range(6)], x, y)
    widths = {}
    for level in (0.5, 0.99):
        df = single_block_sweep(model, x, y, n_resamples=400, confidence_level=level, seed=2)
        assert df.attrs["confidence_level"] == level
        for m in ("error", "loss", "kl"):
            _, lo, hi = bootstrap_mean_ci(getattr(per_example, m), n_resamples=400, confidence_level=level, seed=2)
            np.testing.assert_array_equal(df[f"{m}_lo"], lo)
            np.testing.assert_array_equal(df[f"{m}_hi"], hi)
        widths[level] = (df["loss_hi"] - df["loss_lo"]).to_numpy()
    assert (widths[0.5] < 0.7 * widths[0.99]).all()
