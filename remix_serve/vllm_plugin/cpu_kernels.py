"""Fused CPU kernels for the plugin's MLP (csrc/remix_cpu.cpp), built once with torch's C++ extension loader.

On a small CPU each extra PyTorch op between two GEMMs costs 10-20 us, far more than its arithmetic: routing
(float32 logits, stable top-k, mask) is seven ops and appending the masked shrink output to a GEMM input is two.
`route` does routing in one op, `masked_concat` builds a fused GEMM's input from a dense shrink GEMM's output, and
`shrink_concat` builds it with the shrink of each token's k selected LoRAs computed in place (decode-sized batches,
up to GATHER_MAX_TOKENS); `silu_mul_shrink_concat` does the same for the down projection straight from the gate/up
GEMM's output, SiLU-and-mul included. Each gives the results of `routing` and `bank` (tests/plugin/test_cpu_kernels.py),
the last also of SiLU-and-mul in float32. `pool_lora_add` adds the multi-checkpoint adapter pool's per-token
page delta in place, the result of `pool.delta.lora_add_reference` (tests/plugin/test_pool_kernels.py). The build
(about 30 s, needs a C++ compiler with OpenMP and ninja) is cached under `TORCH_EXTENSIONS_DIR` (default
~/.cache/torch_extensions); `scripts/install.sh` and the CPU image run it at install time, and a build folder this
process cannot write (a read-only image) is loaded as it is. Where it cannot build, `available()` is False and the
plugin uses the PyTorch ops. `REMIX_CPU_KERNELS=0` turns them off.

The extension is a plain Python module, not a set of `torch.ops`: the plugin calls it in every layer of every
decode step, each call right after a GEMM has streamed megabytes of weights through the caches, and the
dispatcher's code and tables, evicted, cost about 20 us more per call than a direct binding
(`bench/micro/cpu_call_overhead.py`). Eager serving (remix-serve's CPU default) calls it directly. torch.compile cannot
trace a pybind11 call, so the compiled path calls the same kernels through the `torch.library` custom ops at the
end of this file (`remix::route`, `remix::bank_input`, `remix::pool_lora_add`): one opaque node each, with fake
implementations for tracing. Inference only: no autograd.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "remix_cpu.cpp"
_ext: ModuleType | None = None  # the built module, once available() has returned True


@cache
def available() -> bool:
    """Build (or load the cached build of) the kernels; False, with a warning, where that fails or is turned off."""
    if os.environ.get("REMIX_CPU_KERNELS", "1") == "0":
        return False
    global _ext
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        build = Path(_get_build_directory("remix_cpu", verbose=False))
        prebuilt = build / "remix_cpu.so"
        if prebuilt.exists() and not os.access(build, os.W_OK):  # a read-only prebuilt copy (the CPU image)
            spec = importlib.util.spec_from_file_location("remix_cpu", prebuilt)
            _ext = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(_ext)
        else:
            _ext = load(name="remix_cpu", sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp"],
                        extra_ldflags=["-fopenmp"])  # fmt: skip
    except Exception as e:  # no compiler, no ninja, read-only cache: serve with the PyTorch ops instead
        log.warning("remix-serve: fused CPU kernels unavailable, using PyTorch ops (%s: %s)", type(e).__name__, e)
        return False
    return True


def _lib() -> ModuleType:
    if _ext is None:
        raise RuntimeError(
            "remix-serve CPU kernels are not loaded: call cpu_kernels.available() first (it builds them)"
        )
    return _ext


def route(x: torch.Tensor, router: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[T, n]` selection mask in x's dtype and `[T, k]` ids: routing.topk_ids + selection_mask of the logits."""
    mask, ids = _lib().route(x, router, k)
    return mask, ids


def masked_concat(x: torch.Tensor, h: torch.Tensor, weights: torch.Tensor, rank: int) -> torch.Tensor:
    """`[x | h * weights]`, as `bank.masked_concat`; h may be a column slice (rows contiguous)."""
    return _lib().masked_concat(x, h, weights, rank)


# Tokens up to which shrink_concat (a gather over the selected LoRAs) beats the dense shrink GEMM on the matrix
# units plus masked_concat, as served (each layer's bank out of cache): `bench/micro/cpu_shrink.py` prints both by batch
# size. On a 2-core Xeon with AMX, one thread: 2.2x faster for one token, 1.5x for 32, 1.3-1.6x for 64, about
# even from 128.
GATHER_MAX_TOKENS = 64


