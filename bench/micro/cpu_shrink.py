"""CPU shrink paths of the plugin: the gather kernel against the dense shrink GEMM, by batch size.

    .venv/bin/python bench/micro/cpu_shrink.py            # SmolLM2-135M shapes, n=8, k=2, r=8, bf16, one thread

Per batch size T it times building the fused GEMM inputs of a layer both ways:
  gather: `cpu_kernels.shrink_concat` (the k selected LoRAs' shrink computed in place),
  dense:  vLLM's oneDNN GEMM over all n LoRAs (what `gate_up_A` / `down_A` run) + `cpu_kernels.masked_concat`,
for gate+up (two stacked banks, [T, D] input) and down ([T, I] input), and prints dense / gather (above 1: the
gather wins). As in serving, each call finds its bank out of cache: the script cycles through --layers layers'
banks and runs a base-sized gate_up GEMM between them (timed apart). In cache both paths are 2-3x faster and the
crossover moves down (--warm). The plugin takes the gather path up to `cpu_kernels.GATHER_MAX_TOKENS` tokens. One
thread by default, as vLLM's CPU worker serves (it lowers torch's threads to one); --threads changes it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
from bench_args import add_bank_args


def gather_input(
    bank_A: torch.Tensor, handle: object, xin: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, rank: int
) -> torch.Tensor:
    """The plugin's decode path: the selected LoRAs' shrink, masked and appended, in one op."""
    from remix_serve.vllm_plugin import cpu_kernels

    return cpu_kernels.shrink_concat(xin, bank_A, ids, weights, rank)


def dense_input(
    bank_A: torch.Tensor, handle: object, xin: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, rank: int
) -> torch.Tensor:
    """The plugin's prefill path: vLLM's oneDNN shrink GEMM over all n LoRAs, then mask and append."""
    from vllm import _custom_ops as ops

    from remix_serve.vllm_plugin import cpu_kernels

    return cpu_kernels.masked_concat(xin, ops.onednn_mm(handle, xin, None), weights, rank)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bank_args(ap, hidden=576, intermediate=1536, rank=8)
    ap.add_argument("--tokens", default="1,8,16,32,64,128,256")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--warm", action="store_true", help="keep one layer's bank in cache instead")
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
    layers = []
    for _ in range(args.layers):
        banks = {"gate+up": rand(2 * n * r, D), "down": rand(n * r, inter)}
        layers.append({name: (a, ops.create_onednn_mm(a.t(), 32)) for name, a in banks.items()})
    base_gate_up = ops.create_onednn_mm(rand(2 * inter, D).t(), 32)

    def per_layer(fn: Callable[[torch.Tensor, torch.Tensor], object], bank: str, x: torch.Tensor) -> float:
        """Seconds per call of fn(bank_A, its oneDNN handle), each call on the next layer's bank."""
        total, calls = 0.0, 0
        for _ in range(max(args.iters // len(layers), 2)):
            for layer in layers:
                if not args.warm:
                    ops.onednn_mm(base_gate_up, x, None)  # streams 3.5 MB of weights, as the MLP does
                t = time.perf_counter()
                fn(*layer[bank])
                total, calls = total + time.perf_counter() - t, calls + 1
        return total / calls

    mode = "in cache" if args.warm else "out of cache, as served"
    print(f"cpu, {torch.get_num_threads()} thread(s); D={D} I={inter} n={n} k={k} r={r} bf16; us per layer, {mode}")
    print("| tokens | gate+up gather | gate+up dense | dense / gather | down gather | down dense | dense / gather |")
    print("|---|---|---|---|---|---|---|")
    for T in (int(t) for t in args.tokens.split(",")):
        x = rand(T, D, scale=1.0)
        weights, ids = cpu_kernels.route(x, router, k)
        row = [str(T)]
        for bank, xin in (("gate+up", x), ("down", rand(T, inter, scale=1.0))):
            route = {"xin": xin, "ids": ids, "weights": weights, "rank": r}
            gather, dense = partial(gather_input, **route), partial(dense_input, **route)
            per_layer(gather, bank, x)  # warm-up
            t_gather, t_dense = per_layer(gather, bank, x), per_layer(dense, bank, x)
            row += [f"{t_gather * 1e6:.1f}", f"{t_dense * 1e6:.1f}", f"{t_dense / t_gather:.2f}"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
