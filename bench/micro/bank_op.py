"""Micro-benchmark of the ReMix bank against the base MLP, and a CUDA-graph equality check.

    python bench/micro/bank_op.py                       # CUDA host: Llama-3-8B shapes, bf16, CUDA graphs
    python bench/micro/bank_op.py --device cpu --tokens 32 --hidden 576 --intermediate 1536 --rank 8   # smoke run

Shapes default to Llama-3-8B (hidden 4096, intermediate 14336) with n=8, k=2, r=16 and 256 tokens. It times the
base MLP (gate_up GEMM, SiLU-and-mul, down GEMM) and the same MLP as the plugin runs it with the bank (the PyTorch
path, which CUDA hosts use): float32 router logits, top-k and mask, one shrink GEMM for gate+up, one gate_up GEMM
over `[x | masked h]` with the block-diagonal B appended to W, SiLU-and-mul, the down shrink, and down over
`[act | masked h]`. The bank's cost is the difference; it prints it as a fraction of the base MLP (target under
10%), eager and, on CUDA, with both MLPs replayed from CUDA graphs (as vLLM serves decode batches there, without
the launch overhead of the bank's small kernels), after checking that the ReMix MLP captured in a CUDA graph gives
the same result as eager.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_args import add_bank_args

from remix_serve import routing
from remix_serve.vllm_plugin import bank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=256)
    add_bank_args(ap, hidden=4096, intermediate=14336, rank=16)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    dev, dt = torch.device(args.device), torch.bfloat16
    T, D, inter, n, k, r = args.tokens, args.hidden, args.intermediate, args.loras, args.top_k, args.rank
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int, scale: float = 0.02, dtype: torch.dtype = dt) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dtype)

    x = rand(T, D, scale=1.0)
    w_gate, w_up, w_down = rand(inter, D), rand(inter, D), rand(D, inter)
    w_gate_up = torch.cat([w_gate, w_up])  # [2I, D]
    router = rand(n, D, dtype=torch.float32)
    a_gate, b_gate = bank.stack_bank(rand(n, r, D), rand(n, inter, r), 0.5)
    a_up, b_up = bank.stack_bank(rand(n, r, D), rand(n, inter, r), 0.5)
    a_down, b_down = bank.stack_bank(rand(n, r, inter), rand(n, D, r), 0.5)
    a_gate_up = torch.cat([a_gate, a_up])
    zeros = torch.zeros_like(b_gate)
    gate_up_fused = torch.cat([w_gate_up, torch.cat([torch.cat([b_gate, zeros], 1), torch.cat([zeros, b_up], 1)])], 1)
    down_fused = torch.cat([w_down, b_down], dim=1)  # [D, I + n*r]

    def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    def base_mlp() -> torch.Tensor:
        return silu_and_mul(x @ w_gate_up.t()) @ w_down.t()

    def remix_mlp() -> torch.Tensor:
        logits = routing.router_logits(x, router)  # [T, n]
        ids = routing.topk_ids(logits, k)  # [T, k]
        w = routing.selection_weights(logits, ids, "constant", dtype=dt)  # [T, n]
        gate_up = bank.masked_concat(x, x @ a_gate_up.t(), w, r) @ gate_up_fused.t()  # [T, 2I]
        a = silu_and_mul(gate_up)
        return bank.masked_concat(a, a @ a_down.t(), w, r) @ down_fused.t()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        for _ in range(5):  # burn-in
            fn()
        sync()
        t = time.perf_counter()
        for _ in range(args.iters):
            fn()
        sync()
        return (time.perf_counter() - t) / args.iters

    def graphed(fn):
        """fn captured in a CUDA graph (after warm-up on a side stream): (the graph, its output tensor)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        return graph, out

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{name}; T={T} D={D} I={inter} n={n} k={k} r={r} bf16")

    def report(how: str, t_base: float, t_remix: float) -> None:
        t_bank = t_remix - t_base
        print(f"{how}: base MLP {t_base * 1e3:.3f} ms, ReMix MLP {t_remix * 1e3:.3f} ms, bank {t_bank * 1e3:.3f} ms, "
              f"ratio {t_bank / t_base:.3f} (target < 0.10)")  # fmt: skip

    report("eager", timed(base_mlp), timed(remix_mlp))
    if dev.type == "cuda":  # vLLM serves decode batches on GPU from CUDA graphs
        eager = remix_mlp().clone()
        remix_graph, captured = graphed(remix_mlp)
        remix_graph.replay()
        sync()
        same = torch.equal(captured, eager)
        print(f"cuda graph replay equals eager: {same}")
        if not same:
            raise SystemExit("ReMix MLP under CUDA graph differs from eager")
        base_graph, _ = graphed(base_mlp)
        report("cuda graphs", timed(base_graph.replay), timed(remix_graph.replay))


if __name__ == "__main__":
    main()
