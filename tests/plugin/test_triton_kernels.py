"""vLLM's Triton `fused_moe_lora`, pages as experts, equals the PyTorch bank delta of a paged ReMix pool.

Issue 14 plans the GPU path of the multi-checkpoint pool on this op (`docs/architecture.md`, "Multi-checkpoint
pool"). Here it runs under `TRITON_INTERPRET=1` on CPU tensors (tests/helpers/triton_interpret.py, in a subprocess)
on a pool holding three checkpoints of different n, k and r on scattered pages, plus base-model tokens, and is
compared with the project's own math: `routing.topk_ids` and `bank.stack_bank`/`mask_blocks` per checkpoint, in
float64.
float32 and float16 only: the interpreter's bfloat16 `tl.dot` is wrong, so a bf16 case would test the interpreter.
The first two tests check that the harness really interprets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import pytest
import torch
import triton
import triton.language as tl

from remix_serve import routing
from remix_serve.vllm_plugin import bank
from tests.helpers import triton_interpret

pytestmark = pytest.mark.triton

D, INTER, R = 128, 96, 8  # hidden, intermediate, page rank (every page holds one rank-R LoRA of one projection)
# (n, k, r) per checkpoint; r=4 is zero-padded into rank-8 pages, since the op has one rank per call.
CHECKPOINTS = [(4, 2, 8), (6, 3, 8), (3, 1, 4)]
NUM_PAGES = 20  # 13 in use; the free ones hold NaN, so a read of a wrong page cannot go unnoticed
ALPHA = 16.0
PROJECTIONS = {"gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
SHAPES = {"gate_proj": (D, INTER), "up_proj": (D, INTER), "down_proj": (INTER, D)}  # (in, out)
# T=6 takes the small-batch GEMV kernel (T * k_max * R <= 1024); T=70 the one-shot shrink+expand kernel.
EXPECTED_PATH = {6: "_run_fused_moe_lora_small_batch", 70: "_run_fused_moe_lora_one_shot"}
CASES = [(dtype, T, proj) for dtype in ("float32", "float16") for T in EXPECTED_PATH for proj in PROJECTIONS]
# Relative to the largest |delta|. float32: the kernels sum <= D + k*R products in float32 in another order than
# the float64 reference (observed ~1e-7). float16: the one-shot kernel rounds the rank vector to float16 and both
# kernels round each (token, pick) row to float16 (2^-11 each; observed 3e-4 to 5e-4). 1e-2 leaves headroom, while a
# wrong page or a missed pick is off by O(1) and a B page 5% off already fails (checked by hand).
RTOL = {"float32": 1e-5, "float16": 1e-2}


# ---- run in the interpreted subprocess (tests/helpers/triton_interpret.py imports this module after its shim) ----


@triton.jit
def _add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


def add_case(n: int) -> dict:
    """A trivial kernel on CPU tensors: its error and the class that ran it."""
    x = torch.arange(n, dtype=torch.float32)
    y = torch.full((n,), 0.5)
    out = torch.full((n,), float("nan"))
    _add_kernel[(triton.cdiv(n, 16),)](x, y, out, n, BLOCK=16)
    return {"max_err": (out - (x + y)).abs().max().item(), "kernel": type(_add_kernel).__name__}


def _build_pool(dtype: torch.dtype, g: torch.Generator) -> tuple[list, dict, dict, torch.Tensor]:
    """Random checkpoints stacked with `bank.stack_bank` (omega folded into B), copied onto scattered pages.

    Returns:
        routers (`[n, D]` float32 per checkpoint), banks (projection -> per checkpoint `(A_all [n*r, in],
        B_all [out, n*r])` in `dtype`), pools (projection -> `(A [1, P, R, in], B [1, P, out, R])`), and the
        page table `[C, n_max]` int64 (-1 past a checkpoint's n).
    """
    page_table = torch.full((len(CHECKPOINTS), max(n for n, _, _ in CHECKPOINTS)), -1, dtype=torch.int64)
    free = torch.randperm(NUM_PAGES, generator=g).tolist()
    for c, (n, _, _) in enumerate(CHECKPOINTS):
        page_table[c, :n] = torch.tensor([free.pop() for _ in range(n)])
    routers = [torch.randn(n, D, generator=g) for n, _, _ in CHECKPOINTS]
    banks: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    pools: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for proj, (fan_in, fan_out) in SHAPES.items():
        a_pool = torch.full((1, NUM_PAGES, R, fan_in), float("nan"), dtype=dtype)
        b_pool = torch.full((1, NUM_PAGES, fan_out, R), float("nan"), dtype=dtype)
        banks[proj] = []
        for c, (n, k, r) in enumerate(CHECKPOINTS):
            lora_A = (torch.randn(n, r, fan_in, generator=g) / math.sqrt(fan_in)).to(dtype)
            lora_B = torch.randn(n, fan_out, r, generator=g).to(dtype)
            a_all, b_all = bank.stack_bank(lora_A, lora_B, routing.omega(ALPHA, k, r, "lora"))
            banks[proj].append((a_all, b_all))
            for i, page in enumerate(page_table[c, :n].tolist()):
                a_pool[0, page], b_pool[0, page] = 0.0, 0.0  # rank padding past r must be zero, not NaN
                a_pool[0, page, :r] = a_all[i * r : (i + 1) * r]
                b_pool[0, page, :, :r] = b_all[:, i * r : (i + 1) * r]
        pools[proj] = (a_pool, b_pool)
    return routers, banks, pools, page_table


def _spy(fn: Callable, name: str, calls: list[str]) -> Callable:
    def wrapper(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    return wrapper


def paged_pool_cases(cases: list[list]) -> dict[str, dict]:
    """Run `fused_moe_lora` (naive path) on a paged pool for each `(dtype, T, projection)`; report the errors.

    Each token belongs to checkpoint 0, 1, 2 or the base (-1). The kernel gets `token_lora_mapping` 0 for ReMix
    tokens and -1 for base tokens, `expert_ids = page_table[ckpt, topk_ids]` padded with -1 to k_max (base
    tokens get real pages, so only the mapping can make them skip), unit `topk_weights` with
    `mul_routed_weight=False` (omega is in B). The reference sums nothing it does not select.
    """
    from vllm.lora.ops.triton_ops import fused_moe_lora_op as op

    calls: list[str] = []
    for name in EXPECTED_PATH.values():
        setattr(op, name, _spy(getattr(op, name), name, calls))
    k_max = max(k for _, k, _ in CHECKPOINTS)
    results = {}
    for dtype_name, T, proj in cases:
        dtype = getattr(torch, dtype_name)
        g = torch.Generator().manual_seed(T)
        routers, banks, pools, page_table = _build_pool(dtype, g)
        names = PROJECTIONS[proj]
        x = torch.randn(T, D, generator=g).to(dtype)  # MLP input: the router's input, and gate/up's
        shrink_in = x if proj == "gate_up" else torch.randn(T, INTER, generator=g).to(dtype)  # down: the activation
        token_ckpt = (torch.arange(T) % (len(CHECKPOINTS) + 1) - 1)[torch.randperm(T, generator=g)]  # [T]
        expert_ids = page_table[0, :k_max].repeat(T, 1)  # [T, k_max]; base rows keep these real pages
        expected = torch.zeros(T, sum(SHAPES[name][1] for name in names), dtype=torch.float64)
        for c, (n, k, r) in enumerate(CHECKPOINTS):
            rows = (token_ckpt == c).nonzero().squeeze(1)
            ids = routing.topk_ids(routing.router_logits(x[rows], routers[c]), k)  # [Tc, k]
            expert_ids[rows] = -1
            expert_ids[rows, :k] = page_table[c][ids]
            a_all = torch.cat([banks[name][c][0] for name in names]).double()  # [m*n*r, in]
            h = bank.mask_blocks(shrink_in[rows].double() @ a_all.t(), routing.selection_mask(ids, n, torch.float64), r)
            expected[rows] = torch.cat(
                [h_m @ banks[name][c][1].double().t() for h_m, name in zip(h.chunk(len(names), 1), names, strict=True)],
                dim=1,
            )
        out = torch.zeros(T, k_max, expected.shape[1], dtype=dtype)  # [T, k_max, m*out]
        calls.clear()
        start = time.perf_counter()
        op.fused_moe_lora(
            out,
            shrink_in,
            [pools[name][0] for name in names],
            [pools[name][1] for name in names],
            torch.ones(T, k_max, dtype=dtype),  # topk_weights, unused with mul_routed_weight=False
            None,  # sorted_token_ids: the naive path, one program per (token, pick)
            expert_ids.flatten(),
            None,  # num_tokens_post_padded
            torch.where(token_ckpt >= 0, 0, -1).to(torch.int32),  # token_lora_mapping
            R,
            k_max,
            torch.zeros(1, dtype=torch.int32),  # lora_ids (read by the sorted path only)
            torch.ones(1, dtype=torch.int32),  # num_active_loras
            torch.ones(1, dtype=torch.int32),  # adapter_enabled
            *(16, 32, 32, 1, 4, 3, 1),  # shrink block M/N/K, group M, warps, stages, split K: two-kernel path only
            *(16, 32, 32, 1, 4, 3, 1),  # expand, likewise
            False,  # mul_routed_weight
            False,  # fully_sharded
            0,  # offset
            True,  # add_inputs
        )
        seconds = time.perf_counter() - start
        delta = out.double().sum(dim=1)  # [T, m*out]
        results[f"{dtype_name}-{T}-{proj}"] = {
            "paths": list(calls),
            "seconds": round(seconds, 2),
            "max_err": (delta - expected).abs().max().item(),
            "scale": expected.abs().max().item(),
            "base_rows_zero": bool((out[token_ckpt < 0] == 0).all()),
            "padded_picks_zero": bool((out[expert_ids < 0] == 0).all()),
            "kernel": type(op._fused_moe_lora_small_batch_kernel.fn).__name__,
        }
    return results


# ---- the tests (pytest process; no vLLM import here) ----


def test_harness_interprets_a_trivial_kernel_on_cpu_tensors():
    result = triton_interpret.run("tests.plugin.test_triton_kernels:add_case", n=37)
    assert result == {"max_err": 0.0, "kernel": "InterpretedFunction"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU driver Triton compiles instead of failing")
def test_harness_without_triton_interpret_reports_the_driver_error():
    with pytest.raises(triton_interpret.InterpretedRunError, match="0 active drivers"):
        triton_interpret.run("tests.plugin.test_triton_kernels:add_case", interpret=False, n=37)


@pytest.fixture(scope="module")
def pool_results() -> dict[str, dict]:
    """Every case in one interpreted subprocess: vLLM's import is paid once."""
    return triton_interpret.run("tests.plugin.test_triton_kernels:paged_pool_cases", cases=CASES)


@pytest.mark.parametrize(("dtype", "T", "proj"), CASES)
def test_fused_moe_lora_computes_the_paged_pool_bank_delta(pool_results, dtype, T, proj):
    result = pool_results[f"{dtype}-{T}-{proj}"]
    assert result["kernel"] == "InterpretedFunction"
    assert result["paths"] == [EXPECTED_PATH[T]]
    assert result["base_rows_zero"], "base-model tokens (token_lora_mapping -1) got a delta"
    assert result["padded_picks_zero"], "a -1 expert id (k below k_max) wrote its row"
    assert result["max_err"] <= RTOL[dtype] * result["scale"], result
