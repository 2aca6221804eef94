"""CPU: the cost of calling a C++ op through torch.ops, a pybind11 binding or a torch.library custom op, after a GEMM.

    .venv/bin/python bench/micro/cpu_call_overhead.py     # builds a throwaway extension (about 30 s), then times

The plugin calls its CPU kernels in every layer of every decode step, each call right after a GEMM has streamed
megabytes of weights through the caches. This builds one extension with the same do-nothing op bound two ways
(a `TORCH_LIBRARY` op and a pybind11 function), wraps the pybind11 one in a Python `torch.library.custom_op` (how
the plugin's compiled path calls its kernels, cpu_kernels.route_op), and times single calls in random order, each
after a base-sized gate_up GEMM (bf16, SmolLM2-135M shapes; "cold") or right after another call ("warm"). It
prints the medians and each binding's cost over pybind11. One thread, as vLLM's CPU worker serves.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch

SOURCE = r"""
#include <torch/extension.h>
torch::Tensor same(const torch::Tensor& x) { return x; }
TORCH_LIBRARY(remix_call_probe, m) { m.def("same(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(remix_call_probe, CPU, m) { m.impl("same", &same); }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("same", &same); }
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=4000)
    args = ap.parse_args()
    from torch.utils.cpp_extension import load_inline

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as build:
        module = load_inline("remix_call_probe", cpp_sources=SOURCE, build_directory=build)
    x = torch.randn(32, 576).bfloat16()
    w = torch.randn(3072, 576).bfloat16()  # SmolLM2-135M's gate_up_proj, 3.5 MB

    @torch.library.custom_op("remix_call_probe::same_py", mutates_args=())
    def same_py(x: torch.Tensor) -> torch.Tensor:
        return module.same(x).clone()  # a custom op may not return its input; the clone is timed below

    ways = {"torch.ops": torch.ops.remix_call_probe.same, "pybind11": module.same, "custom_op": same_py,
            "clone": torch.Tensor.clone}  # fmt: skip
    cold: dict[str, list[float]] = {name: [] for name in ways}
    warm: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.calls):
        name = random.choice(list(ways))
        torch.nn.functional.linear(x, w)
        t0 = time.perf_counter()
        ways[name](x)
        t1 = time.perf_counter()
        ways[name](x)
        t2 = time.perf_counter()
        cold[name].append(t1 - t0)
        warm[name].append(t2 - t1)
    print("cpu, 1 thread; one call of an op that returns its input, median us")
    print("| binding | cold (after a 3.5 MB GEMM) | warm |\n|---|---|---|")
    for name in ways:
        print(f"| {name} | {statistics.median(cold[name]) * 1e6:.1f} | {statistics.median(warm[name]) * 1e6:.1f} |")
    base = statistics.median(cold["pybind11"])
    for name in ("torch.ops", "custom_op"):
        extra = statistics.median(cold[name]) - base - (statistics.median(cold["clone"]) if name == "custom_op" else 0)
        print(f"cold: {name} / pybind11 = {statistics.median(cold[name]) / base:.1f}x, {extra * 1e6:.1f} us more "
              f"per call{' (its clone subtracted)' if name == 'custom_op' else ''}")  # fmt: skip


if __name__ == "__main__":
    main()
