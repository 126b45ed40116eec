"""Numbers with uncertainty and atomic writes: the small pieces every report relies on."""
from __future__ import annotations

import math
import os
import stat

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from resnet_probe.atomic import atomic_path, atomic_write_bytes, atomic_write_csv, atomic_write_text
from resnet_probe.report import format_ci, format_mean_std, summarise_over_seeds, t_mean_ci
from resnet_probe.report.figure_kinds import aggregate


def test_summarise_over_seeds_agrees_with_numpy_and_scipy():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"model": np.repeat(["plain", "residual"], 5), "metric": "error",
                       "seed": np.tile(range(5), 2), "value": rng.normal(0.1, 0.02, 10)})
    df.loc[len(df)] = {"model": "single", "metric": "error", "seed": 0, "value": 0.5}
    s = summarise_over_seeds(df, ["model", "metric"]).set_index("model")
    for model in ("plain", "residual"):
        x = df.loc[df.model == model, "value"].to_numpy()
        lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
        assert s.loc[model, "n"] == 5
        assert s.loc[model, "mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert s.loc[model, "std"] == pytest.approx(x.std(ddof=1), rel=1e-12)
        assert (s.loc[model, "lo"], s.loc[model, "hi"]) == pytest.approx((lo, hi), rel=1e-12)
    assert s.loc["single", "n"] == 1 and math.isnan(s.loc["single", "std"]) and math.isnan(s.loc["single", "lo"])
    with pytest.raises(KeyError, match="seeds"):
        summarise_over_seeds(df, "seeds")


def test_figure_error_bars_are_the_same_intervals_as_the_seed_summary():
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"model": np.repeat(["a", "b", "c"], [4, 3, 1]), "metric": "m",
                       "value": rng.normal(size=8), "flag": [False] * 5 + [True] * 3})
    bars = aggregate(df, ["model"], "value", {"flag": "flag"}).set_index("model")
    s = summarise_over_seeds(df, "model").set_index("model")
    np.testing.assert_allclose(bars["value"], s["mean"], rtol=1e-12)
    np.testing.assert_allclose(bars[["_lo", "_hi"]].to_numpy(), s[["lo", "hi"]].to_numpy(), rtol=1e-12)
    assert bars["_flag"].tolist() == [False, True, True]
    sd = aggregate(df, ["model"], "value", {"errorbar": "sd"}).set_index("model")
    np.testing.assert_allclose(sd.loc["a", "_hi"] - sd.loc["a", "value"], s.loc["a", "std"], rtol=1e-12)


def test_numbers_are_written_with_their_uncertainty():
    assert format_ci(12.34, 11.8, 12.94, unit="%") == "12.3 % [11.8, 12.9]"
    assert format_ci(0.1234, 0.118, 0.129, percent=True) == "12.3 % [11.8, 12.9]"
    assert format_ci(3.0, math.nan, math.nan, unit="ms") == "3.0 ms"
    assert format_mean_std([0.10, 0.12, 0.14], percent=True) == "12.0 ± 2.0 % (n=3)"
    assert format_mean_std([2.0], digits=2) == "2.00 (n=1)"
    m, lo, hi = t_mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3))


class Boom:
    """A cell whose text representation fails: the writer dies half-way through the file."""

    def __str__(self):
        raise RuntimeError("boom")


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failing_writer_leaves_the_old_file_and_no_temporary_file(tmp_path, error):
    target = tmp_path / "table.csv"
    target.write_text("old contents\n")
    with pytest.raises(error):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new conte")
            raise error("interrupted")
    assert target.read_text() == "old contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_a_csv_writer_that_raises_mid_write_leaves_nothing(tmp_path):
    df = pd.DataFrame({"metric": ["m"] * 5000, "value": np.arange(5000.0), "obj": ["x"] * 4999 + [Boom()]})
    with pytest.raises(RuntimeError, match="boom"):
        atomic_write_csv(df, tmp_path / "t.csv")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_give_complete_files_with_the_usual_permissions(tmp_path):
    atomic_write_text(tmp_path / "a.md", "héllo\n")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_write_csv(pd.DataFrame({"metric": ["m"], "value": [1.5]}), tmp_path / "c.csv.gz")
    assert (tmp_path / "a.md").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert pd.read_csv(tmp_path / "c.csv.gz").to_dict("list") == {"metric": ["m"], "value": [1.5]}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.md").stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "b.bin", "c.csv.gz"]