def shrink_concat(
    x: torch.Tensor, bank_A: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, rank: int
) -> torch.Tensor:
    """`[x | mask_blocks(x bank_A^T, weights, rank)]`: `bank.masked_concat` after the shrink GEMM, in one op.

    Computes the shrink for each token's k selected LoRAs only. `bank_A` is `[m*n*r, D]` (m stacked banks) in
    x's dtype or float32; `ids` `[T, k]` (int64) and `weights` `[T, n]` come from routing. bf16 uses AVX512-BF16
    dot products where the CPU has them.
    """
    return _lib().shrink_concat(x, bank_A, ids, weights, rank)


def silu_mul_shrink_concat(
    gate_up: torch.Tensor, bank_A: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, rank: int
) -> torch.Tensor:
    """`shrink_concat(silu(gate) * up, ...)` in one op, from the gate/up GEMM's output `[T, 2I]` = `[gate | up]`.

    SiLU-and-mul is computed in float32 and rounded once to the input's dtype; vLLM's x86 CPU path for it is
    two PyTorch ops (`F.silu(gate) * up`), each rounding. The down projection's fused input then takes one op.
    """
    return _lib().shrink_concat(gate_up, bank_A, ids, weights, rank, True)


def pool_lora_add(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    pages: torch.Tensor,
    coef: torch.Tensor,
    pages_per_pick: int = 1,
) -> None:
    """Add the adapter pool's per-token LoRA delta into `out` in place: `pool.delta.lora_add_reference`'s result.

    Each token of a mixed batch brings its own pages (its checkpoint's top-k LoRAs, in rank-chunk pages) and a
    coefficient per page (in a bf16 call, its `coef * (A x)` is rounded to bf16 before the expand, as in the
    reference); page -1 is skipped, and a token whose pages are all -1 (a base-model token) is left
    bit-identical. Only the listed pages are read, so a call costs the same whatever the checkpoints' n and however
    many checkpoints the pool holds. The reference gathers and copies every page it uses and runs two batched GEMMs
    per page slot; this reads each page once, accumulates in float32 and rounds once into `out`. `out` `[T, N]`
    and `x` `[T, in]` may be column slices (e.g. one half of a gate/up output); `A` `[P, r_page, in]`, `B`
    `[P, r_page, N]`, all four in one dtype; `pages` `[T, K]` int64, `coef` `[T, K]` float32. A page id outside
    `[-1, P)` raises before anything is written.

    bf16 calls of 32 tokens or more whose picked LoRAs are shared (8 or more tokens each, on average) run on the AMX
    matrix units where the CPU has them (`amx_available()`); without them, bf16 calls of 4 tokens or more whose
    LoRAs average 4 or more tokens run tiled on AVX512-BF16 where the CPU has that (`tiled_available()`: four
    tokens and four rank rows per pass, each page read once per call).
    `pages_per_pick` (dividing K) says that each run of that many pages in a token's list is one pick's LoRA, as
    `pool_route` lists them: the AMX and tiled paths then multiply the run as one matrix (up to 16 and 32 ranks).
    The result does not depend on it.
    """
    _lib().pool_lora_add(out, x, A, B, pages, coef, pages_per_pick)


def amx_available() -> bool:
    """Whether `pool_lora_add` can use the AMX-BF16 matrix units on this CPU (and this process may)."""
    return bool(_lib().amx_available())


def set_amx(on: bool) -> bool:
    """Allow (or not) `pool_lora_add`'s AMX path in this process; returns the previous setting. For tests and
    benchmarks that compare the two paths; `REMIX_CPU_AMX=0` turns it off from the start."""
    return bool(_lib().set_amx(on))


def tiled_available() -> bool:
    """Whether `pool_lora_add` has its tiled AVX512-BF16 path for bf16 calls on this CPU."""
    return bool(_lib().tiled_available())


def set_tiled(on: bool) -> bool:
    """Allow (or not) `pool_lora_add`'s tiled AVX512-BF16 path in this process; returns the previous setting. For
    tests and benchmarks that compare it with the page-by-page path; `REMIX_CPU_TILED=0` turns it off from the start."""
    return bool(_lib().set_tiled(on))


