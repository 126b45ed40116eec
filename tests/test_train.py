"""Training: the module's metrics, recipes' schedules, checkpoints, the CLI and exact resume."""
from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback

from resnet_probe.checkpoints import load_model
from resnet_probe.data import CifarDataModule, make_synthetic, write_pack
from resnet_probe.train import CifarClassifier, PaperSchedule, build_optimization, train_quick
from resnet_probe.train.fit import quiet_lightning

ROOT = Path(__file__).resolve().parents[1]


def tiny_data(**kwargs) -> CifarDataModule:
    kwargs = {"batch_size": 32, "val_size": 64, "eval_batch_size": 64, **kwargs}
    return CifarDataModule.from_source(make_synthetic(n_train=320, n_test=64, seed=0), **kwargs)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    model, metrics = train_quick("residual", 8, data=tiny_data(), epochs=2, out_dir=out, log_every_n_steps=3)
    return model, metrics, out


# ---- the module --------------------------------------------------------------------------------

def test_hparams_are_primitives_only():
    model = CifarClassifier("highway", 14, recipe="fast", epochs=3)
    assert all(v is None or isinstance(v, (str, int, float, bool)) for v in model.hparams.values())
    assert model.hparams.family == "highway" and model.model.family == "highway"


def test_epoch_metrics_equal_a_direct_evaluation(tiny_run):
    """The device-side running sums give the same val loss / error as evaluating the model afresh."""
    model, metrics, _ = tiny_run
    dm = tiny_data()
    dm.setup()
    losses, wrong, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            logits = model(x)
            losses += F.cross_entropy(logits, y, reduction="sum").item()
            wrong += int((logits.argmax(1) != y).sum())
            n += len(y)
    assert n == 64
    assert metrics["val_error"] == pytest.approx(wrong / n, abs=1e-7)
    assert metrics["val_loss"] == pytest.approx(losses / n, rel=1e-5)
    assert metrics["val_accuracy"] == pytest.approx(1 - wrong / n, abs=1e-7)
    assert metrics["steps"] == 2 * 8 and metrics["synthetic"] is True


def test_metrics_csv_has_per_epoch_and_every_n_step_rows(tiny_run):
    _, metrics, out = tiny_run
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    epochs = {}
    for row in rows:
        for key in ("train_loss", "train_error", "val_loss", "val_error"):
            if row.get(key):
                epochs.setdefault(int(row["epoch"]), {})[key] = float(row[key])
    assert sorted(epochs) == [0, 1] and all(len(v) == 4 for v in epochs.values())
    assert epochs[1]["val_error"] == pytest.approx(metrics["val_error"], abs=1e-6)
    step_rows = [int(r["step"]) for r in rows if r.get("train_loss_step")]
    assert step_rows == [3, 6, 9, 12, 15]  # read every log_every_n_steps, never per step


def test_checkpoint_loads_weights_only_and_rebuilds_identical_logits(tiny_run):
    model, _, out = tiny_run
    ckpt = out / "checkpoints" / "last.ckpt"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["hyper_parameters"]["depth"] == 8
    x = torch.randn(5, 3, 32, 32)
    rebuilt = CifarClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    plain_torch, info = load_model(ckpt)  # the same file through the Lightning-free loader
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(rebuilt(x), expected)
        assert torch.equal(plain_torch(x), expected)
    assert info["kind"] == "project" and info["arch"] == "residual-8"


def test_train_quick_is_deterministic_on_cpu(tiny_run):
    model, metrics, _ = tiny_run
    again, metrics_again = train_quick("residual", 8, data=tiny_data(), epochs=2, log_every_n_steps=3)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert metrics_again["val_loss"] == metrics["val_loss"]


# ---- recipes -----------------------------------------------------------------------------------

