"""CPU layout of the fused gate/up projection: one GEMM with a block-diagonal B against two half-width GEMMs.

    .venv/bin/python bench/micro/cpu_gate_up.py           # SmolLM2-135M shapes, n*r = 64, 32 tokens, bf16, one thread

The plugin appends each adapted projection's B to its base weight along the input dimension. For gate and up that
is either one GEMM over `[x | h_gate | h_up]` with `[[W_gate, B_gate, 0], [W_up, 0, B_up]]` (zero blocks: more
bytes and multiply-adds, one call) or two GEMMs over `[x | h_gate]` and `[x | h_up]` (no zeros, two calls). This
times both, and the base gate_up GEMM alone, with vLLM's oneDNN GEMM as the plugin runs it. As in serving, each
call finds its weights out of cache: the script cycles through --layers layers' weights with a down-sized GEMM
between them. It prints the median per layer over --repeats and the ratios to the base.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--bank-width", type=int, default=64, help="n * r of one bank")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from vllm import _custom_ops as ops

    D, inter, nr, T = args.hidden, args.intermediate, args.bank_width, args.tokens
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    # layout -> the [out, in] weights of its GEMMs
    layouts = {
        "base gate_up": [(2 * inter, D)],
        "two GEMMs": [(inter, D + nr), (inter, D + nr)],
        "one GEMM, zero blocks": [(2 * inter, D + 2 * nr)],
    }
    handles = {
        name: [[ops.create_onednn_mm(rand(n, k).t(), 32) for n, k in shapes] for _ in range(args.layers)]
        for name, shapes in layouts.items()
    }
    inputs = {k: rand(T, k) * 50 for k in {k for shapes in layouts.values() for _, k in shapes}}
    down = [ops.create_onednn_mm(rand(D, inter).t(), 32) for _ in range(args.layers)]  # evicts between layers
    act = rand(T, inter)

    def per_layer(name: str) -> float:
        total = 0.0
        for layer in range(args.layers):
            ops.onednn_mm(down[layer], act, None)
            t = time.perf_counter()
            for (_, k), handle in zip(layouts[name], handles[name][layer], strict=True):
                ops.onednn_mm(handle, inputs[k], None)
            total += time.perf_counter() - t
        return total / args.layers

    times: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(args.repeats):  # layouts alternate, so drift of the machine hits all alike
        for name in layouts:
            times[name].append(per_layer(name))
    base = statistics.median(times["base gate_up"])
    print(f"cpu, {torch.get_num_threads()} thread(s); T={T} D={D} I={inter} n*r={nr} bf16; out of cache")
    print("| layout | us per layer (median) | / base |")
    print("|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts) * 1e6:.1f} | {statistics.median(ts) / base:.3f} |")


if __name__ == "__main__":
    main()
