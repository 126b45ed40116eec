"""Every study's command line: generated from its settings, checked before anything is written, re-runnable.

``resnet-probe STUDY`` and ``studies/STUDY.py`` share one parser per study (jsonargparse over the
settings dataclass): ``--help`` shows the real defaults, ``--print_config`` the resolved settings,
``--scale`` picks the preset and later options win, and a run's recorded command repeats it.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from resnet_probe.report import open_run
from resnet_probe.studies import STUDIES
from resnet_probe.studies.command import build_parser, main, study_command
from resnet_probe.studies.runs import settings_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_answers_help_with_its_real_defaults(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(name, ["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: resnet-probe {name}") and "--print_config" in text and "--scale" in text
    assert "default: None" not in text
    preset = study_command(name).preset("quick")
    first = next(iter(vars(preset)))
    assert f"--settings.{first}" in text


@pytest.mark.parametrize("name", STUDIES)
def test_print_config_shows_the_scale_preset_and_later_options_win(name, capsys):
    with pytest.raises(SystemExit):
        main(name, ["--scale", "paper", "--print_config"])
    paper = yaml.safe_load(capsys.readouterr().out)
    assert paper["scale"] == "paper"
    assert paper["settings"] == settings_dict(study_command(name).preset("paper"))


def test_an_option_after_the_scale_wins():
    cmd = study_command("lesion")
    cfg = build_parser(cmd, "paper").parse_args(["--scale", "paper", "--settings.k_max", "5"])
    assert cfg.settings.k_max == 5 and cfg.settings.n_sets == 100


@pytest.mark.parametrize("argv, message", [
    (["--settings.mode", "sideways"], "--settings.mode: expected one of zero_branch, shortcut_only; got sideways"),
    (["--settings.k_max", "-1"], "k_max must be >= 0"),
    (["--settings.n_sets", "many"], "--settings.n_sets: expected int; got many"),
    (["--nope", "1"], "unrecognized arguments"),
    (["no/such/model.ckpt"], "does not exist"),
    (["--data", "nonsense-spec"], "valid forms"),
    (["--device", "tpu"], "expected one of auto, cpu, cuda; got tpu"),
])
def test_user_errors_exit_2_in_one_line_before_any_run_folder(argv, message, tmp_path, capsys):
    code = main("lesion", [*argv, "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RESNET_PROBE_DEBUG", "1")
    assert main("lesion", ["no/such/model.ckpt", "--out", str(tmp_path)]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_an_unwritable_out_is_refused_before_anything_runs(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main("response_std", ["torchvision:resnet18", "--out", str(blocker / "runs")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_run_repeats_from_its_recorded_command(tiny_zoo, tmp_path):
    """The provenance's command re-runs the study from its config.yaml into a new folder with the same tables."""
    first = main("lesion", [str(tiny_zoo.path / "models" / "residual-8-seed0" / "last.ckpt"), "--scale", "tiny",
                            "--data", "synthetic", "--out", str(tmp_path)])
    assert first == 0
    (run_dir,) = (tmp_path / "lesion").iterdir()
    command = open_run(run_dir).provenance["command"]
    assert command == f"resnet-probe lesion --config {run_dir / 'config.yaml'}"
    done = subprocess.run([sys.executable, "-m", "resnet_probe.cli", *command.split()[1:]], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    second = next(p for p in (tmp_path / "lesion").iterdir() if p != run_dir)
    for table in ("single_block", "k_random", "deletion_per_image"):
        a = pd.read_csv(run_dir / "tables" / f"{table}.csv").drop(columns="run")
        b = pd.read_csv(second / "tables" / f"{table}.csv").drop(columns="run")
        pd.testing.assert_frame_equal(a, b)


def test_every_study_is_a_subcommand_of_the_console_script():
    done = subprocess.run([sys.executable, "-m", "resnet_probe.cli", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert all(f"  {name} " in done.stdout for name in STUDIES)
    script = subprocess.run([sys.executable, str(ROOT / "studies" / "paths.py"), "--help"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert script.returncode == 0 and script.stdout.startswith("usage: resnet-probe paths")
