"""Multi-checkpoint serving (issue 14): many ReMix checkpoints from one paged pool, against their memory limit.

    .venv/bin/python bench/serve_multi.py                  # all four workloads, SmolLM2-135M bf16 eager
    .venv/bin/python bench/serve_multi.py --only c --repeats 1
    .venv/bin/python bench/serve_multi.py --quick          # smoke run: every engine, a few seconds of work each

Expected time on 2 cores at the defaults (3 repeats, 1 for (c); SmolLM2-135M, vLLM's CPU engine): about 40 minutes, of
which about 12 are the 28 engine starts (20-30 s each); each further repeat of (c) adds about 17 minutes
(`--c-repeats`). `--quick` takes about 10 minutes (engine starts, mostly; 18 on a machine shared with other jobs).

(a) one pool engine per checkpoint count (1, 4, 16, 64 checkpoints of n=8 k=2 r=8 on gate/up/down of every layer;
max_loras = min(count, 32), a pool that holds them all), 32 concurrent requests, request i on checkpoint i mod
count, 128 generated tokens each (EOS ignored). (b) vLLM's own multi-LoRA with as many PEFT LoRAs of rank k*r = 16
on the same projections (max_loras = that number) against the pool with as many ReMix checkpoints, same traffic.
(c) one checkpoint of n = 8, 32, 64 and r = 8, 16 (k=2) against the plain base model: decode as above and
prefill-heavy (32 prompts of 480 tokens, 1 output token), through the pool (`pool_engine_kwargs`) and through the
single-checkpoint model (`hf_overrides`, what `remix-serve --adapter` runs for one checkpoint) on both of its bank
paths, gather and fused (`--bank-path`; the table says which one the default, auto, serves). (d) on-demand
loading in a pool engine (max_loras 2, a pool of 2 checkpoints) that serves two others: the first request to a
checkpoint never loaded (cold: disk read + validation + page copy), the same request once resident (warm), and the
request after the pool evicted it (page-in from the host copy vLLM keeps: page copy, no disk read).

Decode throughput is 32 x 128 / (t(129 output tokens) - t(1 output token)) with 16-token prompts: the prefill and the
first token cancel out. Its LIMIT is memory traffic: a decode step reads the base weights (the stored parameters x 2
bytes; tied embeddings stored once and counted once, as the LM head that reads them) plus the distinct pool pages the
step's tokens selected (the mean over the traced decode forwards of `remix_pool_trace`, each page `page_bytes(D, I,
r_page, bf16)`). The limit ratio of N checkpoints to one (or of a checkpoint to the base) is bytes per step of the one
over bytes per step of the other; "fraction of limit" = measured ratio / limit ratio. The KV cache a step reads is left
out (the same in every configuration; counting it would bring every limit ratio closer to 1). For the single-checkpoint
paths the pool's trace of the same checkpoint stands in (the same rows of A and B are the least they can read). A
prefill figure's limit is arithmetic: the base model's multiply-adds per prompt token (its projections, and attention
over the prompt's mean causal length) over those plus the checkpoint's (each token's k LoRAs of rank r on gate, up and
down, and its n router logits), the ratio a delta computed at the base GEMMs' rate would reach.

Engines of one workload are built once and kept side by side (in (c): the base engine, plus the two engines of one
configuration at a time); each repeat runs them in turn, in reverse order every other repeat, and every ratio is
computed within a repeat: the median over repeats is the figure (min-max printed). Engines are closed between
workloads. Adapters are random (speed does not depend on the weights), written to a temporary folder.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from safetensors import safe_open
from serve_throughput import build_peft_lora  # bench/ is the script's folder, first on sys.path

from remix_serve import bases, tiny
from remix_serve.checkpoint import save_checkpoint
from remix_serve.vllm_plugin import WORKER_EXTENSION, hf_overrides, pool_engine_kwargs
from remix_serve.vllm_plugin.pool.sizing import page_bytes, plan_pool

PROJS = ("gate_proj", "up_proj", "down_proj")
K, R = 2, 8  # top-k and rank of the (a), (b) and (d) checkpoints; n = 8
N = 8
MAX_SLOTS = 32  # (a): max_loras = min(count, MAX_SLOTS)
C_CONFIGS = "8x8,32x8,64x8,8x16,32x16,64x16"  # (c): n x r
C_SINGLE = ("gather", "fused")  # (c): the single-checkpoint model's bank paths (--bank-path)
C_PATHS = ("pool", *C_SINGLE)


@dataclass
class Sizes:
    requests: int = 32
    decode_prompt: int = 16
    decode_out: int = 128
    prefill_prompt: int = 480
    trace_out: int = 32  # decode steps traced for the limit
    cold_samples: int = 3

    @classmethod
    def quick(cls) -> Sizes:
        return cls(requests=4, decode_prompt=8, decode_out=8, prefill_prompt=64, trace_out=4, cold_samples=1)


@dataclass
class Setup:
    base: Path
    base_name: str  # what a checkpoint's base_model says
    sizes: Sizes
    kv_bytes: int
    tmp: Path
    hf: dict = field(default_factory=dict)
    archs: list[str] = field(default_factory=list)
    base_params: int = 0
    base_note: str = ""
    rows: list[tuple[str, ...]] = field(default_factory=list)  # the summary table

    @property
    def D(self) -> int:
        return self.hf["hidden_size"]

    @property
    def I(self) -> int:  # noqa: E743
        return self.hf["intermediate_size"]

    @property
    def base_bytes(self) -> int:
        return 2 * self.base_params  # served in bf16


# --- building adapters ---


def base_parameters(base: Path, hf: dict) -> tuple[int, str]:
    """Parameters as stored in the base's safetensors files (a tied LM head is not stored: counted once)."""
    total, names = 0, 0
    for f in sorted(base.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for name in h.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += math.prod(h.get_slice(name).get_shape())
                names += 1
    tied = hf.get("tie_word_embeddings", False)
    note = (f"{total / 1e6:.1f}M parameters ({names} tensors as stored; embeddings "
            f"{'tied, counted once' if tied else 'untied, LM head counted separately'}) x 2 bytes")  # fmt: skip
    return total, note


def build_remix(setup: Setup, folder: Path, n: int, k: int, r: int, seed: int):
    fingerprint = bases.base_fingerprint(setup.base_name)
    cfg = tiny.tiny_config(setup.base_name, fingerprint, num_loras=n, top_k=k, rank=r, alpha=2.0 * k * r,
                           dtype="bfloat16")  # fmt: skip
    save_checkpoint(folder, cfg, tiny.random_adapter(cfg, seed=seed, scale=0.02))
    return folder, cfg


# --- engines ---


def engine(setup: Setup, **extra):
    from vllm import LLM

    kwargs: dict = dict(model=str(setup.base), dtype="bfloat16", enforce_eager=True, max_model_len=512, seed=0,
                        kv_cache_memory_bytes=setup.kv_bytes, enable_prefix_caching=False, max_num_seqs=64)  # fmt: skip
    return LLM(**(kwargs | extra))


def pool_engine(setup: Setup, configs: list, max_loras: int, pool_size: str | None = None):
    settings = plan_pool(configs, max_loras=max_loras, hidden_size=setup.D, intermediate_size=setup.I,
                         dtype="bfloat16", pool_size=pool_size)  # fmt: skip
    return engine(setup, **pool_engine_kwargs(settings, setup.archs, max_loras)), settings


def auto_path(setup: Setup, cfg) -> str:
    """The bank path `remix-serve --adapter` serves this checkpoint with here (`--bank-path auto`)."""
    from remix_serve.vllm_plugin import cpu_kernels
    from remix_serve.vllm_plugin.bank import auto_bank_path

    return auto_bank_path(cfg, SimpleNamespace(**setup.hf), gather_kernels=cpu_kernels.available())


def single_engine(setup: Setup, ckpt: Path, bank_path: str | None = None):
    """The single-checkpoint model, as `remix-serve --adapter ckpt [--bank-path ...]` runs it."""
    overrides = hf_overrides(str(ckpt), setup.archs, bank_path)
    return engine(setup, hf_overrides=overrides, worker_extension_cls=WORKER_EXTENSION)


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def lora_requests(paths: list[Path], prefix: str):
    from vllm.lora.request import LoRARequest

    return [LoRARequest(f"{prefix}{i}", i + 1, str(p)) for i, p in enumerate(paths)]


def generate(llm, prompts: list[list[int]], out: int, loras=None) -> float:
    """Seconds to run the batch (all submitted at once), `out` tokens each."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=out, temperature=0, ignore_eos=True)
    reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    t = time.perf_counter()
    res = llm.generate(reqs, params, lora_request=loras, use_tqdm=False)
    dt = time.perf_counter() - t
    assert all(len(r.outputs[0].token_ids) == out for r in res)
    return dt


def decode_rate(llm, prompts: list[list[int]], out: int, loras=None) -> float:
    """Decode tokens/s: (requests x out) / (t(out + 1 tokens) - t(1 token)); prefill and first token cancel."""
    first = generate(llm, prompts, 1, loras)
    full = generate(llm, prompts, out + 1, loras)
    return len(prompts) * out / max(full - first, 1e-9)


def prefill_rate(llm, prompts: list[list[int]], loras=None) -> float:
    """Prompt tokens/s of a prefill-heavy batch (1 output token)."""
    return sum(map(len, prompts)) / generate(llm, prompts, 1, loras)


def traced_pages(llm, prompts: list[list[int]], out: int, loras) -> dict[str, float]:
    """Mean distinct pages per store over the decode forwards of one traced batch (pool engines only)."""
    llm.collective_rpc("remix_pool_trace", args=(True,))
    generate(llm, prompts, out + 1, loras)
    trace = llm.collective_rpc("remix_pool_trace", args=(False,))[0]
    decode = [f for f in trace if f["tokens"] == len(prompts)]
    if not decode:
        raise RuntimeError(f"no decode forward of {len(prompts)} tokens in the trace: {trace[:4]}")
    return {store: statistics.mean(f[store] for f in decode) for store in ("gate_up", "down")} | {
        "forwards": len(decode)
    }


def prefill_flop_limit(setup: Setup, n: int, k: int, r: int, prompt: int) -> float:
    """Base multiply-adds per prompt token over base + ReMix ones (see the module docstring)."""
    hf, D, I = setup.hf, setup.D, setup.I  # noqa: E741
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads", heads)
    head_dim = hf.get("head_dim") or D // heads
    proj = D * heads * head_dim * 2 + D * kv_heads * head_dim * 2 + 3 * D * I  # q, o; k, v; gate, up, down
    attention = 2 * heads * head_dim * (prompt + 1) / 2  # scores and values over the mean causal length
    base = proj + attention
    return base / (base + 3 * k * r * (D + I) + n * D)


def step_bytes(setup: Setup, pages: dict[str, float], r_page: int) -> float:
    return setup.base_bytes + (pages["gate_up"] + pages["down"]) * page_bytes(setup.D, setup.I, r_page, "bfloat16")


# --- repeats ---


class Group:
    """Measurements of one workload (name -> call returning a figure), run in turn, reversed every other repeat."""

    def __init__(self) -> None:
        self.runners: dict[str, Callable[[int], float]] = {}
        self.values: dict[str, list[float]] = {}

    def run(self, repeats: int, unit: str) -> None:
        order = list(self.runners)
        for rep in range(repeats):
            print(f"  repeat {rep + 1}/{repeats}", flush=True)
            for name in order if rep % 2 == 0 else order[::-1]:
                self.values.setdefault(name, []).append(self.runners[name](rep))
                print(f"    {name:<34} {self.values[name][-1]:9.1f} {unit}", flush=True)

    def median(self, name: str) -> float:
        return statistics.median(self.values[name])

    def spread(self, name: str) -> str:
        v = self.values[name]
        return f"{min(v):.1f}-{max(v):.1f}"

    def ratio(self, num: str, den: str) -> tuple[float, list[float]]:
        pairs = [a / b for a, b in zip(self.values[num], self.values[den], strict=True)]
        return statistics.median(pairs), pairs


def fmt_pairs(pairs: list[float]) -> str:
    return f"{min(pairs):.2f}-{max(pairs):.2f}" if len(pairs) > 1 else "1 repeat"


def verdict(value: float, target: float) -> str:
    return "pass" if value >= target else "FAIL"


# --- (a) checkpoint counts ---


def workload_a(setup: Setup, counts: list[int], repeats: int) -> None:
    s = setup.sizes
    print(f"\n(a) {', '.join(map(str, counts))} checkpoints (n={N} k={K} r={R}) in one pool engine each, "
          f"{s.requests} concurrent decodes x {s.decode_out} tokens, round-robin checkpoints", flush=True)  # fmt: skip
    ckpts = [build_remix(setup, setup.tmp / f"a{i}", N, K, R, seed=i) for i in range(max(counts))]
    reqs = lora_requests([p for p, _ in ckpts], "a")
    rng = random.Random(1)
    prompts = [[rng.randrange(100, 300) for _ in range(s.decode_prompt)] for _ in range(s.requests)]
    engines, limits = {}, {}

    def assign(count: int, rep: int) -> list:  # request i on checkpoint (i + rep * requests) mod count
        return [reqs[(i + rep * s.requests) % count] for i in range(s.requests)]

    group = Group()
    for count in counts:
        llm, settings = pool_engine(setup, [cfg for _, cfg in ckpts[:count]], max_loras=min(count, MAX_SLOTS))
        engines[count] = llm
        every = [reqs[i % count] for i in range(max(count, s.requests))]
        generate(llm, [prompts[0]] * len(every), 2, every)  # burn-in: every checkpoint loaded once
        pages = traced_pages(llm, prompts, s.trace_out, assign(count, 0))
        limits[count] = (step_bytes(setup, pages, settings["r_page"]), pages)
        stats = llm.collective_rpc("remix_pool_stats")[0]
        print(f"  {count} checkpoints: pool {settings['pages']} pages of r_page {settings['r_page']}, "
              f"{len(stats['resident'])} resident, {stats['evictions']} evictions; traced decode step reads "
              f"{pages['gate_up']:.0f} gate_up + {pages['down']:.0f} down pages "
              f"({limits[count][0] / 1e6:.1f} MB with the base)", flush=True)  # fmt: skip
        group.runners[f"{count} ckpt"] = lambda rep, c=count: decode_rate(engines[c], prompts, s.decode_out,
                                                                           assign(c, rep))  # fmt: skip
    group.run(repeats, "tok/s")
    for llm in engines.values():
        close(llm)

    one = counts[0]
    print("\n(a fraction above 1 means the engine is not bound by the bytes it reads: its time per step grows more"
          " slowly than its traffic; (c) gives the reference figure's own cost against the base)")  # fmt: skip
    print(f"\n| checkpoints | decode tok/s (min-max) | bytes/step MB | ratio to {one} | limit ratio | fraction |")
    print("|---|---|---|---|---|---|")
    for count in counts:
        name = f"{count} ckpt"
        ratio, pairs = group.ratio(name, f"{one} ckpt")
        limit = limits[one][0] / limits[count][0]
        frac = ratio / limit
        print(f"| {count} | {group.median(name):.1f} ({group.spread(name)}) | {limits[count][0] / 1e6:.1f} | "
              f"{ratio:.2f} ({fmt_pairs(pairs)}) | {limit:.2f} | {frac:.2f} |")  # fmt: skip
        if count != one:
            setup.rows.append(("(a) decode, uniform traffic", f"{count} vs {one} checkpoints, one pool engine",
                               f"{group.median(name):.0f} tok/s, ratio {ratio:.2f}", f"ratio {limit:.2f}",
                               f"{frac:.2f} / >= 0.9", verdict(frac, 0.9)))  # fmt: skip
        else:
            setup.rows.append(("(a) decode, uniform traffic", f"{count} checkpoint, pool engine",
                               f"{group.median(name):.0f} tok/s", f"{limits[count][0] / 1e6:.0f} MB/step", "-",
                               "-"))  # fmt: skip


# --- (b) against vLLM's multi-LoRA ---


def workload_b(setup: Setup, counts: list[int], repeats: int) -> None:
    s = setup.sizes
    print(f"\n(b) the pool with {', '.join(map(str, counts))} ReMix checkpoints against vLLM's multi-LoRA with as "
          f"many PEFT LoRAs of rank {K * R} (gate/up/down, every layer), {s.requests} concurrent decodes x "
          f"{s.decode_out} tokens, uniform adapter choice", flush=True)  # fmt: skip
    top = max(counts)
    remix = [build_remix(setup, setup.tmp / f"b{i}", N, K, R, seed=100 + i) for i in range(top)]
    peft = [build_peft_lora(setup.tmp / f"peft{i}", setup.base, K * R, seed=i) for i in range(top)]
    remix_reqs, peft_reqs = lora_requests([p for p, _ in remix], "b"), lora_requests(peft, "peft")
    rng = random.Random(2)
    prompts = [[rng.randrange(100, 300) for _ in range(s.decode_prompt)] for _ in range(s.requests)]
    engines: dict[str, object] = {}
    group = Group()
    for count in counts:
        pool, _ = pool_engine(setup, [cfg for _, cfg in remix[:count]], max_loras=count)
        lora = engine(setup, enable_lora=True, max_loras=count, max_lora_rank=K * R, max_cpu_loras=count)
        for kind, llm, reqs in (("remix", pool, remix_reqs), ("vllm-lora", lora, peft_reqs)):
            engines[f"{kind} {count}"] = llm
            loras = [reqs[i % count] for i in range(s.requests)]
            generate(llm, [prompts[0]] * max(count, 2), 2, [reqs[i % count] for i in range(max(count, 2))])
            group.runners[f"{kind} {count}"] = lambda rep, e=llm, lr=loras: decode_rate(e, prompts, s.decode_out, lr)
    group.run(repeats, "tok/s")
    for llm in engines.values():
        close(llm)
    for count in counts:
        ratio, pairs = group.ratio(f"remix {count}", f"vllm-lora {count}")
        print(f"  {count}: ReMix pool {group.median(f'remix {count}'):.1f} tok/s ({group.spread(f'remix {count}')}),"
              f" vLLM LoRA {group.median(f'vllm-lora {count}'):.1f} tok/s "
              f"({group.spread(f'vllm-lora {count}')}); ratio {ratio:.2f} ({fmt_pairs(pairs)})")  # fmt: skip
        setup.rows.append(("(b) decode vs vLLM multi-LoRA", f"{count} ReMix ckpts vs {count} LoRAs of rank {K * R}",
                           f"{group.median(f'remix {count}'):.0f} vs {group.median(f'vllm-lora {count}'):.0f} tok/s,"
                           f" ratio {ratio:.2f}", "-", f"{ratio:.2f} / >= 2",
                           verdict(ratio, 2.0) if count == 16 else ("pass" if ratio >= 2 else "info")))  # fmt: skip


# --- (c) one checkpoint against the base ---


def workload_c(setup: Setup, configs: list[tuple[int, int]], repeats: int) -> None:
    s = setup.sizes
    print(f"\n(c) one checkpoint (k={K}) against the base: decode ({s.requests} x {s.decode_out} tokens) and prefill "
          f"({s.requests} prompts of {s.prefill_prompt} tokens, 1 output token), through the pool and the "
          f"single-checkpoint model's gather and fused bank paths", flush=True)  # fmt: skip
    rng = random.Random(3)
    decode_prompts = [[rng.randrange(100, 300) for _ in range(s.decode_prompt)] for _ in range(s.requests)]
    prefill_prompts = [[rng.randrange(100, 300) for _ in range(s.prefill_prompt)] for _ in range(s.requests)]
    base = engine(setup)
    generate(base, decode_prompts[:2], 2)
    results = []
    for n, r in configs:
        print(f"  n={n} r={r}", flush=True)
        path, cfg = build_remix(setup, setup.tmp / f"c{n}x{r}", n, K, r, seed=n * 100 + r)
        (req,) = lora_requests([path], f"c{n}x{r}-")
        pool, settings = pool_engine(setup, [cfg], max_loras=1)
        engines = {"pool": (pool, req), **{kind: (single_engine(setup, path, kind), None) for kind in C_SINGLE}}
        for llm, lr in engines.values():
            generate(llm, decode_prompts[:2], 2, lr)
        pages = traced_pages(pool, decode_prompts, s.trace_out, req)
        limit = setup.base_bytes / step_bytes(setup, pages, settings["r_page"])
        group = Group()
        for kind, (llm, lr) in {"base": (base, None), **engines}.items():
            group.runners[f"decode {kind}"] = lambda rep, e=llm, q=lr: decode_rate(e, decode_prompts, s.decode_out, q)
            group.runners[f"prefill {kind}"] = lambda rep, e=llm, q=lr: prefill_rate(e, prefill_prompts, q)
        group.run(repeats, "tok/s")
        for llm, _ in engines.values():
            close(llm)
        row = {"n": n, "r": r, "limit": limit, "pages": pages, "auto": auto_path(setup, cfg),
               "prefill limit": prefill_flop_limit(setup, n, K, r, s.prefill_prompt)}  # fmt: skip
        for kind in C_PATHS:
            for phase in ("decode", "prefill"):
                row[f"{phase} {kind}"] = group.ratio(f"{phase} {kind}", f"{phase} base")
                row[f"{phase} {kind} tok/s"] = group.median(f"{phase} {kind}")
        row["decode base tok/s"], row["prefill base tok/s"] = group.median("decode base"), group.median("prefill base")
        results.append(row)
        print(
            f"    traced decode step: {pages['gate_up']:.0f} gate_up + {pages['down']:.0f} down pages; limit ratio "
            f"{limit:.3f}; of the base, decode "
            + ", ".join(f"{kind} {row[f'decode {kind}'][0]:.2f}" for kind in C_PATHS)
            + "; prefill "
            + ", ".join(f"{kind} {row[f'prefill {kind}'][0]:.2f}" for kind in C_PATHS),
            flush=True,
        )
    close(base)

    columns = [f"{phase} {kind} / base" for phase in ("decode", "prefill") for kind in C_PATHS]
    print(
        "\n| n | r | decode base tok/s | limit ratio | prefill limit (FLOPs) | "
        + " | ".join(columns)
        + " | fastest (decode, prefill) | auto serves |\n"
        + "|---" * (len(columns) + 7)
        + "|"
    )
    for row in results:
        fastest = ", ".join(max(C_PATHS, key=lambda kind: row[f"{p} {kind}"][0]) for p in ("decode", "prefill"))
        cells = [f"{row[f'{phase} {kind}'][0]:.2f} ({fmt_pairs(row[f'{phase} {kind}'][1])})"
                 for phase in ("decode", "prefill") for kind in C_PATHS]  # fmt: skip
        print(f"| {row['n']} | {row['r']} | {row['decode base tok/s']:.1f} | {row['limit']:.3f} | "
              f"{row['prefill limit']:.3f} | " + " | ".join(cells) + f" | {fastest} | {row['auto']} |")  # fmt: skip
        for kind in C_PATHS:
            ratio = row[f"decode {kind}"][0]
            frac = ratio / row["limit"]
            setup.rows.append((f"(c) decode vs base, {kind}", f"n={row['n']} r={row['r']}",
                               f"{row[f'decode {kind} tok/s']:.0f} tok/s, ratio {ratio:.2f}",
                               f"ratio {row['limit']:.3f}", f"{frac:.2f} / >= 0.9", verdict(frac, 0.9)))  # fmt: skip
            ratio = row[f"prefill {kind}"][0]
            setup.rows.append((f"(c) prefill vs base, {kind}", f"n={row['n']} r={row['r']}",
                               f"{row[f'prefill {kind} tok/s']:.0f} tok/s, ratio {ratio:.2f}",
                               f"ratio {row['prefill limit']:.3f} (FLOPs)", f"{ratio:.2f} / >= 0.85",
                               verdict(ratio, 0.85)))  # fmt: skip


# --- (d) paging a checkpoint in on demand ---


def workload_d(setup: Setup, samples: int) -> None:
    print("\n(d) on-demand loading: a pool engine (max_loras 2, a pool of 2 checkpoints) serving two others; one "
          "request (16-token prompt, 1 output token) to a checkpoint cold, warm, and paged back in after an eviction",
          flush=True)  # fmt: skip
    others = [build_remix(setup, setup.tmp / f"d-other{i}", N, K, R, seed=200 + i) for i in range(2)]
    cold = [build_remix(setup, setup.tmp / f"d-cold{i}", N, K, R, seed=300 + i) for i in range(samples)]
    reqs = lora_requests([p for p, _ in others + cold], "d")
    other_reqs, cold_reqs = reqs[:2], reqs[2:]
    llm, _ = pool_engine(setup, [cfg for _, cfg in others], max_loras=2, pool_size="2")
    prompt = [random.Random(4).randrange(100, 300) for _ in range(16)]
    generate(llm, [prompt] * 2, 2, other_reqs)  # burn-in: the others resident
    times: dict[str, list[float]] = {"cold": [], "warm": [], "page-in": []}
    for i, req in enumerate(cold_reqs):
        generate(llm, [prompt] * 2, 1, other_reqs)  # serving the others
        times["cold"].append(generate(llm, [prompt], 1, req))  # disk read + validation + page copy
        times["warm"].append(generate(llm, [prompt], 1, req))  # resident, in its slot
        generate(llm, [prompt] * 2, 1, other_reqs)  # the others take both slots and the pool: evicted to host
        before = llm.collective_rpc("remix_pool_stats")[0]
        times["page-in"].append(generate(llm, [prompt], 1, req))  # host copy -> pages
        after = llm.collective_rpc("remix_pool_stats")[0]
        paged = after["reloads"] - before["reloads"]
        print(f"  sample {i + 1}: cold {times['cold'][-1] * 1e3:.1f} ms, warm {times['warm'][-1] * 1e3:.1f} ms, "
              f"page-in {times['page-in'][-1] * 1e3:.1f} ms ({paged} reload; {after['evictions']} evictions so far)",
              flush=True)  # fmt: skip
        if paged != 1:
            print(f"  WARNING: the page-in request paged {paged} checkpoints back in, not 1", flush=True)
    close(llm)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ckpt_mb = sum(f.stat().st_size for f in cold[0][0].iterdir()) / 1e6
    print(f"  medians of {samples}: cold {med['cold']:.1f} ms, warm {med['warm']:.1f} ms -> load time "
          f"{med['cold'] - med['warm']:.1f} ms for a {ckpt_mb:.1f} MB checkpoint (files in the page cache); "
          f"page-in after eviction {med['page-in']:.1f} ms -> {med['page-in'] - med['warm']:.1f} ms")  # fmt: skip
    for what, ms, note in (
        ("first request, cold", med["cold"], f"load time {med['cold'] - med['warm']:.1f} ms ({ckpt_mb:.0f} MB)"),
        ("same request, warm", med["warm"], "-"),
        ("after eviction, page-in", med["page-in"], f"page-in time {med['page-in'] - med['warm']:.1f} ms"),
    ):
        setup.rows.append(("(d) on-demand load", what, f"{ms:.1f} ms", "-", note, "info"))


# --- main ---


def parse_configs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]  # type: ignore[misc]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="a,b,c,d", help="workloads to run (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats of each workload (default 3; --quick 1)")
    ap.add_argument("--c-repeats", type=int, default=None, help="repeats of (c) (default 1: its pool prefill is slow)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 requests, 8 tokens, 64-token prefill")
    ap.add_argument("--base", default="smollm2-135m", help="base model: bundled name or folder (%(default)s)")
    ap.add_argument("--counts", default="1,4,16,64", help="(a) checkpoint counts, the first is the reference")
    ap.add_argument("--lora-counts", default="16,1", help="(b) adapter counts")
    ap.add_argument("--c-configs", default=C_CONFIGS, help="(c) n x r of the checkpoint (default: %(default)s)")
    ap.add_argument("--kv-bytes", type=int, default=None, help="KV cache per engine (default: 40 x 512 tokens)")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the engines' start-up logs would drown the figures
    sizes = Sizes.quick() if args.quick else Sizes()
    repeats = args.repeats or (1 if args.quick else 3)
    only = set(args.only.split(","))

    base = bases.resolve_base(args.base)
    base_name = args.base if args.base in bases.BUNDLED else str(base.resolve())
    hf = json.loads((base / "config.json").read_text())
    heads = hf.get("num_key_value_heads", hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    per_token = 2 * hf["num_hidden_layers"] * heads * head_dim * 2
    kv_bytes = args.kv_bytes or max(64 << 20, per_token * 40 * 512)
    tmp = Path(tempfile.mkdtemp(prefix="remix-multi-"))
    setup = Setup(base=base, base_name=base_name, sizes=sizes, kv_bytes=kv_bytes, tmp=tmp, hf=hf,
                  archs=hf["architectures"])  # fmt: skip
    setup.base_params, setup.base_note = base_parameters(base, hf)
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores; base {args.base} bf16 eager; base bytes per decode step "
          f"{setup.base_bytes / 1e6:.1f} MB = {setup.base_note}; KV cache {kv_bytes >> 20} MiB per engine; "
          f"{repeats} repeat(s){' (quick)' if args.quick else ''}; adapters in {tmp}", flush=True)  # fmt: skip
    start = time.perf_counter()
    if "a" in only:
        workload_a(setup, [int(c) for c in args.counts.split(",")], repeats)
    if "b" in only:
        workload_b(setup, [int(c) for c in args.lora_counts.split(",")], repeats)
    if "c" in only:
        workload_c(setup, parse_configs(args.c_configs), args.c_repeats or (repeats if args.repeats else 1))
    if "d" in only:
        workload_d(setup, max(sizes.cold_samples, repeats))

    print(f"\n## Summary ({(time.perf_counter() - start) / 60:.1f} min; {cpu}, {os.cpu_count()} cores; "
          f"{args.base} bf16 eager; {sizes.requests} concurrent x {sizes.decode_out} tokens; {repeats} repeat(s), "
          f"medians)\n")  # fmt: skip
    print("| workload | config | figure | limit | fraction of limit / target | result |\n|---|---|---|---|---|---|")
    for row in setup.rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
