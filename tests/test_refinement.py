"""Iterative refinement (Jastrzebski et al. 2018): per block, cos(F(x), -dL/dF) and ||F(x)|| / ||x|| over the
examples (resnet_probe.probes.refinement), and the refinement study built on it.

The references are written here from the definitions: an explicit forward through the block anatomy (branch,
shortcut, gate, combine), ``torch.autograd.grad`` of the summed cross-entropy with respect to every branch
output, and per-example cosines and norms; a one-block net whose answer is known in closed form.
"""
from __future__ import annotations

import os
import socket

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import check_report
from torch import nn

from resnet_probe.models import GroupedCifarNet, anatomy, build_model, declare_block
from resnet_probe.probes import REFINEMENT_METRICS, probe
from resnet_probe.studies import refinement
from resnet_probe.studies.command import main
from resnet_probe.studies.inputs import Zoo

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(n: int = 6, size: int = 16, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, size, size, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g))


def explicit(model, x, y) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per block: the per-example ``cos(F, -dL/dF)`` and ``||F|| / ||x||``, by autograd on an explicit forward."""
    anat = anatomy(model)
    h = anat.stem(x)
    fs, xs = [], []
    for b in anat.blocks:
        f = b.branch(h)
        fs.append(f)
        xs.append(h)
        h = b.combine(f, b.shortcut(h), b.gate(h))
    loss = F.cross_entropy(anat.head(h), y, reduction="sum")
    grads = torch.autograd.grad(loss, fs)
    out = {}
    for b, f, g, xi in zip(anat.blocks, fs, grads, xs):
        f, g, xi = f.detach().flatten(1), g.flatten(1), xi.detach().flatten(1)
        out[b.name] = (-(f * g).sum(1) / (f.norm(dim=1) * g.norm(dim=1)), f.norm(dim=1) / xi.norm(dim=1))
    return out


def measured(model, batches, reduction: str = "sum") -> pd.DataFrame:
    with probe(model, metrics=("refinement",)) as session:
        for x, y in batches:
            F.cross_entropy(model(x), y, reduction=reduction).backward(inputs=session.refinement.sinks)
    return session.table()


def by_block(table: pd.DataFrame) -> pd.DataFrame:
    return table.pivot_table(index="site", columns="metric", values="value", sort=False)


# ---- the definition ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["residual", "plain", "highway", "preact", "resnet18"])
def test_the_probe_equals_per_example_cosines_and_ratios_by_autograd(family):
    if family == "resnet18":
        from torchvision.models import resnet18
        torch.manual_seed(0)
        model = resnet18(num_classes=10).eval()
        x, y = _batch(3, 32)
    else:
        torch.manual_seed(0)
        model = build_model(family, depth=14).eval()
        x, y = _batch()
    want = explicit(model, x, y)
    got = by_block(measured(model, [(x, y)]))
    assert list(got.index) == list(want)
    assert got.shape[1] == len(REFINEMENT_METRICS)
    for name, (cos, ratio) in want.items():
        row = got.loc[name]
        assert row["refinement_cos_count"] == row["branch_to_input_norm_count"] == len(x)
        np.testing.assert_allclose(row["refinement_cos_mean"], cos.mean().item(), rtol=1e-4, atol=2e-6)
        np.testing.assert_allclose(row["refinement_cos_std"], cos.std().item(), rtol=1e-4, atol=2e-6)
        np.testing.assert_allclose(row["branch_to_input_norm_mean"], ratio.mean().item(), rtol=1e-5)
        np.testing.assert_allclose(row["branch_to_input_norm_std"], ratio.std().item(), rtol=1e-4, atol=1e-7)


def test_downsampling_blocks_are_measured_and_marked():
    torch.manual_seed(0)
    table = measured(build_model("residual", depth=14).eval(), [_batch()])
    marked = table.drop_duplicates("site").set_index("site")["downsampling"]
    assert list(marked[marked].index) == ["stage2.block1", "stage3.block1"]
    assert table["value"].notna().all() and set(table["kind"]) == {"refinement"}


def test_streaming_over_minibatches_equals_one_batch_and_a_mean_loss_changes_no_cosine():
    torch.manual_seed(1)
    model = build_model("residual", depth=8).double().eval()
    x, y = _batch(10, dtype=torch.float64)
    whole = by_block(measured(model, [(x, y)]))
    parts = by_block(measured(model, [(x[:3], y[:3]), (x[3:4], y[3:4]), (x[4:], y[4:])]))
    mean_loss = by_block(measured(model, [(x[:5], y[:5]), (x[5:], y[5:])], reduction="mean"))
    for other in (parts, mean_loss):
        np.testing.assert_allclose(other.to_numpy(), whole.to_numpy(), rtol=1e-9, atol=1e-12)


class _Scale(nn.Module):
    def __init__(self, eta: float):
        super().__init__()
        self.eta = eta

    def forward(self, x):
        return -self.eta * x


class _StepBlock(nn.Module):
    """``x + F(x)`` with ``F(x) = -eta x``: one gradient-descent step on ``L = ||x||^2 / 2``."""

    def __init__(self, eta: float):
        super().__init__()
        self.step = _Scale(eta)

    def forward(self, x):
        return x + self.step(x)


class _StepNet(nn.Module):
    def __init__(self, eta: float):
        super().__init__()
        self.blocks = nn.Sequential(_StepBlock(eta))

    def forward(self, x):
        return self.blocks(x)


declare_block(_StepBlock, branch=["step"], combine="add", layers=["step"])


@pytest.mark.parametrize("eta, cos", [(0.25, 1.0), (0.75, 1.0), (1.5, -1.0)])
def test_a_gradient_descent_step_on_a_quadratic_has_cosine_one_and_ratio_eta(eta, cos):
    """``L = sum_n ||z_n||^2 / 2`` after ``z = x - eta x``: ``dL/dF = z = (1 - eta) x``, so ``F = -eta x`` lies
    along ``-dL/dF`` (cosine 1) for a step shorter than the minimiser's distance and against it (cosine -1)
    for an overshoot; ``||F|| / ||x|| = eta``."""
    net = _StepNet(eta)
    x = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with probe(net, metrics=("refinement",)) as session:
        (net(x).square().sum() / 2).backward(inputs=session.refinement.sinks)
    got = by_block(session.table()).iloc[0]
    assert got["refinement_cos_mean"] == pytest.approx(cos, abs=1e-12)
    assert got["refinement_cos_std"] == pytest.approx(0.0, abs=1e-6)
    assert got["branch_to_input_norm_mean"] == pytest.approx(eta, rel=1e-12)
    assert got["refinement_cos_count"] == 5


def test_an_example_without_gradient_has_no_cosine_but_a_ratio():
    net = _StepNet(0.5)
    x = torch.randn(4, 2, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with probe(net, metrics=("refinement",)) as session:
        out = net(x)
        (out[:3].square().sum() / 2).backward(inputs=session.refinement.sinks)   # example 4 has no loss
    got = by_block(session.table()).iloc[0]
    assert (got["refinement_cos_count"], got["branch_to_input_norm_count"]) == (3, 4)
    assert got["refinement_cos_mean"] == pytest.approx(1.0, abs=1e-12)


def test_a_grouped_net_gives_each_models_own_rows():
    torch.manual_seed(0)
    nets = [build_model("highway", depth=8).eval() for _ in range(2)]
    grouped = GroupedCifarNet.from_models(nets).eval()
    x, y = _batch(4)
    with probe(grouped, metrics=("refinement",)) as session:
        logits = grouped(x)                                    # (S, N, classes), one shared batch
        sum(F.cross_entropy(lg, y, reduction="sum") for lg in logits).backward(inputs=session.refinement.sinks)
    table = session.table()
    for s, net in enumerate(nets):
        mine = by_block(table[table["model_index"] == s])
        np.testing.assert_allclose(mine.to_numpy(), by_block(measured(net, [(x, y)])).to_numpy(), rtol=2e-4,
                                   atol=1e-6)


# ---- the probe's contract -----------------------------------------------------------------------------

def test_probing_refinement_changes_no_output_and_removes_its_hooks_also_on_an_exception():
    torch.manual_seed(0)
    model = build_model("residual", depth=8).eval()
    x, y = _batch()
    with torch.no_grad():
        expected = model(x)
    with probe(model, metrics=("refinement",)) as session:
        logits = model(x)
        F.cross_entropy(logits, y).backward()
    assert torch.equal(logits.detach(), expected)
    assert all(p.grad is not None for p in model.parameters())   # a plain backward still trains
    with pytest.raises(KeyError):
        with probe(model, metrics=("refinement",)):
            raise KeyError("boom")
    assert session.closed
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_recorded_steps_label_their_rows_and_a_forward_without_backward_adds_nothing():
    torch.manual_seed(0)
    model = build_model("residual", depth=8).eval()
    x, y = _batch()
    with probe(model, metrics=("refinement",)) as session:
        with torch.no_grad():
            model(x)
        assert session.table().empty
        F.cross_entropy(model(x), y).backward()
        session.record_refinement(step=7)
        F.cross_entropy(model(x[:2]), y[:2]).backward()
    table = session.table()
    counts = table[table["metric"] == "refinement_cos_count"].groupby("step", dropna=False)["value"].first()
    assert counts.loc[7] == len(x) and counts.loc[pd.NA] == 2
    with pytest.raises(ValueError, match="metrics=\\('refinement',\\)"):
        probe(model).record_refinement()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_model():
    torch.manual_seed(0)
    return build_model("residual", depth=8).double().eval()   # float64: one batch or two give the same sums


def _ddp_measure(batches):
    model = _ddp_model()
    with probe(model, metrics=("refinement",)) as session:
        for x, y in batches:
            F.cross_entropy(model(x), y, reduction="sum").backward()
        if dist.is_initialized():
            session.all_reduce()
    return session.table()


def _rank(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x, y = _batch(8, dtype=torch.float64)
        part = slice(0, 5) if rank == 0 else slice(5, 8)       # unequal shares
        _ddp_measure([(x[part], y[part])]).to_pickle(os.path.join(out, f"rank{rank}.pkl"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_with_part_of_the_data_each_equal_one_process_with_all(tmp_path):
    single = _ddp_measure([_batch(8, dtype=torch.float64)]).set_index(["site", "metric"])["value"].sort_index()
    mp.start_processes(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in (0, 1):
        ranked = pd.read_pickle(tmp_path / f"rank{rank}.pkl").set_index(["site", "metric"])["value"].sort_index()
        pd.testing.assert_series_equal(ranked, single, rtol=1e-9, atol=1e-12)


@pytest.mark.filterwarnings("ignore")
def test_the_callback_records_training_steps_equal_to_an_explicit_train_mode_computation(tmp_path):
    import copy

    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from resnet_probe.probes.callback import REFINEMENT_CSV, ProbeCallback
    from resnet_probe.train.module import CifarClassifier

    x, y = _batch(16)
    module = CifarClassifier(family="residual", depth=8, recipe="paper", max_steps=2, warmup=False, seed=3)
    start = copy.deepcopy(module.model).train()
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[ProbeCallback(every_n_epochs=0, every_n_steps=0, refinement_every_n_steps=1,
                                                  out_dir=tmp_path)])
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=8))
    rows = pd.read_csv(tmp_path / REFINEMENT_CSV)
    assert sorted(rows["step"].unique()) == [0, 1] and set(rows["seed"]) == {3}
    first = rows[rows["step"] == 0].set_index(["site", "metric"])["value"]
    for name, (cos, ratio) in explicit(start, x[:8], y[:8]).items():      # BN in train mode, as in the step
        assert first[(name, "refinement_cos_count")] == 8
        assert first[(name, "refinement_cos_mean")] == pytest.approx(cos.mean().item(), rel=1e-4, abs=2e-6)
        assert first[(name, "branch_to_input_norm_mean")] == pytest.approx(ratio.mean().item(), rel=1e-5)


# ---- the study ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def refinement_run(tiny_zoo, tiny_data, tmp_path_factory):
    models = [m for m in tiny_zoo.zoo.models if m.depth == 14]
    return refinement.run(refinement.RefinementSettings.tiny(), Zoo(models), tiny_data,
                          out=tmp_path_factory.mktemp("runs"))


def test_the_study_tables_are_the_probe_on_the_evaluation_images(refinement_run, tiny_data):
    check_report(refinement_run.path, {"models", "refinement", "summary"})
    s = refinement.RefinementSettings.tiny()
    x, y = tiny_data.evaluation(s.n_examples, 0, "refinement")
    table = refinement_run.tables["refinement"]
    nets = {m.name: m.model for m in refinement_run.zoo.models}
    assert set(table["model"]) == {"plain-14", "highway-14", "residual-14"}
    want = explicit(nets["residual-14"], x, y)
    mine = table[table["model"] == "residual-14"].set_index(["site", "metric"])["value"]
    for name, (cos, ratio) in want.items():
        assert mine[(name, "refinement_cos_mean")] == pytest.approx(cos.mean().item(), rel=1e-4, abs=2e-6)
        assert mine[(name, "branch_to_input_norm_mean")] == pytest.approx(ratio.mean().item(), rel=1e-5)
    blocks = table[table["model"] == "residual-14"].drop_duplicates("site")
    assert list(blocks["block_index"]) == list(range(1, 7))


def test_the_summary_is_read_from_the_per_block_table(refinement_run):
    table, summary = refinement_run.tables["refinement"], refinement_run.tables["summary"]
    res = table[(table["model"] == "residual-14") & (table["metric"] == "refinement_cos_mean")]
    got = summary[summary["model"] == "residual-14"].set_index("metric")["value"]
    assert got["mean_cos"] == pytest.approx(res["value"].mean())
    assert got["refining_blocks"] == pytest.approx((res["value"] > 0).mean())
    ratio = table[(table["model"] == "residual-14") & (table["metric"] == "branch_to_input_norm_mean")]
    ratio = ratio.sort_values("block_index")["value"].to_numpy()
    assert got["ratio_first_block"] == pytest.approx(ratio[0])
    assert got["ratio_later_blocks"] == pytest.approx(ratio[1:].mean())


@pytest.mark.parametrize("argv, message", [
    (["--settings.batch_size", "0"], "batch_size must be positive"),
    (["--settings.n_examples", "0"], "n_examples must be positive"),
])
def test_bad_settings_exit_2_in_one_line_before_any_run_folder(argv, message, tmp_path, capsys):
    code = main("refinement", [*argv, "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
