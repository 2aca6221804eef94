"""CPU adapter pool: the gather kernel `pool_lora_add` against its PyTorch reference, by batch, K and pool size.

    .venv/bin/python bench/micro/cpu_pool_lora.py         # SmolLM2-135M shapes, bf16, r_page=8, one thread

One projection's pool delta (`pool/delta.py`), `out[t] += sum_q coef[t,q] (x[t] A[p]^T) B[p]`, timed three ways:
  kernel:    `cpu_kernels.pool_lora_add` (csrc/remix_cpu.cpp), what `pool.delta.lora_add` runs on CPUs (from 4
             tokens on the AMX matrix units where the CPU has them, else tiled on AVX512-BF16 where it has that);
  by page:   the same kernel with both turned off (`set_amx(False)`, `set_tiled(False)`): page by page on AVX-512;
  reference: `pool.delta.lora_add_reference` (gathers of the pages, batched GEMMs);
and, for scale, the base model's GEMM of the same projection (`F.linear`, oneDNN on the matrix units), for the
gate projection (D -> I, into the column slice `gate_up[:, :I]`) and the down projection (I -> D), at T tokens,
each with K = k * ceil(r / r_page) pages picked at random from a pool of P = n * 30 pages (n LoRAs of a
checkpoint, 30 layers' worth), or with --one-layer from one layer's n LoRAs (P = n * ceil(r / r_page), each
pick's pages together, as a prefill of one checkpoint picks them). The kernel reads only the listed pages, so
for a fixed K its work is the same for n=8 and n=64, and so is a decode token's time; in larger batches a small
pool's pages are shared by more tokens (fewer distinct MB) and come from L2 more often, which a large pool's do
not. Each call gets a fresh random page list and finds the pages out of L2 (a 16 MiB sweep runs between calls,
timed apart), as in serving, where each layer's pages were last read a whole step ago. Beside each time: the
bytes of the distinct pages the call must read (pages * r_page * (in + N) * 2) and the implied bandwidth. One
thread by default, as vLLM's CPU worker serves; --threads changes it.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--r-page", type=int, default=8)
    ap.add_argument("--tokens", default="1,32,480")
    ap.add_argument("--kr", default="2x8,2x16", help="top-k x rank pairs; K = k * ceil(r / r_page)")
    ap.add_argument("--loras", default="8,64", help="checkpoint n values; the pool holds n * 30 pages")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one-layer", action="store_true", help="pages from one layer's n LoRAs (a prefill)")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds of timed calls per cell (at least 5)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from remix_serve.vllm_plugin import cpu_kernels
    from remix_serve.vllm_plugin.pool.delta import lora_add_reference

    if not cpu_kernels.available():
        raise SystemExit("the CPU kernels did not build; see the warning above")
    D, inter, rp = args.hidden, args.intermediate, args.r_page
    bf16 = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    sweep = torch.ones(4 << 20)  # 16 MiB: evicts L2 between calls

    def timed(fn: Callable[[torch.Tensor], object], page_lists: list[torch.Tensor]) -> float:
        """Median seconds per call of fn(pages), each call on the next page list, after a cache sweep."""
        times: list[float] = []
        start = time.perf_counter()
        i = 0
        while len(times) < 5 or time.perf_counter() - start < args.min_time:
            pages = page_lists[i % len(page_lists)]
            sweep.sum()
            t = time.perf_counter()
            fn(pages)
            times.append(time.perf_counter() - t)
            i += 1
        return sorted(times)[len(times) // 2]

    print(
        f"cpu, {torch.get_num_threads()} thread(s); D={D} I={inter} r_page={rp} bf16; median us per call, "
        "pages out of L2; MB = distinct pages read * r_page * (in + N) * 2 bytes"
    )
    print("| proj | T | k, r | K | n (P pages) | MB read | kernel us | GB/s | by page us | reference us | "
          "reference / kernel | base GEMM us | kernel / GEMM |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for proj, d_in, d_out in (("gate", D, inter), ("down", inter, D)):
        for T in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(T, d_in, generator=g).to(bf16)
            wide = torch.randn(T, 2 * d_out, generator=g).to(bf16)  # gate_up; down writes a plain [T, D]
            W = (torch.randn(d_out, d_in, generator=g) * 0.02).to(bf16)
            for kr in args.kr.split(","):
                k, r = (int(v) for v in kr.split("x"))
                ppl = math.ceil(r / rp)
                K = k * ppl
                coef = torch.rand(T, K, generator=g)
                for n in (int(v) for v in args.loras.split(",")):
                    P = n * ppl if args.one_layer else n * 30
                    A = (torch.randn(P, rp, d_in, generator=g) * 0.02).to(bf16)
                    B = (torch.randn(P, rp, d_out, generator=g) * 0.02).to(bf16)
                    if args.one_layer:  # k distinct LoRAs per token, each its ppl pages in a row
                        picks = [torch.rand(T, n, generator=g).argsort(dim=1)[:, :k] for _ in range(16)]
                        page_lists = [(ids[:, :, None] * ppl + torch.arange(ppl)).reshape(T, K) for ids in picks]
                    else:
                        page_lists = [torch.randint(0, P, (T, K), generator=g) for _ in range(16)]
                    out = wide[:, :d_out] if proj == "gate" else wide[:, :d_out].contiguous()
                    distinct = sum(p.unique().numel() for p in page_lists) / len(page_lists)
                    mb = distinct * rp * (d_in + d_out) * 2 / 1e6

                    def kernel(pages: torch.Tensor) -> None:
                        cpu_kernels.pool_lora_add(out, x, A, B, pages, coef, ppl if args.one_layer else 1)  # noqa: B023

                    def reference(pages: torch.Tensor) -> None:
                        lora_add_reference(out, x, A, B, pages, coef)  # noqa: B023

                    timed(kernel, page_lists[:2])  # warm-up
                    t_kernel, t_ref = timed(kernel, page_lists), timed(reference, page_lists)
                    was = cpu_kernels.set_amx(False), cpu_kernels.set_tiled(False)
                    t_avx = timed(kernel, page_lists)
                    cpu_kernels.set_amx(was[0]), cpu_kernels.set_tiled(was[1])
                    t_gemm = timed(lambda _: torch.nn.functional.linear(x, W), page_lists[:1])  # noqa: B023
                    row = [proj, str(T), f"{k}, {r}", str(K), f"{n} ({P})", f"{mb:.2f}", f"{t_kernel * 1e6:.1f}",
                           f"{mb / 1e3 / t_kernel:.1f}", f"{t_avx * 1e6:.1f}", f"{t_ref * 1e6:.1f}",
                           f"{t_ref / t_kernel:.1f}", f"{t_gemm * 1e6:.1f}", f"{t_kernel / t_gemm:.2f}"]  # fmt: skip
                    print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
