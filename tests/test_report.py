"""The report: hypervolume and knee math, the HTML page and CSVs of a tiny study, its tables
through open_run, and (when Chromium is installed) the page rendered in a headless browser."""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_study
from slimsearch.search.driver import run_study
from slimsearch.search.report import _hv_slices, hypervolume, write_report
from slimsearch.search.results import Run, knee_index, open_run
from slimsearch.search.results_cli import add_commands
from slimsearch.search.study_file import study_from_mapping
from slimsearch.spaces import CompressionPlan


def test_hypervolume_of_a_known_front() -> None:
    # Two boxes [1,3]x[2,3] and [2,3]x[1,3] overlap in [2,3]x[2,3]: 2 + 2 - 1.
    points = np.array([[1.0, 2.0], [2.0, 1.0]])
    assert hypervolume(points, np.array([3.0, 3.0])) == pytest.approx(3.0)
    # A point outside the reference adds nothing; a dominated one changes nothing.
    more = np.vstack([points, [[4.0, 0.0], [2.5, 2.5]]])
    assert hypervolume(more, np.array([3.0, 3.0])) == pytest.approx(3.0)
    assert hypervolume(np.empty((0, 2)), np.array([3.0, 3.0])) == 0.0


def test_own_hypervolume_matches_optuna_in_3d() -> None:
    rng = np.random.default_rng(0)
    points = rng.random((12, 3))
    reference = np.array([1.1, 1.2, 1.3])
    assert _hv_slices(points, reference) == pytest.approx(hypervolume(points, reference))


def test_knee_is_the_balanced_point() -> None:
    losses = np.array([[0.0, 1.0], [1.0, 0.0], [0.3, 0.35]])
    assert knee_index(losses) == 2
    assert knee_index(np.empty((0, 2))) is None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("study")
    # A tiny model's latency ratios are jitter (a busy machine pushes every one past the default
    # reference of 1.25): a loose latency bound keeps the hypervolume off timing.
    constraints = {"max_accuracy_drop": 10.0, "max_latency_ratio": 100.0}
    run_study(study_from_mapping(tiny_study(root, constraints=constraints)))  # 8 trials: importances
    return open_run(root / "run")


def test_pareto_table_has_objectives_ratios_and_a_column_per_layer_knob(tiny_run: Run) -> None:
    front = tiny_run.pareto()
    assert list(front["trial"]) == tiny_run.front_numbers() and len(front) >= 1
    for column in (
        "accuracy",
        "accuracy_drop",
        "size_bytes",
        "size_bytes_ratio",
        "latency_ms",
        "latency_ms_ratio",
    ):
        assert column in front.columns, column
    assert front["knee"].sum() == 1 and int(front.loc[front["knee"], "trial"].iloc[0]) == tiny_run.knee()
    first = front.iloc[0]
    plan = CompressionPlan.from_dict(tiny_run.trial(int(first["trial"])).user_attrs["plan"])
    assert plan.layers
    for layer, settings in plan.layers.items():
        assert first[f"{layer}:bits"] == settings.bits
        assert first[f"{layer}:sparsity"] == settings.sparsity
        rank = first[f"{layer}:rank"]
        assert (rank is pd.NA and settings.rank is None) or rank == settings.rank
    base = tiny_run.baseline
    assert first["size_bytes_ratio"] == pytest.approx(first["size_bytes"] / base["size_bytes"])


def test_trials_table_lists_every_trial(tiny_run: Run) -> None:
    trials = tiny_run.trials()
    assert list(trials["trial"]) == list(range(8))
    assert set(trials["state"]) == {"COMPLETE"}
    assert trials["on_front"].sum() == len(tiny_run.front_numbers())
    assert (trials["completed_s"].diff().dropna() >= 0).all()
    assert set(trials["source"]) == {"uniform seed"}  # 8 trials: the uniform seeds alone


def test_report_writes_html_with_every_plot_and_csvs(tiny_run: Run, tmp_path: Path) -> None:
    files = write_report(tiny_run, tmp_path / "report.html")
    page = files.html.read_text()
    assert "<script src=" not in page, "plotly.js must be inline so the page works offline"
    assert page.count("Plotly.newPlot") == 5  # projections, 3D, hypervolume, heatmap, importances
    for words in (
        "2D projections",
        "3D view",
        "Hypervolume",
        "per layer",
        "Parameter importances",
        "Knee point",
        "baseline",
        f"--trial {tiny_run.knee()}",
    ):
        assert words in page, words
    front = pd.read_csv(files.front_csv)
    assert list(front["trial"]) == tiny_run.front_numbers() and "knee" in front.columns
    trials = pd.read_csv(files.trials_csv)
    hv = trials["hypervolume_after"]
    assert len(trials) == 8 and (hv.diff().dropna() >= -1e-12).all() and hv.iloc[-1] > 0


def test_report_skips_importances_with_few_trials(tmp_path: Path) -> None:
    run_study(study_from_mapping(tiny_study(tmp_path, budget={"trials": 3})))
    files = write_report(tmp_path / "run")
    page = files.html.read_text()
    assert files.html == tmp_path / "run" / "report.html"
    assert "Parameter importances skipped: 3 complete trials" in page
    assert page.count("Plotly.newPlot") == 4


def test_cli_report_command(tiny_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="slimsearch")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(tiny_run.path), "--out", str(tmp_path / "r.html")])
    assert args.func(args) == 0
    assert (tmp_path / "r.html").is_file() and "report:" in capsys.readouterr().out


# -- in a real browser ------------------------------------------------------------------
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def _browser(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-unsafe-swiftshader",  # software WebGL for the 3D view
        "--virtual-time-budget=5000",  # let plotly finish drawing before the capture
    ]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tiny_run: Run, tmp_path: Path) -> None:
    binary = _chromium()
    assert binary is not None
    files = write_report(tiny_run, tmp_path / "report.html")
    url = files.html.resolve().as_uri()
    dom = _browser(binary, tmp_path / "profile", "--dump-dom", url).stdout
    # Plotly draws each figure into SVG only when its JavaScript ran in the page.
    assert dom.count('class="plot-container plotly"') == 5
    assert dom.count('class="main-svg"') >= 5
    assert "gl-container" in dom  # the 3D scene got a WebGL canvas

    png = tmp_path / "report.png"
    _browser(binary, tmp_path / "profile", f"--screenshot={png}", "--window-size=1400,2000", url)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1400, 2000)
    # A blank page of this size compresses to a few kilobytes; plots, text and tables do not.
    assert len(data) > 60_000, f"the screenshot is nearly blank ({len(data)} bytes)"


def test_hypervolume_credits_no_quality_beyond_the_baseline() -> None:
    from slimsearch.search.results import Axis

    accuracy = Axis("accuracy", True, 80.0, 1.0)
    assert accuracy.volume_loss(81.5) == 0.0 and accuracy.loss(81.5) == pytest.approx(-1.5)
    assert accuracy.volume_loss(79.5) == pytest.approx(0.5)
    perplexity = Axis("perplexity", False, 50.0, 1.1)
    assert perplexity.volume_loss(45.0) == 1.0 and perplexity.volume_loss(55.0) == pytest.approx(1.1)
    size = Axis("size_bytes", False, 100.0, 1.25)  # smaller than the baseline is real, not noise
    assert size.volume_loss(40.0) == pytest.approx(0.4)
