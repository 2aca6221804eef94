"""Serving throughput: ReMix plugin vs the base model, vLLM's own single LoRA, and the HF reference.

    .venv/bin/python bench/serve_throughput.py            # SmolLM2-135M, bf16, eager; about 25 minutes on 2 cores

(a) steady decode: 32 concurrent requests x 128 generated tokens (EOS ignored) through the base model alone, the
ReMix plugin (n=8, k=2, r=8, gate/up/down of every layer) and vLLM's LoRA support with one rank-16 LoRA on the same
projections; (b) a mixed workload, 64 requests with prompt lengths 8-200 and output lengths 16-256, through the
ReMix plugin and through the HF reference model in static batches of 32. Every configuration's engine is built once
(same engine settings) and kept while the others run (an idle engine waits on its queue); each repeat runs them all
in turn, in reverse order every other repeat, so slow drift of a shared machine hits every configuration alike.
Each ratio is computed within a repeat; the median over repeats is the figure to quote (the spread is printed).
Adapters are random (the speed does not depend on the weights) and built in a temporary folder.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from remix_serve import bases, reference, tiny
from remix_serve.checkpoint import save_checkpoint
from remix_serve.vllm_plugin import WORKER_EXTENSION, hf_overrides

PROJS = ("gate_proj", "up_proj", "down_proj")


def build_remix(folder: Path, n: int, k: int, r: int) -> Path:
    spec = bases.BUNDLED["smollm2-135m"]
    cfg = tiny.tiny_config("smollm2-135m", spec.fingerprint, num_loras=n, top_k=k, rank=r, alpha=2.0 * k * r,
                           dtype="bfloat16")  # fmt: skip
    return save_checkpoint(folder, cfg, tiny.random_adapter(cfg, seed=0, scale=0.02))


def build_peft_lora(folder: Path, base: Path, r: int, seed: int = 0) -> Path:
    """One ordinary PEFT LoRA of rank r on gate/up/down of every layer (random weights; bench/serve_multi.py too)."""
    hf = json.loads((base / "config.json").read_text())
    d, inter = hf["hidden_size"], hf["intermediate_size"]
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(hf["num_hidden_layers"]):
        for proj in PROJS:
            in_f, out_f = (inter, d) if proj == "down_proj" else (d, inter)
            pre = f"base_model.model.model.layers.{layer}.mlp.{proj}"
            tensors[f"{pre}.lora_A.weight"] = (torch.randn(r, in_f, generator=gen) * 0.02).to(torch.bfloat16)
            tensors[f"{pre}.lora_B.weight"] = (torch.randn(out_f, r, generator=gen) * 0.02).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
              "target_modules": list(PROJS), "bias": "none", "base_model_name_or_path": str(base)}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def engine(base: Path, remix: Path | None = None, lora_rank: int | None = None):
    from vllm import LLM

    kwargs: dict = dict(model=str(base), dtype="bfloat16", enforce_eager=True, max_model_len=512, seed=0,
                        kv_cache_memory_bytes=1 << 30, enable_prefix_caching=False, max_num_seqs=64)  # fmt: skip
    if remix is not None:
        kwargs |= dict(
            hf_overrides=hf_overrides(str(remix), ["LlamaForCausalLM"]), worker_extension_cls=WORKER_EXTENSION
        )
    if lora_rank is not None:
        kwargs |= dict(enable_lora=True, max_loras=1, max_lora_rank=lora_rank)
    return LLM(**kwargs)


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def timed_generate(llm, prompts: list[list[int]], outs: list[int], lora=None) -> float:
    """Generated tokens per second for one batch of requests (all submitted at once)."""
    from vllm import SamplingParams, TokensPrompt

    params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for o in outs]
    reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(reqs[:2], params[:2], lora_request=lora, use_tqdm=False)  # burn-in
    t = time.perf_counter()
    res = llm.generate(reqs, params, lora_request=lora, use_tqdm=False)
    dt = time.perf_counter() - t
    assert sum(len(r.outputs[0].token_ids) for r in res) == sum(outs)
    return sum(outs) / dt


def hf_static_batches(model, prompts: list[list[int]], outs: list[int], batch: int = 32) -> float:
    """The HF reference in static batches (left-padded, each batch runs to its longest output)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # every core for the reference (vLLM's CPU worker takes one)
    t = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ps, os_ = prompts[i : i + batch], outs[i : i + batch]
        width = max(map(len, ps))
        ids = torch.tensor([[2] * (width - len(p)) + p for p in ps])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(os_), min_new_tokens=max(os_),
                           do_sample=False, pad_token_id=2, eos_token_id=None)  # fmt: skip
    dt = time.perf_counter() - t
    torch.set_num_threads(threads)
    return sum(outs) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loras", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--configs", default="base,remix,lora,hf", help="subset to run (default: %(default)s)")
    args = ap.parse_args()
    n, k, r = args.loras, args.top_k, args.rank
    configs = set(args.configs.split(","))

    base = bases.resolve_base("smollm2-135m")
    tmp = Path(tempfile.mkdtemp(prefix="remix-bench-"))
    remix = build_remix(tmp / "remix", n, k, r)
    lora = build_peft_lora(tmp / "lora", base, k * r)
    rng = random.Random(0)
    decode_prompts = [[rng.randrange(100, 40000) for _ in range(16)] for _ in range(32)]
    decode_outs = [128] * 32
    mixed_prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(8, 200))] for _ in range(64)]
    mixed_outs = [rng.randint(16, 256) for _ in range(64)]

    from vllm.lora.request import LoRARequest

    engines: dict[str, object] = {}  # built once and kept side by side
    runners: dict = {}  # measurement name -> a call that runs it and returns generated tokens/s
    if "base" in configs:
        engines["base"] = engine(base)
        runners["decode base"] = lambda: timed_generate(engines["base"], decode_prompts, decode_outs)
    if "remix" in configs:
        engines["remix"] = engine(base, remix=remix)
        runners["decode remix"] = lambda: timed_generate(engines["remix"], decode_prompts, decode_outs)
        runners["mixed remix"] = lambda: timed_generate(engines["remix"], mixed_prompts, mixed_outs)
    if "lora" in configs:
        engines["lora"], lreq = engine(base, lora_rank=k * r), LoRARequest("l", 1, str(lora))
        runners["decode vllm-lora"] = lambda: timed_generate(engines["lora"], decode_prompts, decode_outs, lreq)
    if "hf" in configs:
        hf_model, _ = reference.load_model(remix, dtype=torch.bfloat16)
        runners["mixed hf-reference"] = lambda: hf_static_batches(hf_model, mixed_prompts, mixed_outs)

    runs: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for rep in range(args.repeats):
        print(f"repeat {rep + 1}/{args.repeats}", flush=True)
        for name in order if rep % 2 == 0 else order[::-1]:
            runs[name].append(runners[name]())
            print(f"  {name:<28} {runs[name][-1]:8.1f} tok/s", flush=True)
    for llm in engines.values():
        close(llm)

    cpu = platform.processor() or platform.machine()
    print(f"\nmachine: {cpu}, {os.cpu_count()} cores; SmolLM2-135M bf16 eager; ReMix n={n} k={k} r={r}; "
          f"vLLM LoRA rank {k * r}; {args.repeats} repeats, engines kept side by side")  # fmt: skip
    print("| workload | configuration | generated tok/s, median | min-max |\n|---|---|---|---|")
    for name, values in runs.items():
        workload, config = name.split(" ", 1)
        print(f"| {workload} | {config} | {statistics.median(values):.1f} | {min(values):.1f}-{max(values):.1f} |")

    def ratio(num: str, den: str, target: float) -> None:
        if num in runs and den in runs:
            pairs = [a / b for a, b in zip(runs[num], runs[den], strict=True)]
            print(f"ratio {num} / {den} = {statistics.median(pairs):.2f} median of repeats (target >= {target}); "
                  f"per repeat: {', '.join(f'{p:.2f}' for p in pairs)}")  # fmt: skip

    ratio("decode remix", "decode base", 0.90)
    ratio("decode remix", "decode vllm-lora", 3)
    ratio("mixed remix", "mixed hf-reference", 2.5)


if __name__ == "__main__":
    main()
