"""Run folders, tidy tables, figures, reports and their rebuild: statements about the report API."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from importlib import metadata
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from resnet_probe.report import (FIGURE_KINDS, RunFolderError, combine_runs, new_run, open_run, rebuild,
                                 rebuild_main)
from resnet_probe.report import folder as folder_mod
from resnet_probe.report.provenance import git_revision
from resnet_probe.report.render import SYNTHETIC_WARNING

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMG_RE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
SYNTHETIC = {"name": "synthetic", "kind": "synthetic", "synthetic": True, "description": "built-in 10-class set"}


def curves_table() -> pd.DataFrame:
    """Train / test error of two nets over three seeds, long form."""
    rng = np.random.default_rng(0)
    rows = [dict(run="r0", seed=seed, model=model, site="net", metric="error", split=split, step=step,
                 value=0.1 + 0.8 * np.exp(-step / 300) + (0.05 if model == "plain-56" else 0)
                 + (-0.02 if split == "train" else 0) + rng.normal(0, 0.01))
            for model in ("plain-56", "residual-56") for seed in range(3)
            for step in range(0, 1200, 200) for split in ("train", "test")]
    return pd.DataFrame(rows)


def response_table() -> pd.DataFrame:
    """Per-block response std of two nets, two seeds, with the downsampling blocks flagged."""
    rng = np.random.default_rng(1)
    rows = [dict(run="r0", seed=seed, model=model, site=f"stage{b // 3 + 1}.block{b % 3 + 1}.branch",
                 metric="response_std", value=abs(rng.normal(1.0 if model == "plain-20" else 0.4, 0.1)), step=0,
                 layer=b + 1, downsampling=b in (3, 6), lo=np.nan, hi=np.nan)
            for model in ("plain-20", "residual-20") for seed in range(2) for b in range(9)]
    df = pd.DataFrame(rows)
    df["lo"], df["hi"] = df["value"] - 0.05, df["value"] + 0.05
    return df


def surface_table() -> pd.DataFrame:
    """Loss surfaces of two nets on a 5 x 5 grid (a bowl, and a bowl with a ripple)."""
    axis = np.linspace(-1, 1, 5)
    rows = [dict(run="r0", seed=0, model=model, site="network", metric="loss", alpha=a, beta=b,
                 value=1 + a * a + b * b + (0.3 * np.sin(6 * a) if model == "plain-56" else 0.0))
            for model in ("plain-56", "residual-56") for a in axis for b in axis]
    return pd.DataFrame(rows)


def make_full_run(out: Path, data: dict | None = None):
    """A run with one figure of every kind, finished."""
    run = new_run("demo", out=out, config={"depths": [20, 56], "lr": 0.1, "out": out},
                  data=data or {"name": "pack", "kind": "pack", "synthetic": False}, source_file=__file__)
    run.add_table("curves", curves_table())
    run.add_table("response", response_table())
    run.add_figure("curves", "line", "curves", x="step", hue="model", style="split", col="model",
                   dashes={"train": [4, 2], "test": ""}, xlabel="iteration", ylabel="error", title="Fig. 1 layout")
    run.add_figure("response_bars", "bar", "response", x="site", hue="model", lo="lo", hi="hi",
                   flag="downsampling", query="seed == 0", ylabel="response std")
    run.add_figure("response_profile", "layer_profile", "response", x="layer", hue="model", flag="downsampling",
                   section="Response std", caption="He et al. Fig. 7 layout")
    run.add_figure("seed_scatter", "scatter", "response", x="layer", y="value", hue="model", style="downsampling")
    run.add_figure("heat", "heatmap", "response", x="layer", y="model", query="seed == 1")
    run.add_table("surface", surface_table())
    run.add_figure("surfaces", "contour", "surface", x="alpha", y="beta", col="model", logz=True, marker=[0, 0])
    run.add_text("Response std", "Residual branches respond *less* than plain layers.")
    run.add_headline(pd.DataFrame({"model": ["plain-56", "residual-56"], "test error": ["13.0 %", "8.1 %"]}),
                     title="Final error")
    run.finish()
    return run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return make_full_run(tmp_path_factory.mktemp("full"))


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_png(path_or_bytes, min_px: int = 100) -> np.ndarray:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    assert data[:8] == PNG_SIGNATURE
    img = mpimg.imread(io.BytesIO(data), format="png")
    assert img.shape[0] > min_px and img.shape[1] > min_px
    assert img[..., :3].std() > 0.01, "the image is blank"
    return img


# ---- run folders ------------------------------------------------------------------------------
def test_each_run_gets_a_new_folder_and_earlier_runs_are_untouched(tmp_path, full_run):
    out = full_run.path.parents[1]
    before = snapshot(full_run.path)
    second, third = new_run("demo", out=out), new_run("demo", out=out)
    assert len({full_run.path, second.path, third.path}) == 3
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", second.path.name)
    second.add_table("t", pd.DataFrame({"metric": ["m"], "value": [1.0]}))
    second.finish()
    assert snapshot(full_run.path) == before


def test_a_name_clash_in_the_same_second_retries_with_a_new_id(tmp_path, monkeypatch):
    ids = iter(["aaaaaa", "aaaaaa", "bbbbbb"])
    monkeypatch.setattr(folder_mod.secrets, "token_hex", lambda n: next(ids))
    first = folder_mod.make_run_dir(tmp_path, "s")
    second = folder_mod.make_run_dir(tmp_path, "s")
    assert first.name.endswith("aaaaaa") and second.name.endswith("bbbbbb")


def test_an_unwritable_output_raises_naming_it_and_leaves_nothing(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(RunFolderError, match="afile"):
        new_run("demo", out=tmp_path / "afile" / "runs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_output_folder_raises_naming_it(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(RunFolderError, match="ro"):
            new_run("demo", out=ro)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_an_interrupted_study_leaves_its_folder_marked_incomplete(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with new_run("demo", out=tmp_path) as run:
            run.add_table("t", pd.DataFrame({"metric": ["m", "m"], "value": [1.0, 2.0], "step": [0, 1]}))
            run.add_figure("t", "line", "t", x="step")
            raise KeyboardInterrupt
    status = json.loads((run.path / "status.json").read_text())
    assert status["state"] == "interrupted" and not (run.path / "report.html").exists()
    unfinished = new_run("demo", out=tmp_path)  # a killed study never reaches finish()
    assert json.loads((unfinished.path / "status.json").read_text())["state"] == "running"
    html = rebuild(run.path).read_text()  # what was saved can still be drawn, marked incomplete
    assert "incomplete" in html and len(IMG_RE.findall(html)) == 1
    assert json.loads((run.path / "status.json").read_text())["state"] == "interrupted"


# ---- tables -----------------------------------------------------------------------------------
def test_tidy_tables_round_trip_with_their_dtypes(tmp_path):
    df = pd.DataFrame({"run": ["r", "r", "r"], "seed": [0, 1, 2], "model": ["NA", "resnet-20", "plain"],
                       "site": ["stage1.block1.branch", None, "layer3.4"], "metric": ["response_std"] * 3,
                       "value": [0.1234567890123, np.nan, 1e-12], "step": [0, 10, 20],
                       "downsampling": [True, False, True]})
    run = new_run("tables", out=tmp_path)
    path = run.add_table("resp", df)
    back = run.table("resp")
    pd.testing.assert_frame_equal(back, df, check_dtype=True)
    assert list(pd.read_csv(path).columns) == list(df.columns)
    assert open_run(run.path).table("resp").equals(back)


BAD_TABLES = [
    (pd.DataFrame({"model": ["a"], "value": [1.0]}), "metric"),
    (pd.DataFrame({"metric": ["a"], "error": [1.0]}), "value"),
    (pd.DataFrame({"metric": ["a"], "value": ["high"]}), "numeric"),
    (pd.DataFrame({"metric": ["a"], "value": [1.0]}).set_index("metric"), "reset_index"),
    (pd.DataFrame({"metric": [], "value": []}), "empty"),
]


def test_non_tidy_tables_are_refused_with_the_reason(tmp_path):
    run = new_run("tables", out=tmp_path)
    for bad, message in BAD_TABLES:
        with pytest.raises(ValueError, match=message):
            run.add_table("bad", bad)
    assert not list((run.path / "tables").iterdir()) and run.tables == []


# ---- figures and reports ----------------------------------------------------------------------
def test_every_figure_is_a_valid_png_embedded_once_in_the_html(full_run):
    names = [f["name"] for f in full_run.figures]
    assert {f["kind"] for f in full_run.figures} == set(FIGURE_KINDS)
    html = (full_run.path / "report.html").read_text()
    embedded = IMG_RE.findall(html)
    assert len(embedded) == len(names)
    files = {n: (full_run.path / "figures" / f"{n}.png").read_bytes() for n in names}
    for data in files.values():
        assert_png(data)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(files.values())
    md = (full_run.path / "report.md").read_text()
    assert all(f"figures/{n}.png" in md for n in names)
    assert "He et al. Fig. 7 layout" in html and "Residual branches respond <em>less</em>" in html
    assert "<th>test error</th>" in html and "| plain-56 | 13.0 % |" in md
    assert SYNTHETIC_WARNING not in html


def test_provenance_is_recorded_and_shown(full_run):
    prov = json.loads((full_run.path / "provenance.json").read_text())
    assert prov["argv"] == sys.argv and prov["config"]["depths"] == [20, 56]
    assert prov["config"]["out"] == str(full_run.path.parents[1])
    for dist, shown in (("pandas", "pandas"), ("seaborn", "seaborn"), ("torch", "torch"),
                        ("pytorch-lightning", "pytorch_lightning"), ("captum", "captum"), ("scipy", "scipy")):
        assert prov["packages"][shown] == metadata.version(dist)
    assert prov["hardware"]["cores"] == os.cpu_count() and prov["hardware"]["cpu"]
    assert prov["wall_s"] >= 0 and prov["finished"] >= prov["started"]
    assert prov["data"]["kind"] == "pack"
    src = full_run.path / prov["source"]["file"]
    assert src.read_bytes() == Path(__file__).read_bytes()
    assert prov["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    head = (subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
            if shutil.which("git") else None)
    rev = prov["git"]["revision"]
    assert rev == (head.stdout.strip() if head is not None and head.returncode == 0 else None)
    assert prov["study_git"] is None  # this test file lives in the package's own repository
    html = (full_run.path / "report.html").read_text()
    assert "<h2>Provenance</h2>" in html and f"pandas {pd.__version__}" in html
    assert (rev[:12] if rev else prov["git"]["note"]) in html


def test_git_revision_outside_a_repository_says_so(tmp_path):
    assert git_revision(tmp_path) == {"revision": None, "dirty": None, "note": "not a git repository"}


def test_synthetic_data_puts_a_loud_banner_on_both_reports(tmp_path):
    run = new_run("demo", out=tmp_path)
    run.set_data(SYNTHETIC)
    run.add_table("t", pd.DataFrame({"metric": ["m"], "value": [1.0]}))
    html = run.finish().read_text()
    md = (run.path / "report.md").read_text()
    assert 'class="banner synthetic"' in html and SYNTHETIC_WARNING in html
    assert md.splitlines()[4] == f"> **WARNING: {SYNTHETIC_WARNING}**"
    assert html.index("banner synthetic") < html.index("<h2>")


def test_bad_figure_specs_are_refused_naming_the_valid_choices(tmp_path):
    run = new_run("demo", out=tmp_path)
    run.add_table("t", pd.DataFrame({"metric": ["m", "m"], "value": [1.0, 2.0], "step": [0, 1]}))
    with pytest.raises(ValueError, match="valid kinds: line, bar"):
        run.add_figure("f", "pie", "t", x="step")
    with pytest.raises(ValueError, match=r"columns: \['metric', 'value', 'step'\]"):
        run.add_figure("f", "line", "t", x="epoch")
    with pytest.raises(ValueError, match="valid keys"):
        run.add_figure("f", "line", "t", x="step", colour="red")
    with pytest.raises(ValueError, match="selects no rows"):
        run.add_figure("f", "line", "t", x="step", query="step > 5")
    with pytest.raises(KeyError, match="no table 'u'"):
        run.add_figure("f", "line", "u", x="step")
    assert run.figures == []


class HtmlTree(HTMLParser):
    """An HTML fragment as nested ``(tag, href, children)`` tuples; text nodes stripped, inner whitespace collapsed."""

    def __init__(self):
        super().__init__()
        self.stack = [("root", None, [])]

    def handle_starttag(self, tag, attrs):
        node = (tag, dict(attrs).get("href"), [])
        self.stack[-1][2].append(node)
        if tag not in ("img", "br", "hr"):
            self.stack.append(node)

    def handle_endtag(self, tag):
        if tag not in ("img", "br", "hr"):
            assert self.stack.pop()[0] == tag

    def handle_data(self, data):
        text = re.sub(r"\s+", " ", data).strip()
        if text:
            self.stack[-1][2].append(text)

    @classmethod
    def of(cls, fragment: str) -> list:
        parser = cls()
        parser.feed(fragment)
        parser.close()
        return parser.stack[0][2]


def _(tag, *children, href=None):
    return (tag, href, list(children))


def section_html(html: str, title: str) -> str:
    start = html.index(f"<h2>{title}</h2>") + len(f"<h2>{title}</h2>")
    return html[start:html.index("<h2>", start)]


def test_study_markdown_renders_tables_code_emphasis_lists_and_links(tmp_path):
    run = new_run("demo", out=tmp_path)
    run.add_table("t", pd.DataFrame({"metric": ["m"], "value": [1.0]}))
    run.add_text("Constructs", "Error is **lower** for `resnet-56`, *as* in "
                 "[He et al.](https://arxiv.org/abs/1512.03385).\n\n"
                 "| model | error |\n|---|---|\n| plain-56 | 13.0 % |\n| `residual-56` | 6.97 % |\n\n"
                 "- one\n- two with _emphasis_\n\n1. first\n2. second\n\n```\nx < y\n```")
    html = run.finish().read_text()
    row = lambda tag, a, b: _("tr", _(tag, a), _(tag, b))  # noqa: E731
    assert HtmlTree.of(section_html(html, "Constructs")) == [
        _("p", "Error is", _("strong", "lower"), "for", _("code", "resnet-56"), ",", _("em", "as"), "in",
          _("a", "He et al.", href="https://arxiv.org/abs/1512.03385"), "."),
        _("table", _("thead", row("th", "model", "error")),
          _("tbody", row("td", "plain-56", "13.0 %"), _("tr", _("td", _("code", "residual-56")), _("td", "6.97 %")))),
        _("ul", _("li", "one"), _("li", "two with", _("em", "emphasis"))),
        _("ol", _("li", "first"), _("li", "second")),
        _("pre", _("code", "x < y")),
    ]


def test_html_in_study_texts_is_shown_as_text_and_never_runs(tmp_path):
    attack = "<script>alert(1)</script> <img src=x onerror=alert(2)> [click](javascript:alert(3))"
    run = new_run("demo", out=tmp_path, title="<script>alert(4)</script>")
    run.add_table("t", pd.DataFrame({"metric": ["m", "m"], "value": [1.0, 2.0], "step": [0, 1]}))
    run.add_text("Attack", attack)
    run.add_headline(attack)
    run.add_figure("f", "line", "t", x="step", caption=attack)
    html = run.finish().read_text()
    assert "<script" not in html and "<img src=x" not in html and 'href="javascript' not in html
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3 and "&lt;script&gt;alert(4)" in html


# ---- rebuild ----------------------------------------------------------------------------------
def test_rebuild_in_a_fresh_process_without_cuda_or_torch_redraws_identical_figures(tmp_path):
    run = new_run("demo", out=tmp_path)
    run.add_table("curves", curves_table())
    run.add_figure("curves", "line", "curves", x="step", hue="model", style="split")
    run.add_figure("final", "bar", "curves", x="model", hue="split", query="step == 1000")
    run.finish()
    figures = run.path / "figures"
    names = sorted(p.name for p in figures.iterdir())
    original = mpimg.imread(figures / "curves.png")
    (figures / "curves.png").unlink()
    (run.path / "report.html").unlink()
    code = ("import sys; from resnet_probe.report import rebuild_main; rebuild_main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'rebuilding a report imported torch'")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", MPLBACKEND="Agg")
    res = subprocess.run([sys.executable, "-c", code, str(run.path)], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"report: {run.path / 'report.html'}" in res.stdout
    assert sorted(p.name for p in figures.iterdir()) == names
    np.testing.assert_array_equal(mpimg.imread(figures / "curves.png"), original)
    assert len(IMG_RE.findall((run.path / "report.html").read_text())) == len(names)
    assert not [p for p in run.path.rglob("*.tmp*")]


def test_rebuild_of_a_bad_run_folder_exits_with_a_clear_message(tmp_path, capsys):
    expected = {"missing": "does not exist", "not_a_run": "not a run folder", "corrupt": "not valid JSON"}
    for make, message in expected.items():
        target = tmp_path / make / "run"
        if make != "missing":
            target.mkdir(parents=True)
        if make == "corrupt":
            (target / "report.json").write_text("{ not json")
        with pytest.raises(SystemExit) as exc:
            rebuild_main([str(target)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert str(target) in err and message in err


def test_a_combined_report_embeds_the_sub_runs(tmp_path, full_run):
    child = new_run("child", out=tmp_path, data=SYNTHETIC)
    child.add_table("t", pd.DataFrame({"metric": ["m"] * 3, "value": [1.0, 3.0, 2.0], "step": [0, 1, 2]}))
    child.add_figure("t", "line", "t", x="step")
    child.add_headline("**child headline**")
    child.finish()
    parent = new_run("quickstart", out=tmp_path)
    combine_runs(parent, [child, full_run.path], title="Quickstart")
    html = parent.finish().read_text()
    assert "<h1>Quickstart</h1>" in html and "<strong>child headline</strong>" in html
    assert len(IMG_RE.findall(html)) == 1 + len(full_run.figures)
    assert SYNTHETIC_WARNING in html  # one synthetic sub-run marks the whole report
    md = (parent.path / "report.md").read_text()
    links = re.findall(r"\[full report\]\(([^)]+)\)", md)
    assert len(links) == 2 and all((parent.path / link).is_file() for link in links)
    with pytest.raises(RunFolderError, match="not a run folder"):
        combine_runs(parent, [tmp_path])


@pytest.mark.gpu
def test_provenance_names_the_cuda_device(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    run = new_run("demo", out=tmp_path)
    hw = run.provenance["hardware"]
    assert hw["gpu"] == torch.cuda.get_device_name(0) and hw["gpu_count"] == torch.cuda.device_count()
    assert hw["cuda"] == torch.version.cuda
