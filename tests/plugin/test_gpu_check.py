"""bench/gpu_check.py, the one prepared GPU run, known to start and to check what it says before a GPU is lent."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
def test_dry_run_walks_every_checks_set_up():
    """Bases, checkpoints (the Llama-3-8B-shaped one included), vLLM's engine-argument and model-config checks of
    every engine, and the bank-op benchmark at toy shapes."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert sum(line.startswith("DRY ") for line in lines) == 5, out.stdout
    assert sum("-> ['RemixLlamaForCausalLM']" in line for line in lines) == 3, out.stdout
    assert any(line.startswith("PASS bank-op: eager:") for line in lines), out.stdout
    assert lines[-1] == "gpu_check: 0 failed"


def test_without_a_gpu_it_says_so_and_exits_non_zero():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "no CUDA device (use --dry-run" in out.stderr


@pytest.mark.engine
def test_the_checks_pass_on_a_cpu_engine(tiny_base: Path, tiny_ckpt: Path, capsys):
    """The check functions themselves, on an eager tiny engine: a typo in them would otherwise cost a GPU run."""
    gpu_check = load_gpu_check()
    kwargs = gpu_check.engine_kwargs(tiny_base, tiny_ckpt, "float32", 0.1, max_model_len=512, enforce_eager=True,
                                     kv_cache_memory_bytes=64 << 20)  # fmt: skip
    llm = gpu_check.start(kwargs)
    try:
        gpu_check.check_parity_and_counters(llm, tiny_ckpt)
        gpu_check.check_logprobs(llm, tiny_ckpt)
        gpu_check.decode_ratio("decode-self", llm, llm, repeats=1)
        assert gpu_check.failures in ([], ["decode-self"]), capsys.readouterr().out  # self/self: ~1.0, noisy
        out = capsys.readouterr().out
        for name in ("parity-fp32", "counters", "logprobs-bf16"):
            assert f"PASS {name}: " in out, out
        assert "8/8 prompts token for token" in out and "ReMix" in out

    finally:
        llm.llm_engine.engine_core.shutdown()


def test_top2_margin_is_the_reference_logit_gap(tiny_ckpt: Path):
    """What the parity check prints when a GPU run diverges: the reference's own top-2 logit gap there."""
    import torch

    from remix_serve import reference

    gpu_check = load_gpu_check()
    model, _ = reference.load_model(tiny_ckpt)
    ids = [5, 17, 99, 3]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    top = logits.sort(descending=True).values
    assert gpu_check.top2_margin(model, ids) == pytest.approx(float(top[0] - top[1]))
