"""Linear CKA from the unbiased HSIC estimator, streamed over minibatches (resnet_probe.similarity), and the
similarity study built on it.

The references are written here from the definitions: the closed form of HSIC_1 in NumPy, the
U-statistic over distinct index tuples it equals (Song et al. 2012), the population CKA of a Gaussian
pair, explicit forwards through the block anatomy. Everything is float64, so tolerances are tight.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import check_report

from resnet_probe.models import anatomy, build_model
from resnet_probe.similarity import MinibatchCKA, block_grams, gram, hsic_matrix, stream_block_cka, unbiased_hsic
from resnet_probe.studies import similarity
from resnet_probe.studies.command import main
from resnet_probe.studies.inputs import StudyModel, Zoo

pytestmark = pytest.mark.usefixtures("one_thread")    # small float64 matrices: see conftest.one_thread


def _rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hsic1(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC_1 of Song et al. 2012 / Nguyen et al. 2021, written out for linear kernels."""
    n = len(x)
    k, l = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    ones = np.ones(n)
    return float((np.trace(k @ l) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
                  - 2.0 / (n - 2) * (ones @ k @ l @ ones)) / (n * (n - 3)))


def cka_of_means(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """CKA of the HSIC_1 averaged over minibatches (x_b, y_b)."""
    xy = np.mean([hsic1(x, y) for x, y in pairs])
    xx = np.mean([hsic1(x, x) for x, _ in pairs])
    yy = np.mean([hsic1(y, y) for _, y in pairs])
    return float(xy / np.sqrt(xx * yy))


def block_outputs(net, x: torch.Tensor) -> list[np.ndarray]:
    """Each block's output flattened per image (float64), by an explicit forward through the anatomy."""
    anat, out = anatomy(net), []
    with torch.no_grad():
        h = anat.stem(x)
        for blk in anat.blocks:
            h = blk.module(h)
            out.append(h.reshape(len(x), -1).double().numpy())
    return out


def test_cka_is_one_after_an_orthogonal_transform_or_a_scaling():
    x = torch.randn(40, 30, dtype=torch.float64, generator=_rng())
    q, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64, generator=_rng(1)))
    acc = MinibatchCKA(3)
    for part in range(0, 40, 8):   # streamed too: the identity holds per minibatch
        xb = x[part:part + 8]
        acc.update([xb, xb @ q, -3.7 * xb])
    assert torch.allclose(acc.cka(), torch.ones(3, 3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_hsic1_is_the_u_statistic_over_distinct_index_tuples():
    """HSIC_1 = mean k_ij l_ij + mean k_ij l_qr - 2 mean k_ij l_iq over distinct indices (Song et al. 2012)."""
    n = 7
    x = torch.randn(n, 5, dtype=torch.float64, generator=_rng(2))
    y = torch.randn(n, 3, dtype=torch.float64, generator=_rng(3)) + x[:, :3]
    k, l = (x @ x.T).numpy(), (y @ y.T).numpy()
    t1 = np.mean([k[i, j] * l[i, j] for i, j in itertools.permutations(range(n), 2)])
    t2 = np.mean([k[i, j] * l[q, r] for i, j, q, r in itertools.permutations(range(n), 4)])
    t3 = np.mean([k[i, j] * l[i, q] for i, j, q in itertools.permutations(range(n), 3)])
    assert unbiased_hsic(gram(x), gram(y)).item() == pytest.approx(t1 + t2 - 2 * t3, rel=1e-12)


def test_one_minibatch_of_all_images_is_the_full_batch_unbiased_estimate():
    x = torch.randn(50, 20, dtype=torch.float64, generator=_rng(4))
    y = x[:, :10] @ torch.randn(10, 15, dtype=torch.float64, generator=_rng(5)) + torch.randn(
        50, 15, dtype=torch.float64, generator=_rng(6))
    acc = MinibatchCKA(2)
    acc.update([x, y])
    assert acc.hsic[0, 1].item() == pytest.approx(hsic1(x.numpy(), y.numpy()), rel=1e-12)
    assert acc.cka()[0, 1].item() == pytest.approx(cka_of_means([(x.numpy(), y.numpy())]), rel=1e-12)


def test_the_streamed_estimate_is_the_cka_of_the_mean_per_minibatch_estimates():
    x = torch.randn(60, 20, dtype=torch.float64, generator=_rng(7))
    y = torch.tanh(x[:, :12]) + 0.5 * torch.randn(60, 12, dtype=torch.float64, generator=_rng(8))
    acc = MinibatchCKA(2)
    batches = [(x[i:i + 12], y[i:i + 12]) for i in range(0, 60, 12)]
    for xb, yb in batches:
        acc.update([xb, yb])
    expected = cka_of_means([(xb.numpy(), yb.numpy()) for xb, yb in batches])
    assert acc.minibatches == 5 and acc.examples == 60
    assert acc.cka()[0, 1].item() == pytest.approx(expected, rel=1e-12)
    assert acc.cka()[0, 1].item() != pytest.approx(cka_of_means([(x.numpy(), y.numpy())]), rel=1e-6)


def test_minibatches_of_four_are_finite_and_estimate_the_population_cka():
    """x ~ N(0, I_10), y = x[:, :5] + noise: population linear CKA = ||C_xy||^2 / (||C_xx|| ||C_yy||) = sqrt(1/2) / 2.

    The mean of minibatch-4 unbiased HSICs finds it; the same average of the biased estimator (Kornblith's,
    centered Gram matrices) does not.
    """
    n = 8000
    x = torch.randn(n, 10, dtype=torch.float64, generator=_rng(0))
    y = x[:, :5] + torch.randn(n, 5, dtype=torch.float64, generator=_rng(1))
    acc = MinibatchCKA(2)
    biased = np.zeros(3)
    h = np.eye(4) - 1.0 / 4
    for i in range(0, n, 4):
        xb, yb = x[i:i + 4], y[i:i + 4]
        acc.update([xb, yb])
        k, l = (xb @ xb.T).numpy(), (yb @ yb.T).numpy()
        biased += [np.trace(k @ h @ l @ h), np.trace(k @ h @ k @ h), np.trace(l @ h @ l @ h)]
    cka = acc.cka()[0, 1].item()
    assert np.isfinite(acc.cka().numpy()).all()
    assert cka == pytest.approx(np.sqrt(0.5) / 2, abs=0.03)
    assert biased[0] / np.sqrt(biased[1] * biased[2]) > np.sqrt(0.5) / 2 + 0.2


def test_fewer_than_four_examples_are_refused_with_the_reason():
    acc = MinibatchCKA(2)
    x = torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least 4 examples"):
        acc.update([x, x])
    net = build_model("residual", depth=8).eval()
    with pytest.raises(ValueError, match="minibatch must be at least 4"):
        stream_block_cka([net], torch.randn(8, 3, 32, 32), minibatch=3)


def test_the_state_does_not_grow_with_the_number_of_images():
    acc = MinibatchCKA(3)

    def state_bytes() -> int:
        return sum(v.numel() * v.element_size() for v in vars(acc).values() if isinstance(v, torch.Tensor))

    acc.update(torch.stack([gram(torch.randn(8, 100)) for _ in range(3)]))
    one = state_bytes()
    for _ in range(200):
        acc.update(torch.stack([gram(torch.randn(8, 100)) for _ in range(3)]))
    assert state_bytes() == one == 3 * 3 * 8
    assert acc.examples == 201 * 8


def test_hsic1_needs_no_centering():
    x = torch.randn(30, 6, dtype=torch.float64, generator=_rng(9))
    y = torch.randn(30, 4, dtype=torch.float64, generator=_rng(10)) + x[:, :4]
    shifted = x + torch.randn(6, dtype=torch.float64, generator=_rng(11)) * 10
    h = hsic_matrix(torch.stack([gram(x), gram(y), gram(shifted)]))
    assert h[2, 1].item() == pytest.approx(h[0, 1].item(), rel=1e-9)
    assert h[2, 2].item() == pytest.approx(h[0, 0].item(), rel=1e-9)


def test_a_constant_representation_has_no_cka():
    x = torch.randn(12, 5, dtype=torch.float64)
    acc = MinibatchCKA(2)
    acc.update([x, torch.ones(12, 5, dtype=torch.float64)])
    assert torch.isnan(acc.cka()[0, 1]) and acc.cka()[0, 0].item() == pytest.approx(1.0, abs=1e-12)


# ---- block outputs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {f: build_model(f, depth=8).eval() for f in ("plain", "residual", "highway")}


def test_block_grams_are_the_grams_of_the_block_outputs_and_change_no_output(nets):
    net = nets["highway"]
    x = torch.randn(6, 3, 32, 32, generator=_rng(12))
    anat = anatomy(net)
    expected = [torch.from_numpy(o @ o.T) for o in block_outputs(net, x)]
    with torch.no_grad():
        expected_logits = net(x)
        with block_grams(net) as rec:
            logits = net(x)
            grams = rec.take()
    assert torch.equal(logits, expected_logits)
    assert grams.shape == (len(anat.blocks), 6, 6) and grams.dtype == torch.float64
    assert torch.allclose(grams, torch.stack(expected), rtol=1e-12, atol=0)
    assert all(not b.module._forward_hooks for b in anat.blocks)


def test_block_grams_removes_its_hooks_when_the_body_raises(nets):
    net = nets["residual"]
    with pytest.raises(RuntimeError, match="no output recorded"):
        with block_grams(net) as rec:
            rec.take()
    assert all(not b.module._forward_hooks for b in anatomy(net).blocks)


def test_a_net_compared_with_itself_has_a_symmetric_heat_map_with_ones_on_the_diagonal(nets):
    x = torch.randn(24, 3, 32, 32, generator=_rng(13))
    net = nets["plain"]
    result = stream_block_cka([net, net], x, minibatch=8)
    within, cross = result.between(0, 0), result.between(0, 1)
    assert result.minibatches == 3 and result.examples == 24 and within.shape == (3, 3)
    for grid in (within, cross):
        assert np.allclose(np.diag(grid), 1.0, rtol=0, atol=1e-12)
        assert np.allclose(grid, grid.T, rtol=0, atol=1e-12)
    assert np.allclose(cross, within, rtol=0, atol=1e-12)
    assert (within < 1 - 1e-6).any()        # different blocks are not identical


def test_cka_between_two_nets_equals_an_explicit_computation(nets):
    x = torch.randn(16, 3, 32, 32, generator=_rng(14))
    a, b = nets["plain"], nets["residual"]
    result = stream_block_cka([a, b], x, minibatch=8)
    oa, ob = block_outputs(a, x), block_outputs(b, x)
    for i, j in [(0, 0), (1, 2), (2, 1)]:
        expected = cka_of_means([(oa[i][s:s + 8], ob[j][s:s + 8]) for s in (0, 8)])
        assert result.between(0, 1)[i, j] == pytest.approx(expected, rel=1e-9)


# ---- the study ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def similarity_run(tiny_zoo, tiny_data, tmp_path_factory):
    """The similarity study on the tiny zoo's depth-14 nets and residual-8 (no partner of its depth here)."""
    models = [m for m in tiny_zoo.zoo.models if m.depth == 14] + [
        m for m in tiny_zoo.zoo.models if m.name == "residual-8"]
    settings = similarity.SimilaritySettings(n_examples=48, minibatch=12)
    return similarity.run(settings, Zoo(models), tiny_data, out=tmp_path_factory.mktemp("runs"))


def test_similarity_tables_agree_with_an_explicit_minibatch_computation(similarity_run, tiny_data):
    check_report(similarity_run.path, {"models", "cka_blocks", "cka_pairs", "summary"})
    x, _ = tiny_data.evaluation(48, 0, "similarity")
    blocks, pairs = similarity_run.tables["cka_blocks"], similarity_run.tables["cka_pairs"]
    nets = {m.name: m.model for m in similarity_run.zoo.models}

    def explicit(a, i, b, j):
        return cka_of_means([(a[i][s:s + 12], b[j][s:s + 12]) for s in range(0, 48, 12)])

    res, plain = block_outputs(nets["residual-14"], x), block_outputs(nets["plain-14"], x)
    row = blocks[(blocks["model"] == "residual-14") & (blocks["block"] == 2) & (blocks["other_block"] == 5)]
    assert row["value"].item() == pytest.approx(explicit(res, 1, res, 4), rel=1e-9)
    assert (row["minibatches"].item(), row["images"].item()) == (4, 48)
    row = pairs[(pairs["model_a"] == "plain-14") & (pairs["model_b"] == "residual-14") & (pairs["block"] == 3)
                & (pairs["other_block"] == 3)]
    assert row["value"].item() == pytest.approx(explicit(plain, 2, res, 2), rel=1e-9)
    for _, g in blocks.groupby("model"):                      # every heat map: unit diagonal, symmetric
        grid = g.pivot_table(index="block", columns="other_block", values="value").to_numpy()
        assert np.allclose(np.diag(grid), 1.0, atol=1e-12) and np.allclose(grid, grid.T, atol=1e-12)


def test_pairs_of_the_same_depth_are_compared_and_labelled(similarity_run):
    pairs = similarity_run.tables["cka_pairs"]
    assert set(pairs["pair"]) == {"plain-14 vs highway-14", "plain-14 vs residual-14",
                                        "highway-14 vs residual-14"}     # residual-8 has no partner
    assert set(pairs["kind"]) == {"two families"} and pairs["aligned"].all()
    summary = similarity_run.tables["summary"]
    same = summary[summary["metric"] == "same_block_cka"].set_index("pair")["value"]
    diag = pairs[pairs["block"] == pairs["other_block"]].groupby("pair")["value"].mean()
    assert np.allclose(same.sort_index(), diag.sort_index())


def test_pairs_setting_chooses_the_nets_compared():
    def net(name, family, depth, seed=0):
        return StudyModel(name, torch.nn.Identity(), seed, family, depth)
    p20, r20, r20b, r8 = (net("plain-20", "plain", 20), net("residual-20", "residual", 20),
                          net("residual-20", "residual", 20, seed=1), net("residual-8", "residual", 8))
    assert similarity.paired(p20, r20, "same_depth") and not similarity.paired(r20, r8, "same_depth")
    assert similarity.paired(r20, r8, "all") and not similarity.paired(p20, r20, "none")
    assert similarity.comparison(r20, r20b) == ("residual-20 vs residual-20", "two seeds")
    assert similarity.comparison(p20, r20)[1] == "two families"
    tv = [net("resnet18 (random init)", "resnet18", -1), net("resnet50 (random init)", "resnet50", -1)]
    assert not similarity.paired(*tv, "same_depth") and similarity.paired(tv[0], tv[0], "same_depth")


@pytest.mark.parametrize("argv, message", [
    (["--settings.minibatch", "3"], "minibatch must be at least 4"),
    (["--settings.n_examples", "1001"], "n_examples must be a positive multiple of minibatch (100)"),
    (["--settings.pairs", "some"], "--settings.pairs: expected one of same_depth, all, none; got some"),
])
def test_bad_settings_exit_2_in_one_line_before_any_run_folder(argv, message, tmp_path, capsys):
    code = main("similarity", [*argv, "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_summaries_are_read_from_the_heat_maps(similarity_run):
    blocks, summary = similarity_run.tables["cka_blocks"], similarity_run.tables["summary"]
    grid = blocks[blocks["model"] == "plain-14"].pivot_table(index="block", columns="other_block",
                                                             values="value").to_numpy()
    got = summary[summary["model"] == "plain-14"].set_index("metric")["value"]
    assert got["neighbour_cka"] == pytest.approx(np.mean([grid[i, i + 1] for i in range(5)]))
    assert got["first_last_cka"] == pytest.approx(grid[0, 5])
    assert got["later_half_cka"] == pytest.approx(np.mean([grid[i, j] for i in (3, 4, 5) for j in (3, 4, 5) if i != j]))
    assert got["earlier_half_cka"] == pytest.approx(np.mean([grid[i, j] for i in (0, 1, 2) for j in (0, 1, 2)
                                                             if i != j]))
