"""Report: report.json/md/html from a realistic run report; self-contained HTML; partial reports."""
from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from edgeprune.plots_report import all_plots, pareto_front
from edgeprune.report import render_html, summary_table, write_report

EXAMPLE = Path(__file__).parent / "data" / "report_example.json"


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads(EXAMPLE.read_text())


@pytest.fixture(scope="module")
def written(report, tmp_path_factory) -> dict[str, Path]:
    return write_report(tmp_path_factory.mktemp("run"), report)


def test_writes_three_files_and_json_round_trips(written, report):
    assert set(written) == {"json", "md", "html"} and all(p.is_file() for p in written.values())
    assert json.loads(written["json"].read_text()) == report


def test_markdown_has_one_row_per_artifact_with_budget_verdict(written, report):
    md = written["md"].read_text()
    rows = [line for line in md.splitlines()
            if line.startswith("| ") and any(p in line for p in ("| fp32 |", "| int8 |", "| fp16 |"))]
    assert len(rows) == len(report["artifacts"])
    assert sum("FAIL: accuracy" in r for r in rows) == 1 and sum("| pass |" in r for r in rows) == 5
    assert "21,495,808" in md and "2.11x fewer" in md  # MACs before and reduction
    assert "Scope: inference" in md


def test_html_is_self_contained(written):
    html = written["html"].read_text()
    assert not re.search(r'(src|href)="(https?:)?//', html), "the report must not load anything from the network"
    assert "<script" not in html
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(imgs) == 5  # accuracy-vs-latency, histogram, channels, scores, fine-tuning
    for b64 in imgs:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert html.count('<tr class="fail">') == 1


def test_pareto_front():
    pts = [(1.0, 0.90), (2.0, 0.95), (1.5, 0.89), (3.0, 0.95), (0.5, 0.80)]
    assert pareto_front(pts) == [4, 0, 1]  # by latency; (1.5,.89) and (3,.95) are dominated


def test_summary_table_is_one_screen(report):
    text = summary_table(report)
    assert len(text.splitlines()) <= 30
    assert "jetson-orin-tensorrt" in text and "FAIL: accuracy" in text and "2.11x fewer" in text


def test_partial_report_renders(tmp_path, report):
    minimal = {"run": {"name": "partial"}, "artifacts": [
        {"target": "cpu-onnxruntime", "precision": "fp32", "status": "failed", "error": "CompileError"}]}
    paths = write_report(tmp_path, minimal)
    assert "FAIL (CompileError)" in paths["md"].read_text()
    no_plots = copy.deepcopy(report)
    for key in ("scoring", "prune", "finetune"):
        no_plots.pop(key)
    assert set(all_plots(no_plots)) == {"Accuracy vs p50 latency", "Latency histogram"}
    assert render_html({}).startswith("<!DOCTYPE html>")


def test_report_cli_rerenders_from_json(tmp_path, report):
    from typer.testing import CliRunner

    from edgeprune.cli import app

    (tmp_path / "report.json").write_text(json.dumps(report))
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "report.html").stat().st_size > 10_000 and (tmp_path / "report.md").is_file()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code != 0 and "no report.json" in str(res.exception)


def test_html_renders_in_headless_chromium(written):
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("no Chromium here (apt-get install chromium) to render the HTML")
    shot = written["html"].parent / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                        f"--screenshot={shot}", "--window-size=1280,2400", written["html"].as_uri()],
                       capture_output=True, timeout=120, check=False)
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1280, 2400)
    lo, hi = img.getextrema()
    assert hi - lo > 100, "the screenshot is blank"


def _with_baselines(report: dict) -> dict:
    """The example report as a run with the baseline on writes it: ``baseline`` and ``speedup`` per artifact."""
    out = copy.deepcopy(report)
    for i, a in enumerate(out["artifacts"]):
        after = a["latency_ms"]["p50"]
        before = round(after * (1.5 + 0.25 * i), 4)
        a["baseline"] = {"path": f"baseline/{a['target']}/{a['precision']}/model.onnx", "size_bytes": 1000,
                         "accuracy": 0.93, "accuracy_drop_pt": 0.0,
                         "latency_ms": {k: before for k in ("p50", "p90", "p95", "p99", "min", "max", "mean")},
                         "timing": {"pruned_latency_ms": {"p50": after, "p90": after}, "rounds": 10,
                                    "order": "interleaved, alternating baseline-pruned / pruned-baseline",
                                    "batch_size": 1, "scope": "inference"}}
        a["speedup"] = round(before / after, 4)
    return out


def test_report_with_baselines_keeps_the_contract_and_shows_the_speedup(tmp_path, report):
    rich = _with_baselines(report)
    paths = write_report(tmp_path, rich)
    data = json.loads(paths["json"].read_text())
    assert {"model", "accuracy", "artifacts"} <= set(data)  # the existing contract
    assert data["model"] == report["model"] and data["accuracy"] == report["accuracy"]
    for old, new in zip(report["artifacts"], data["artifacts"]):
        assert {k: new[k] for k in old} == old  # every old field unchanged; baseline/speedup added
        assert new["speedup"] == pytest.approx(new["baseline"]["latency_ms"]["p50"] / new["latency_ms"]["p50"],
                                               rel=1e-3)
        assert {"latency_ms", "accuracy"} <= set(new["baseline"])
    md = paths["md"].read_text()
    assert "## Speed-up vs the unpruned model" in md and "| Speed-up |" in md
    head = md.split("## Speed-up vs the unpruned model")[1].split("## Artifacts")[0]
    rows = [line for line in head.splitlines() if line.startswith("| ") and "| Target |" not in line]
    assert len(rows) == len(report["artifacts"])
    first = rich["artifacts"][0]
    assert f"| {first['latency_ms']['p50'] * 1.5:.3f} | {first['latency_ms']['p50']:.3f} | 1.50x | 93.00 |" in rows[0]
    assert "10 rounds alternating baseline and pruned" in md
    html = paths["html"].read_text()
    assert "Speed-up vs the unpruned model" in html and "1.50x" in html
    assert "1.50x" in summary_table(rich)


def test_plot_shows_baseline_points(report):
    from edgeprune.plots_report import accuracy_vs_latency

    plain, rich = accuracy_vs_latency(report), accuracy_vs_latency(_with_baselines(report))
    assert plain and rich and rich != plain  # baseline points and arrows drawn


def test_report_without_baselines_has_no_speedup_section(written):
    md = written["md"].read_text()
    assert "## Speed-up" not in md and "| Speed-up |" in md  # the column is there, its cells "-"
