"""remix-train as a process: SIGTERM mid-training leaves a valid checkpoint of the last step, and no temp folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from remix_serve import checkpoint as ck
from tests.helpers.train_task import write_task


def test_sigterm_mid_training_writes_a_valid_checkpoint(tiny_base: Path, tmp_path: Path):
    train, evals = write_task(tmp_path)
    out = tmp_path / "ckpt"
    cmd = [
        sys.executable, "-m", "remix_serve.train.cli", "--base", str(tiny_base), "--data", str(train),
        "--eval-data", str(evals), "--out", str(out), "--loras", "4", "--top-k", "2", "--rank", "4",
        "--max-steps", "100000", "--batch-size", "4", "--log-every", "1", "--eval-every", "1000000",
        "--threads", "1", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:  # wait until a few steps have finished
            if line.startswith("step 3/") or time.monotonic() > deadline:
                break
        assert proc.poll() is None, "trainer exited before it was signalled"
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, rest
    loaded = ck.load_checkpoint(out)  # validates config, every tensor and the base fingerprint
    t = loaded.config.training
    assert t["stopped_by"] == "SIGTERM" and 3 <= t["step"] < 100000
    assert f"wrote {out} (step {t['step']})" in rest
    assert (out / "README.md").is_file() and (out / "routing.png").is_file()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary folders left behind: {leftovers}"
