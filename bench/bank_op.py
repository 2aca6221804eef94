"""Micro-benchmark of the ReMix bank op against the base MLP's GEMMs, and a CUDA-graph equality check.

    python bench/bank_op.py                       # CUDA host: Llama-3-8B shapes, bf16, CUDA graphs
    python bench/bank_op.py --device cpu --tokens 32 --hidden 576 --intermediate 1536 --rank 8   # smoke run

Shapes default to Llama-3-8B (hidden 4096, intermediate 14336) with n=8, k=2, r=16 and 256 tokens. The bank op is
what the plugin runs per adapted MLP: float32 router logits, top-k, selection mask, then for gate+up one shrink
GEMM, mask, two expand GEMMs; for down one shrink, mask, one expand. It prints the bank op's time as a fraction of
the base MLP's three GEMMs (target under 10%) and, on CUDA, checks that the op captured in a CUDA graph gives the
same result as eager.
"""

from __future__ import annotations

import argparse
import time

import torch

from remix_serve import routing
from remix_serve.vllm_plugin import bank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--loras", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    dev, dt = torch.device(args.device), torch.bfloat16
    T, D, inter, n, k, r = args.tokens, args.hidden, args.intermediate, args.loras, args.top_k, args.rank
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int, scale: float = 0.02, dtype: torch.dtype = dt) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dtype)

    x = rand(T, D, scale=1.0)
    w_gate_up, w_down = rand(2 * inter, D), rand(D, inter)
    router = rand(n, D, dtype=torch.float32)
    a_gate, b_gate = bank.stack_bank(rand(n, r, D), rand(n, inter, r), 0.5)
    a_up, b_up = bank.stack_bank(rand(n, r, D), rand(n, inter, r), 0.5)
    a_down, b_down = bank.stack_bank(rand(n, r, inter), rand(n, D, r), 0.5)
    a_gate_up = torch.cat([a_gate, a_up])
    act = rand(T, inter, scale=1.0)
    gate_up_out = torch.empty(T, 2 * inter, device=dev, dtype=dt)
    down_out = torch.empty(T, D, device=dev, dtype=dt)

    def base_gemms() -> None:
        torch.mm(x, w_gate_up.t(), out=gate_up_out)
        torch.mm(act, w_down.t(), out=down_out)

    def bank_op() -> torch.Tensor:
        logits = routing.router_logits(x, router)  # [T, n]
        ids = routing.topk_ids(logits, k)  # [T, k]
        w = routing.selection_mask(ids, n).to(dt)  # [T, n]
        h = bank.mask_blocks(x @ a_gate_up.t(), w, r)  # [T, 2*n*r]
        gate_up_out[:, :inter] += h[:, : n * r] @ b_gate.t()
        gate_up_out[:, inter:] += h[:, n * r :] @ b_up.t()
        return down_out + bank.mask_blocks(act @ a_down.t(), w, r) @ b_down.t()

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

    if dev.type == "cuda":
        base_gemms()
        eager = bank_op().clone()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            base_gemms()
            bank_op()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            base_gemms()
            captured = bank_op()
        graph.replay()
        sync()
        same = torch.equal(captured, eager)
        print(f"cuda graph replay equals eager: {same}")
        if not same:
            raise SystemExit("bank op under CUDA graph differs from eager")

    t_base, t_bank = timed(base_gemms), timed(bank_op)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{name}; T={T} D={D} I={inter} n={n} k={k} r={r} bf16: base MLP GEMMs {t_base * 1e3:.3f} ms, "
          f"bank op {t_bank * 1e3:.3f} ms, ratio {t_bank / t_base:.3f} (target < 0.10)")  # fmt: skip


if __name__ == "__main__":
    main()
