"""Under DDP (2 gloo ranks on CPU), probes give the statistics of one process over all the data."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from resnet_probe.models import build_model
from resnet_probe.probes import probe

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 3, 16, 16, generator=g)


def _model():
    torch.manual_seed(0)
    return build_model("highway", 8).eval()


def _measure(model, batches):
    """Responses of every batch, plus activation gradients of the summed squared logits (one step)."""
    with probe(model, metrics=("response", "gradient")) as session:
        for x in batches:
            model(x).square().sum().backward()
        session.record_gradients(step=0)
        if dist.is_initialized():
            session.all_reduce()
    return session.table()


def _rank(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x = _data()
        half = x[:6] if rank == 0 else x[6:]
        batches = [half[:4], half[4:]] if rank == 0 else [half[:1], half[1:]]  # different batch sizes
        _measure(_model(), batches).to_pickle(os.path.join(out, f"rank{rank}.pkl"))
    finally:
        dist.destroy_process_group()


def _compared(df: pd.DataFrame) -> pd.DataFrame:
    keep = df[df.metric != "param_grad_norm"]  # parameter gradients are DDP's own all-reduce
    return keep.set_index(["site", "kind", "metric"])["value"].sort_index()


def test_two_gloo_ranks_with_half_the_data_each_equal_one_process_with_all(tmp_path):
    single = _compared(_measure(_model(), [_data()]))  # first: the forked ranks inherit its imports
    mp.start_processes(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in (0, 1):
        ranked = _compared(pd.read_pickle(tmp_path / f"rank{rank}.pkl"))
        assert ranked.index.equals(single.index)
        pd.testing.assert_series_equal(ranked, single, rtol=1e-6, atol=0)
    kinds = set(single.index.get_level_values("kind"))
    assert {"layer", "branch", "shortcut", "out", "gate", "ratio", "gradient"} <= kinds


_LIGHTNING_SCRIPT = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path

    out = Path(sys.argv[1])
    written, recording = [], [True]

    def audit(event, args):
        if not recording[0]:
            return
        if event == "open" and args[0] is not None and str(args[0]).startswith(str(out)):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (flags and flags & (os.O_WRONLY | os.O_RDWR)):
                written.append(str(args[0]))
        elif event == "os.rename" and str(args[1]).startswith(str(out)):
            written.append(str(args[1]))

    sys.addaudithook(audit)
    import torch
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset
    from resnet_probe.train.module import CifarClassifier
    from resnet_probe.probes.callback import ProbeCallback

    torch.set_num_threads(1)
    if sys.argv[2] == "dataloader":  # torch DataLoaders: Lightning gives each rank its part
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(48, 3, 16, 16, generator=g), torch.randint(0, 10, (48,), generator=g)
        data = dict(train_dataloaders=DataLoader(TensorDataset(x[:16], y[:16]), batch_size=4),
                    val_dataloaders=DataLoader(TensorDataset(x[16:], y[16:]), batch_size=4))
        val_images = x[16:]
    else:  # the data module's resident loaders shard by rank themselves; 31 images split 16 / 15
        from resnet_probe.data import CifarDataModule, make_synthetic, normalize
        dm = CifarDataModule.from_source(make_synthetic(n_train=64, n_test=8, seed=0), val_size=31,
                                         train_limit=16, batch_size=4, eval_batch_size=8, seed=0)
        data = dict(datamodule=dm)
        val_images = normalize(dm.splits()["val"][0])
    module = CifarClassifier(family="residual", depth=8, recipe="fast", epochs=1, seed=0)
    trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=out / "run",  # the run folder
                         callbacks=[ProbeCallback(every_n_epochs=1, every_n_steps=1)])
    trainer.fit(module, **data)
    rank = trainer.global_rank
    if rank == 0:
        torch.save(module.model.state_dict(), out / "weights.pt")
        torch.save(val_images, out / "val.pt")
    recording[0] = False
    files = sorted(set(written))
    (out / f"written-rank{rank}.json").write_text(json.dumps(files))
''')


@pytest.mark.parametrize("data", ["dataloader", "resident"])
def test_lightning_ddp_probe_callback_equals_one_process_and_only_rank0_writes(tmp_path, data):
    script = tmp_path / "fit_ddp.py"
    script.write_text(_LIGHTNING_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), MASTER_PORT=str(_free_port()))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), data], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    written = {r: json.loads((tmp_path / f"written-rank{r}.json").read_text()) for r in (0, 1)}
    assert written[1] == []
    run = tmp_path / "run"
    assert {Path(p).name for p in written[0] if Path(p).parent == run} >= {
        "probe_responses.csv", "probe_gradients.csv"}
    assert sorted(p.name for p in run.iterdir()) == ["probe_gradients.csv", "probe_responses.csv"]

    responses = pd.read_csv(run / "probe_responses.csv")
    assert list(responses.columns[:8]) == ["run", "seed", "model", "site", "metric", "value", "step", "epoch"]
    assert set(responses.epoch) == {0} and set(responses.model) == {"residual-8"}

    model = build_model("residual", 8)
    model.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    model.eval()
    with torch.no_grad(), probe(model) as session:
        model(torch.load(tmp_path / "val.pt", weights_only=True))
    single = session.table().set_index(["site", "kind", "metric"])["value"].sort_index()
    ddp = responses.set_index(["site", "kind", "metric"])["value"].sort_index()
    assert ddp.index.equals(single.index)
    pd.testing.assert_series_equal(ddp, single, rtol=1e-6, atol=0)

    gradients = pd.read_csv(run / "probe_gradients.csv")
    assert set(gradients.step) == {0, 1}  # 16 images, 2 ranks, batches of 4: two optimisation steps
    assert set(gradients.metric) == {"param_grad_norm", "activation_grad_norm", "param_norm", "param_count",
                                     "activation_count"}
    assert (gradients.value > 0).all()


@pytest.mark.compiled
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("device,taps", [("cpu", True), ("cpu", False), pytest.param("cuda", True, marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_probe_callback_records_in_the_compiled_network_the_values_of_an_eager_run(tmp_path, one_thread,
                                                                                     device, taps):
    """``CifarClassifier(compile=True)`` runs its network through torch.compile (on the CPU by opt-in).
    Every step runs compiled: steps 0 and 2 record gradient norms through the blocks' gradient taps (one
    graph with the sinks as inputs, the same sink tensors at both steps), step 1 runs without them (a
    second graph); neither breaks. Those norms and the validation responses (recorded eagerly, by
    hooks) equal those of an eager run, in float64. When another session holds the taps' slots, the
    callback's taps are hooks, and its recording steps run eagerly: one graph."""
    import pytorch_lightning as pl
    from torch._dynamo.utils import counters

    from resnet_probe.data import CifarDataModule, make_synthetic
    from resnet_probe.models import anatomy
    from resnet_probe.models.compiled import compiled_module
    from resnet_probe.probes.callback import ProbeCallback
    from resnet_probe.train.module import CifarClassifier

    class SinkWatch(pl.Callback):  # the sinks the blocks hold while the probe callback records
        def __init__(self):
            self.sinks = []

        def on_after_backward(self, trainer, pl_module):
            held = [b.module.grad_sink for b in anatomy(pl_module.model).blocks]
            if held[0] is not None:
                self.sinks.append(held)

    tables = {}
    for name in ("eager", "compiled"):
        dm = CifarDataModule.from_source(make_synthetic(n_train=64, n_test=8, seed=0), val_size=16, batch_size=16,
                                         eval_batch_size=16, augment=False, seed=0)
        module = CifarClassifier(family="residual", depth=8, recipe="fast", epochs=1, seed=0,
                                 compile=name == "compiled")
        watch = SinkWatch()
        trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_epochs=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, precision="64-true",  # compiled kernels round like eager ones
                             callbacks=[ProbeCallback(every_n_epochs=1, every_n_steps=2, out_dir=tmp_path / name),
                                        watch])
        torch._dynamo.reset()
        counters.clear()
        holder = None if taps else probe(module.model, metrics="gradient")
        trainer.fit(module, datamodule=dm)
        assert (module.compiled is not None) == (name == "compiled") and compiled_module(module.model) is None
        if name == "compiled":
            assert counters["stats"]["unique_graphs"] == 1 + taps and not counters["graph_break"]
            if device == "cuda":  # every variant ran as a CUDA graph (a CPU graph always counts a skip)
                assert not counters["inductor"]["cudagraph_skips"]
        if taps:
            first, second = watch.sinks
            assert all(a is b and a.data_ptr() == b.data_ptr() for a, b in zip(first, second))
        if holder is not None:
            holder.close()
        tables[name] = {t: pd.read_csv(tmp_path / name / f"probe_{t}.csv").set_index(["site", "metric", "step"])
                        ["value"].sort_index() for t in ("gradients", "responses")}
    for t in ("gradients", "responses"):
        assert len(tables["eager"][t]) > 0
        pd.testing.assert_series_equal(tables["compiled"][t], tables["eager"][t], rtol=1e-9 if device == "cpu" else 1e-7)
    assert set(tables["eager"]["gradients"].index.get_level_values("step")) == {0, 2}


def test_probe_callback_detaches_on_exception_and_accepts_a_network_compiled_in_place():
    """The callback's hooks are gone after an exception; a network compiled in place is probed (its
    recording epochs and hook steps run under the "force_eager" stance), not refused."""
    from resnet_probe.probes.callback import ProbeCallback
    from resnet_probe.train.module import CifarClassifier

    module = CifarClassifier(family="plain", depth=8, recipe="fast", epochs=1)
    callback = ProbeCallback(every_n_epochs=1, every_n_steps=1)
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.model.modules())  # noqa: E731
    callback.setup(None, module, "fit")
    assert hooks() == 0  # disarmed until a step or an epoch records
    callback.session.arm(response=True, gradient=True)
    assert hooks() > 0
    callback.on_exception(None, module, KeyboardInterrupt())
    assert hooks() == 0

    module.model.compile()  # in place (nothing is compiled before the first call)
    callback.setup(None, module, "fit")
    callback.session.arm(response=True)
    assert hooks() > 0
    callback.teardown(None, module, "fit")
    assert hooks() == 0 and callback.session is None
    with pytest.raises(ValueError, match="every_n_steps must be a non-negative integer"):
        ProbeCallback(every_n_steps=-1)