def _lrs(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_paper_milestones_divide_lr_at_half_and_three_quarters():
    param = torch.nn.Parameter(torch.zeros(1))
    opt, sched = build_optimization([param], "paper", 64_000, depth=56)
    assert isinstance(sched, PaperSchedule) and not sched.warming_up
    assert sched.milestones == [32_000, 48_000]
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 1e-4
    opt, sched = build_optimization([param], "paper", 400, depth=56)
    lrs = _lrs(sched, 400)
    assert lrs[0] == lrs[199] == pytest.approx(0.1)
    assert lrs[200] == lrs[299] == pytest.approx(0.01)
    assert lrs[300] == lrs[399] == pytest.approx(0.001)


def test_paper_warmup_returns_to_base_lr_once_train_error_is_below_80_percent():
    param = torch.nn.Parameter(torch.zeros(1))
    _, sched = build_optimization([param], "paper", 64_000, depth=110)
    assert sched.warming_up
    lrs = _lrs(sched, 50)
    assert set(lrs) == {0.01}
    assert sched.observe_train_error(0.85)  # still above 80 %: warm-up goes on
    assert _lrs(sched, 10) == [0.01] * 10
    assert not sched.observe_train_error(0.79)  # below: back to 0.1 for the very next step
    assert sched.warmup_ended_at == 60
    assert _lrs(sched, 10) == pytest.approx([0.1] * 10)
    assert not sched.observe_train_error(0.99)  # it never returns to warm-up
    assert sched.get_last_lr() == pytest.approx([0.1])


def test_depth_below_110_has_no_warmup_unless_asked():
    param = torch.nn.Parameter(torch.zeros(1))
    assert not build_optimization([param], "paper", 100, depth=56)[1].warming_up
    assert build_optimization([param], "paper", 100, depth=56, warmup=True)[1].warming_up
    assert not build_optimization([param], "paper", 100, depth=1202, warmup=False)[1].warming_up


def test_fast_recipe_is_one_cycle():
    param = torch.nn.Parameter(torch.zeros(1))
    opt, sched = build_optimization([param], "fast", 100, lr=0.4)
    lrs = _lrs(sched, 100)
    peak = max(range(100), key=lrs.__getitem__)
    assert opt.defaults["nesterov"] and 20 <= peak <= 30 and lrs[peak] == pytest.approx(0.4)
    assert lrs[0] == pytest.approx(0.04) and lrs[-1] < 0.04 / 50
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))


@pytest.mark.parametrize("decay", [False, True])
def test_highway_gate_biases_are_not_weight_decayed_unless_asked(decay):
    """One SGD step with zero gradients: decayed parameters shrink by lr * wd, b_T stays unless asked."""
    module = CifarClassifier("highway", 8, recipe="paper", lr=0.1, weight_decay=0.5, momentum=0.0,
                             gate_bias_decay=decay)
    optimizer = module.configure_optimizers()["optimizer"]
    named = dict(module.model.named_parameters())
    gate, conv = named["stage1.0.gate.conv.bias"], named["stage1.0.branch.conv1.weight"]
    before = gate.detach().clone(), conv.detach().clone()
    for p in module.model.parameters():
        p.grad = torch.zeros_like(p)
    lr = optimizer.param_groups[0]["lr"]   # the schedule's lr of the first step
    optimizer.step()
    assert lr > 0 and torch.allclose(conv, before[1] * (1 - lr * 0.5))
    assert torch.allclose(gate, before[0] * (1 - lr * 0.5)) if decay else torch.equal(gate, before[0])


def test_unknown_recipe_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid recipes: paper, fast"):
        CifarClassifier(recipe="adam")


@pytest.mark.parametrize("options,compiled_with", [({}, {"mode": "reduce-overhead", "dynamic": False}),
                                                   ({"compile_mode": "default"}, {"mode": "default", "dynamic": False}),
                                                   ({"compile": False}, None)])
