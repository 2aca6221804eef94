"""bench/method_study.py on the tiny base: trains, evaluates through the served engine, writes the report, resumes.

The numbers mean nothing (a random 2-layer model, three steps); what is checked is the machinery: one JSON per run
and per evaluation, a second invocation that trains and serves nothing, and results.md with its four figures. The
bare base is not served here (`--no-base`): each engine start costs 10-25 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.engine

SCRIPT = ROOT / "bench" / "method_study.py"
METHODS = ["lora-r8", "remix-k2-M4"]  # each evaluated checkpoint costs an engine start (10-25 s)


def _run(tiny_base: Path, work: Path, results: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, str(SCRIPT), "--base", str(tiny_base), "--work", str(work), "--results", str(results),
        "--out", str(out),
        "--methods", ",".join(METHODS), "--layers", "0,1", "--steps", "3", "--batch-size", "4", "--lrs", "0.001",
        "--seeds", "0", "--sizes", "24,6,12", "--max-len", "256", "--max-tokens", "4", "--max-model-len", "512",
        "--threads", "1", "--no-base",
    ]  # fmt: skip
    out_ = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert out_.returncode == 0, out_.stdout[-3000:] + out_.stderr[-3000:]
    return out_


def test_study_runs_caches_every_result_resumes_and_writes_the_report(tiny_base: Path, tmp_path: Path):
    work, results, out = tmp_path / "work", tmp_path / "results", tmp_path / "docs"
    first = _run(tiny_base, work, results, out)
    names = [f"{m}_lr0.001_s0" for m in METHODS]
    for name in names:
        run = json.loads((results / "runs" / f"{name}.json").read_text())
        assert run["steps"] == 3 and run["dev_loss"] > 0 and run["machine"]["cores"] >= 1
        assert [s["step"] for s in run["trace"]["steps"]] == [1, 2, 3]
        served = json.loads((results / "evals" / f"{name}.served.json").read_text())
        assert sorted(served["accuracy"]) == sorted(["arithmetic", "capital", "code", "french", "reverse", "upper"])
        assert sum(served["counts"].values()) == 12
        assert json.loads((results / "evals" / f"{name}.reference.json").read_text())["test_loss"] > 0
    assert not (results / "evals" / "base.served.json").exists()  # --no-base: one engine start fewer
    assert first.stdout.count("[train] ") >= 2 * len(METHODS) and first.stdout.count("[serve] ") == len(METHODS)
    assert not list(work.rglob("runs")) and not list(results.rglob("*.safetensors"))  # results and cache apart

    files = [*(results / "runs").glob("*.json"), *(results / "evals").glob("*.json")]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    second = _run(tiny_base, work, results, out)
    assert "[train]" not in second.stdout and "[serve]" not in second.stdout, second.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # A new checkout: the committed results, an empty cache. Nothing is trained or served again...
    third = _run(tiny_base, tmp_path / "fresh-cache", results, out)
    assert "[train]" not in third.stdout and "[serve]" not in third.stdout, third.stdout
    # ...except a run whose evaluation is missing: its checkpoint is gone, so it trains again, then is evaluated.
    (results / "evals" / f"{names[0]}.served.json").unlink()
    fourth = _run(tiny_base, tmp_path / "fresh-cache-2", results, out)
    assert f"[train] {names[0]}: checkpoint not in the cache" in fourth.stdout, fourth.stdout
    assert fourth.stdout.count("[serve] ") == 1 and (results / "evals" / f"{names[0]}.served.json").is_file()

    report = (out / "results.md").read_text()
    assert "| LoRA r=8 |" in report and "ReMix n=8 k=2 r=8 M=4" in report and "In progress" not in report
    assert "1 runs" in report or "2 runs" in report  # the machines line: each CPU with its run count
    for png in ("study-accuracy-vs-M.png", "study-accuracy-vs-k.png", "study-routing-ess.png",
                "study-usage-heatmaps.png"):  # fmt: skip
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report

    # A report of a study in progress: asked for two seeds, it has one evaluated run per method, and says so.
    partial = tmp_path / "partial"
    cmd = [
        sys.executable, str(SCRIPT), "--base", str(tiny_base), "--work", str(tmp_path / "fresh-cache"),
        "--results", str(results), "--out", str(partial), "--methods", ",".join(METHODS), "--layers", "0,1",
        "--steps", "3", "--batch-size", "4", "--lrs", "0.001", "--seeds", "0,1", "--sizes", "24,6,12", "--report-only",
    ]  # fmt: skip
    sub = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert sub.returncode == 0 and "[train]" not in sub.stdout, sub.stdout[-2000:] + sub.stderr[-2000:]
    text = (partial / "results.md").read_text()
    assert "**In progress: 2 of 4 final runs evaluated.**" in text and "| LoRA r=8 | 0.001 | 1 |" in text
    assert "| 0.001 (the only rate tried) |" in text and "widen `--lrs`" in text
