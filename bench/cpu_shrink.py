"""CPU shrink paths of the plugin: the gather kernel against the dense shrink GEMM, by batch size.

    .venv/bin/python bench/cpu_shrink.py            # SmolLM2-135M shapes, n=8, k=2, r=8, bf16, one thread

Per batch size T it times building the fused GEMM inputs of one layer both ways:
  gather: `cpu_kernels.shrink_concat` (the k selected LoRAs' shrink computed in place),
  dense:  vLLM's oneDNN GEMM over all n LoRAs (what `gate_up_A` / `down_A` run) + `cpu_kernels.masked_concat`,
for gate+up (two stacked banks, [T, D] input) and down ([T, I] input), and prints dense / gather (above 1: the
gather wins). The plugin takes the gather path up to `cpu_kernels.GATHER_MAX_TOKENS` tokens. One thread by
default, as vLLM's CPU worker serves (it lowers torch's threads to one); --threads changes it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], iters: int) -> float:
    for _ in range(max(iters // 10, 3)):
        fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--loras", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--tokens", default="1,8,16,32,64,128,256")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from vllm import _custom_ops as ops

    from remix_serve.vllm_plugin import cpu_kernels

    if not cpu_kernels.available():
        raise SystemExit("the CPU kernels did not build; see the warning above")
    D, inter, n, k, r = args.hidden, args.intermediate, args.loras, args.top_k, args.rank
    g = torch.Generator().manual_seed(0)
    bf16 = torch.bfloat16

    def rand(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(bf16)

    router = torch.randn(n, D, generator=g)
    banks = {"gate+up": rand(2 * n * r, D), "down": rand(n * r, inter)}
    onednn = {name: ops.create_onednn_mm(a.t(), 32) for name, a in banks.items()}
    print(f"cpu, {torch.get_num_threads()} thread(s); D={D} I={inter} n={n} k={k} r={r} bf16; us per layer")
    print("| tokens | gate+up gather | gate+up dense | dense / gather | down gather | down dense | dense / gather |")
    print("|---|---|---|---|---|---|---|")
    for T in (int(t) for t in args.tokens.split(",")):
        x = rand(T, D, scale=1.0)
        weights, ids = cpu_kernels.route(x, router, k)
        inputs = {"gate+up": x, "down": rand(T, inter, scale=1.0)}
        row = [str(T)]
        for name, a in banks.items():
            xin, handle = inputs[name], onednn[name]
            gather = timed(lambda: cpu_kernels.shrink_concat(xin, a, ids, weights, r), args.iters)  # noqa: B023
            dense = timed(lambda: cpu_kernels.masked_concat(xin, ops.onednn_mm(handle, xin, None), weights, r),  # noqa: B023
                          args.iters)  # fmt: skip
            row += [f"{gather * 1e6:.1f}", f"{dense * 1e6:.1f}", f"{dense / gather:.2f}"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