def pool_route(
    x: torch.Tensor,
    routers: torch.Tensor,
    bias: torch.Tensor,
    k: torch.Tensor,
    softmax: torch.Tensor,
    slots: torch.Tensor,
    tables: torch.Tensor,
    k_max: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The adapter pool's routing for one layer in one op: `(pages [T, P, k_max*ppl], coef [T, k_max*ppl],
    ids [T, k_max])`, as `AdapterPool.route`'s PyTorch ops compute them (`routing.per_token_selection` over each
    token's own router, then its slot's page table; -1 past a token's k). About twenty PyTorch ops per layer become
    one, and a token routes against its own router only. `routers [S, n_max, D]`, `bias [S, n_max]` (float32),
    `k [S]`, `softmax [S]`, `tables [S, P, n_max, ppl]` are one layer's rows; `slots [T]` index them."""
    pages, coef, ids = _lib().pool_route(x, routers, bias, k, softmax, slots, tables, k_max)
    return pages, coef, ids


# --- The compiled path: the kernels above as torch.library custom ops, which torch.compile keeps as opaque nodes.


@torch.library.custom_op("remix::route", mutates_args=())
def route_op(x: torch.Tensor, router: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`route` as a custom op."""
    mask, ids = _lib().route(x, router, k)
    return mask, ids


@route_op.register_fake
def _(x: torch.Tensor, router: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = x.shape[0]
    return x.new_empty(T, router.shape[0]), x.new_empty(T, k, dtype=torch.int64)


@torch.library.custom_op("remix::bank_input", mutates_args=())
def bank_input_op(
    x: torch.Tensor, bank_A: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, rank: int, silu_mul: bool
) -> torch.Tensor:
    """A fused GEMM's input for any batch size: `shrink_concat` (or `silu_mul_shrink_concat`) up to
    GATHER_MAX_TOKENS, else the dense shrink and `masked_concat`.

    The batch-size choice the eager plugin makes in Python is made here, inside the op, because a compiled graph
    is traced once for every batch size. With `silu_mul`, `x` is the gate/up output `[T, 2I]` and the prefill
    branch computes SiLU-and-mul in float32, rounded once, as the gather kernel does.
    """
    if x.shape[0] <= GATHER_MAX_TOKENS:
        return _lib().shrink_concat(x, bank_A, ids, weights, rank, silu_mul)
    if silu_mul:
        gate, up = x.float().chunk(2, dim=-1)
        x = (torch.nn.functional.silu(gate) * up).to(bank_A.dtype)
    return _lib().masked_concat(x, x @ bank_A.t(), weights, rank)


@bank_input_op.register_fake
def _(
    x: torch.Tensor, bank_A: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, rank: int, silu_mul: bool
) -> torch.Tensor:
    width = x.shape[1] // 2 if silu_mul else x.shape[1]
    return x.new_empty(x.shape[0], width + bank_A.shape[0])


@torch.library.custom_op("remix::pool_lora_add", mutates_args=("out",))
def pool_lora_add_op(
    out: torch.Tensor,
    offset: int,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    pages: torch.Tensor,
    coef: torch.Tensor,
    pages_per_pick: int,
) -> None:
    """`pool_lora_add` into columns `[offset, offset + N)` of `out` (N = B's width), as a custom op that mutates
    `out`. The op takes the whole tensor and the offset, not a column view: a compiled graph in vLLM's backend got
    wrong results from an op mutating a view of an intermediate (tests/plugin/test_pool_engine.py)."""
    _lib().pool_lora_add(out.narrow(1, offset, B.shape[2]), x, A, B, pages, coef, pages_per_pick)


@pool_lora_add_op.register_fake
def _(
    out: torch.Tensor,
    offset: int,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    pages: torch.Tensor,
    coef: torch.Tensor,
    pages_per_pick: int,
) -> None:
    return None


@torch.library.custom_op("remix::pool_route", mutates_args=())
def pool_route_op(
    x: torch.Tensor,
    routers: torch.Tensor,
    bias: torch.Tensor,
    k: torch.Tensor,
    softmax: torch.Tensor,
    slots: torch.Tensor,
    tables: torch.Tensor,
    k_max: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pool_route` as a custom op."""
    pages, coef, ids = _lib().pool_route(x, routers, bias, k, softmax, slots, tables, k_max)
    return pages, coef, ids


@pool_route_op.register_fake
def _(
    x: torch.Tensor,
    routers: torch.Tensor,
    bias: torch.Tensor,
    k: torch.Tensor,
    softmax: torch.Tensor,
    slots: torch.Tensor,
    tables: torch.Tensor,
    k_max: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, projs, K = x.shape[0], tables.shape[1], k_max * tables.shape[3]
    long = torch.int64
    return (
        x.new_empty(T, projs, K, dtype=long),
        x.new_empty(T, K, dtype=torch.float32),
        x.new_empty(T, k_max, dtype=long),
    )
