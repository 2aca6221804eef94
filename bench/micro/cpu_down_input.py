"""CPU decode: the down projection's input, from the gate/up GEMM's output, three ways, by batch size.

    .venv/bin/python bench/micro/cpu_down_input.py        # SmolLM2-135M shapes, n=8, k=2, r=8, bf16, one thread

Per batch size T, with `gate_up` = `[gate | up]` `[T, 2I]`:
  base:    vLLM's SiluAndMul (on x86 CPUs `F.silu(gate) * up`, two PyTorch ops): what the base model's MLP runs;
  unfused: SiluAndMul, then `cpu_kernels.shrink_concat` (the down bank's gather shrink, masked and appended);
  fused:   `cpu_kernels.silu_mul_shrink_concat`, both in one op: what the plugin runs for decode batches.
It prints microseconds per layer and the ratios unfused / fused (above 1: the fusion wins) and fused / base (the
down input's cost in ReMix against the activation alone in the base model). As in serving, every call finds its
layer's data out of cache: the script cycles through --layers layers and runs a base-sized gate_up GEMM between
calls (timed apart). One thread, as vLLM's CPU worker serves.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from bench_args import add_bank_args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bank_args(ap, hidden=576, intermediate=1536, rank=8)
    ap.add_argument("--tokens", default="1,8,32,64")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--iters", type=int, default=600)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from vllm import _custom_ops as ops
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.activation import SiluAndMul

    from remix_serve.vllm_plugin import cpu_kernels

    if not cpu_kernels.available():
        raise SystemExit("the CPU kernels did not build; see the warning above")
    D, inter, n, k, r = args.hidden, args.intermediate, args.loras, args.top_k, args.rank
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    with set_current_vllm_config(VllmConfig()):
        act_fn = SiluAndMul()
    router = torch.randn(n, D, generator=g)
    banks = [rand(n * r, inter) for _ in range(args.layers)]
    base_gate_up = ops.create_onednn_mm(rand(2 * inter, D).t(), 32)

    print(f"cpu, 1 thread; D={D} I={inter} n={n} k={k} r={r} bf16; us per layer, out of cache, as served")
    print("| tokens | base: SiluAndMul | unfused: SiluAndMul, shrink_concat | fused | unfused / fused | fused / base |")
    print("|---|---|---|---|---|---|")
    # each way takes (gate_up, the layer's down bank, ids, weights)
    ways: dict[str, Callable[..., object]] = {
        "base": lambda gate_up, bank, ids, w: act_fn(gate_up),
        "unfused": lambda gate_up, bank, ids, w: cpu_kernels.shrink_concat(act_fn(gate_up), bank, ids, w, r),
        "fused": lambda gate_up, bank, ids, w: cpu_kernels.silu_mul_shrink_concat(gate_up, bank, ids, w, r),
    }
    for T in (int(t) for t in args.tokens.split(",")):
        x, gate_up = rand(T, D, scale=1.0), rand(T, 2 * inter, scale=1.0)
        weights, ids = cpu_kernels.route(x, router, k)
        total = dict.fromkeys(ways, 0.0)
        for it in range(args.iters // args.layers + 1):
            for bank in banks:
                for name, fn in ways.items():  # each after the GEMM, so each finds the caches as served
                    ops.onednn_mm(base_gate_up, x, None)  # streams 3.5 MB of weights, as the MLP does
                    t = time.perf_counter()
                    fn(gate_up, bank, ids, weights)
                    if it > 0:  # the first pass over the layers warms up
                        total[name] += time.perf_counter() - t
        us = {name: t / (args.iters // args.layers * args.layers) * 1e6 for name, t in total.items()}
        print(f"| {T} | {us['base']:.1f} | {us['unfused']:.1f} | {us['fused']:.1f} | "
              f"{us['unfused'] / us['fused']:.2f} | {us['fused'] / us['base']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