def test_on_cuda_the_network_is_compiled_beside_it_unless_told_not_to_in_the_mode_given(monkeypatch, options,
                                                                                      compiled_with):
    """What ``_prepare_device`` does when the Trainer has put the module on a GPU (the device is set by
    hand here; ``torch.compile`` is recorded, not run): channels_last, then the compiled network held
    beside ``model``, which stays the eager module, in the mode given; static shapes."""
    from resnet_probe.train.grouped import GroupedClassifier

    calls = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: calls.append((module, kw)) or module)
    for module in (CifarClassifier(depth=8, **options), GroupedClassifier(depth=8, seeds=[0, 1], **options)):
        calls.clear()
        model = module.model
        module._device = torch.device("cuda", 0)  # what the Trainer sets when it moves the module to a GPU
        module._prepare_device()
        module._prepare_device()  # once per device type
        assert calls == ([(model, compiled_with)] if compiled_with else [])
        assert module.model is model and (module.compiled is not None) == bool(compiled_with)
        assert list(module.state_dict()) == [f"model.{k}" for k in model.state_dict()]
        assert module.model.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_on_the_cpu_compilation_is_opt_in_and_says_it_is_experimental(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    eager, compiled = CifarClassifier(depth=8), CifarClassifier(depth=8, compile=True)
    eager._prepare_device()
    assert eager.compiled is None
    with pytest.warns(UserWarning, match=r"CifarClassifier\(compile=True\) on the CPU is experimental"):
        compiled._prepare_device()
    assert compiled.compiled is not None and not compiled.model.stem.conv.weight.is_contiguous(
        memory_format=torch.channels_last)


def test_an_unknown_compile_mode_names_the_valid_ones():
    from resnet_probe.train.grouped import GroupedClassifier

    with pytest.raises(ValueError, match="valid modes: reduce-overhead, default, max-autotune, "
                                         "max-autotune-no-cudagraphs"):
        CifarClassifier(compile_mode="fast")
    with pytest.raises(ValueError, match="unknown compile_mode 'graphs'; valid modes: reduce-overhead"):
        GroupedClassifier(depth=8, seeds=[0, 1], compile_mode="graphs")


class _RecordLR(Callback):
    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_warmup_in_training_is_checked_every_n_steps_then_returns_to_base_lr():
    """A stubbed error signal: any error is 'below' a threshold of 1.01, so the first reading ends it."""
    model = CifarClassifier(depth=8, recipe="paper", max_steps=16, warmup=True, warmup_until_error=1.01,
                            log_every_n_steps=5)
    record = _RecordLR()
    with quiet_lightning():
        trainer = pl.Trainer(max_steps=16, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                             callbacks=[record])
        trainer.fit(model, datamodule=tiny_data(val_size=0))
    # warm-up read at step 5 (never before), back to 0.1, then /10 at 50 % and 75 % of 16 steps
    assert record.lrs == pytest.approx([0.01] * 5 + [0.1] * 3 + [0.01] * 4 + [0.001] * 4)


# ---- command line ------------------------------------------------------------------------------

def test_cli_help_lists_subcommands(capsys):
    from resnet_probe.cli import main
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "report", "inspect"):
        assert f"  {sub} " in out


def test_cli_report_dispatches_to_rebuild_main(monkeypatch):
    import types

    from resnet_probe.cli import main
    seen = []
    fake = types.ModuleType("resnet_probe.report")
    fake.rebuild_main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "resnet_probe.report", fake)
    assert main(["report", "runs/x", "--no-html"]) == 0
    assert seen == [["runs/x", "--no-html"]]


def test_cli_unknown_subcommand_lists_valid_ones(capsys):
    from resnet_probe.cli import main
    assert main(["trian"]) == 2
    assert "valid subcommands: fit, validate, test" in capsys.readouterr().err


def test_run_dir_rules(tmp_path, monkeypatch):
    from resnet_probe.train.cli import RunDirError, resolve_run_dir
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "runs" / "train" / "r1" / "checkpoints" / "epoch=1-step=12.ckpt"
    assert resolve_run_dir(None, "fit", str(ckpt), "residual20") == ckpt.parent.parent
    assert resolve_run_dir(str(tmp_path / "mine"), "fit", "last", "residual20") == tmp_path / "mine"
    with pytest.raises(RunDirError, match="needs --run_dir"):
        resolve_run_dir(None, "fit", "last", "residual20")
    fresh = resolve_run_dir(None, "test", None, "residual20")
    assert fresh.parent == Path("runs") / "train" and fresh.name.startswith("residual20-test-")
    assert fresh.is_dir() and not any(fresh.iterdir())


def test_default_run_folders_started_in_the_same_second_are_two_folders(tmp_path, monkeypatch):
    from resnet_probe.train import cli as train_cli
    monkeypatch.setattr(train_cli.time, "strftime", lambda fmt, *t: "20250101-120000")
    first = train_cli.new_run_dir("residual20-A-s0", root=tmp_path)
    second = train_cli.new_run_dir("residual20-A-s0", root=tmp_path)
    assert first != second and first.is_dir() and second.is_dir()  # each created, not merely named
    assert (first.name, second.name) == ("residual20-A-s0-20250101-120000", "residual20-A-s0-20250101-120000-1")


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory) -> Path:
    """320 synthetic training images (256 after the 64-image validation split: 8 steps of 32 an epoch)."""
    path = tmp_path_factory.mktemp("pack") / "tiny.npz"
    write_pack(path, make_synthetic(n_train=320, n_test=32, seed=1))
    return path


