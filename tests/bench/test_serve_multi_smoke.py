"""bench/serve_multi.py starts, measures and prints its summary: a smoke run on the tiny base (two pool engines).

The benchmark's figures are not checked (a tiny model on a shared CPU says nothing about SmolLM2's); what is
checked is that the pool engines serve bf16 decodes, that the trace behind the limit has decode forwards, and that
on-demand loading pages a checkpoint back in after an eviction.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.engine

SCRIPT = ROOT / "bench" / "serve_multi.py"


def test_quick_run_on_the_tiny_base(tiny_base: Path):
    cmd = [sys.executable, str(SCRIPT), "--quick", "--base", str(tiny_base), "--only", "a,d", "--counts", "1,2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = out.stdout.split("## Summary", 1)[-1]
    assert "| (a) decode, uniform traffic | 2 vs 1 checkpoints, one pool engine |" in summary, out.stdout
    assert "| (d) on-demand load | after eviction, page-in |" in summary, out.stdout
    assert "(1 reload;" in out.stdout and "WARNING: the page-in" not in out.stdout, out.stdout