def _tiny_fit_args(pack: Path, max_steps: int = 24) -> list[str]:
    return ["--data.data", str(pack), "--data.val_size", "64", "--data.batch_size", "32",
            "--data.eval_batch_size", "64", "--model.depth", "8", "--model.recipe", "paper",
            "--model.max_steps", str(max_steps), "--model.log_every_n_steps", "4", "--checkpoint_every_n_steps", "4",
            "--trainer.deterministic", "true", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--seed_everything", "0"]


def _sha256s(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_a_folder_holding_a_run_is_refused_before_anything_is_written(tiny_pack, tmp_path, monkeypatch, capsys,
                                                                      subcommand):
    from resnet_probe.cli import main
    from resnet_probe.train.cli import RUN_DIR_ENV
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    run = tmp_path / "finished"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.csv").write_text("epoch,step,val_error\n0,7,0.5\n")
    (run / "config.yaml").write_text("seed_everything: 0\n")
    (run / "hparams.yaml").write_text("depth: 8\n")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    before = _sha256s(run)
    try:
        status = main([subcommand, *_tiny_fit_args(tiny_pack, max_steps=1), "--run_dir", str(run)])
    finally:
        assert _sha256s(run) == before  # nothing deleted, replaced or added, whatever the command did
    assert status == 2
    err = capsys.readouterr().err
    assert f"--run_dir {run} already holds a run" in err and "nothing was written" in err
    assert ("--ckpt_path last" in err) == (subcommand == "fit")


@pytest.mark.parametrize("folder", ["mistyped", "empty"])
def test_resuming_last_without_a_checkpoint_is_an_error_naming_the_folder(tiny_pack, tmp_path, monkeypatch, capsys,
                                                                          folder):
    from resnet_probe.cli import main
    from resnet_probe.train.cli import RUN_DIR_ENV
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    run = tmp_path / folder
    if folder == "empty":
        run.mkdir()
    assert main(["fit", *_tiny_fit_args(tiny_pack, max_steps=2), "--run_dir", str(run), "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err
    state = "does not exist" if folder == "mistyped" else "holds no last.ckpt"
    assert f"--ckpt_path last: run folder {run} {state} (looked in {run / 'checkpoints'})" in err
    assert run.exists() == (folder == "empty") and not (run.exists() and any(run.iterdir()))


def test_cli_inspect_describes_a_checkpoint(tiny_run, capsys):
    from resnet_probe.cli import main
    assert main(["inspect", str(tiny_run[2] / "checkpoints" / "last.ckpt")]) == 0
    out = capsys.readouterr().out
    assert "kind:       project" in out and "residual-8" in out and "stage3.block1" in out


# ---- exact resume after SIGKILL ------------------------------------------------------------------

PAUSE_CALLBACK = textwrap.dedent('''
    import pathlib, time
    from pytorch_lightning.callbacks import Callback

    class PauseAt(Callback):
        """Stops (sleeps) before step ``step`` so the test can SIGKILL a run that is mid-epoch."""
        def __init__(self, step: int, signal_file: str):
            self.step, self.signal_file = step, signal_file
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == self.step:
                pathlib.Path(self.signal_file).write_text(str(batch_idx))
                time.sleep(600)
''')


def _fit(pack: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    """``resnet-probe fit`` of the tiny run (24 steps, 8 an epoch, checkpoints every 4) in a subprocess."""
    cwd = run_dir.parent
    args = [sys.executable, "-m", "resnet_probe.cli", "fit", *_tiny_fit_args(pack), "--run_dir", str(run_dir), *extra]
    env = {**os.environ, "PYTHONPATH": f"{cwd}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1",
           "RESNET_PROBE_CACHE": str(cwd / "cache")}
    env.pop("RESNET_PROBE_RUN_DIR", None)
    log = open(cwd / f"{run_dir.name}-{len(list(cwd.glob(run_dir.name + '-*.log')))}.log", "w")
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log_path = Path(log.name)
    log.close()
    return proc


def _output(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()[-4000:]


def _finish(proc: subprocess.Popen, timeout: float = 600) -> None:
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, _output(proc)


@pytest.fixture(scope="module")
def uninterrupted_fit(tiny_pack, tmp_path_factory) -> Path:
    """The run folder of the tiny fit, run without interruption."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "reference"
    _finish(_fit(tiny_pack, run_dir))
    return run_dir


def _start_paused(pack: Path, tmp: Path, step: int) -> tuple[subprocess.Popen, Path]:
    """Start the tiny fit with a callback that stops it before optimizer step ``step``."""
    (tmp / "pause_cb.py").write_text(PAUSE_CALLBACK)
    signal_file = tmp / f"paused-{step}"
    config = tmp / f"pause-{step}.yaml"
    config.write_text(f"trainer:\n  callbacks:\n    - class_path: pause_cb.PauseAt\n"
                      f"      init_args: {{step: {step}, signal_file: {signal_file}}}\n")
    return _fit(pack, tmp / f"killed-{step}", "--config", str(config)), signal_file


def _kill_when_paused(proc: subprocess.Popen, signal_file: Path) -> None:
    deadline = time.monotonic() + 600
    while not signal_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert signal_file.exists() and proc.returncode == -signal.SIGKILL, _output(proc)


def _assert_resumed_run_equals(run_dir: Path, reference: Path) -> None:
    """Same final weights, bitwise, and the same metrics.csv rows as the uninterrupted run."""
    want = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    got = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert got["global_step"] == want["global_step"] == 24
    assert want["state_dict"].keys() == got["state_dict"].keys()
    for key, value in want["state_dict"].items():
        assert torch.equal(value, got["state_dict"][key]), key
    assert (run_dir / "config.yaml").is_file()
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [r["step"] for r in rows if r.get("train_loss_step")] == [str(s) for s in range(4, 24, 4)]
    assert rows == list(csv.DictReader(open(reference / "metrics.csv")))


def test_sigkilled_run_resumes_to_bitwise_identical_weights(tiny_pack, uninterrupted_fit, tmp_path):
    killed, signal_file = _start_paused(tiny_pack, tmp_path, 12)
    _kill_when_paused(killed, signal_file)
    last = tmp_path / "killed-12" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 12 and state["global_step"] % 8 != 0  # mid-epoch (epoch 1, batch 4)
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["position"] == 4

    _finish(_fit(tiny_pack, tmp_path / "killed-12", "--ckpt_path", "last"))
    # the resumed run's metrics.csv keeps the rows logged before the kill and continues them exactly
    _assert_resumed_run_equals(tmp_path / "killed-12", uninterrupted_fit)


def test_a_run_killed_after_an_epoch_end_resumes_with_each_row_once(tiny_pack, uninterrupted_fit, tmp_path):
    """Killed before step 17: epoch 1 ended at step 16 and the rows of steps 12, 15 (epoch end) and 16
    are written, after the last checkpoint inside an epoch (step 12). The resumed run redoes them once."""
    killed, signal_file = _start_paused(tiny_pack, tmp_path, 17)
    _kill_when_paused(killed, signal_file)
    logged = list(csv.DictReader(open(tmp_path / "killed-17" / "metrics.csv")))
    assert [r["step"] for r in logged if r.get("train_loss_step")] == ["4", "8", "12", "16"]
    assert [r["step"] for r in logged if r.get("val_error")] == ["7", "15"]
    _finish(_fit(tiny_pack, tmp_path / "killed-17", "--ckpt_path", "last"))
    _assert_resumed_run_equals(tmp_path / "killed-17", uninterrupted_fit)


# Learning on real data: tests/test_science.py::test_a_small_residual_net_learns_real_cifar10.


@pytest.mark.gpu
@pytest.mark.compiled
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fast_path_bf16_channels_last_compiled():
    from torch._dynamo.utils import counters

    counters.clear()
    model, metrics = train_quick("residual", 20, data=tiny_data(), epochs=1, compile=True)
    first_conv = model.model.stem.conv.weight
    assert first_conv.is_contiguous(memory_format=torch.channels_last)
    assert metrics["steps"] == 8 and metrics["val_loss"] == metrics["val_loss"]  # finite, not NaN
    assert model.hparams.compile_mode == "reduce-overhead"
    assert counters["stats"]["calls_captured"] > 0 and not counters["graph_break"]
    assert not counters["inductor"]["cudagraph_skips"]  # every compiled graph ran as a CUDA graph
