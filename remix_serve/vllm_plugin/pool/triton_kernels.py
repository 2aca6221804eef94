"""The pool's LoRA delta on CUDA tensors in Triton: `delta.lora_add_reference`'s contract, two small kernels.

`out[t] += sum_q coef[t, q] * (x[t] A[p]^T) B[p]` with `p = pages[t, q]`, page -1 skipped. Work per token is
GEMV-like (`K * r_page * (in + out)`, each token with its own pages), so the kernels multiply elementwise and reduce
with `tl.sum` in float32, no `tl.dot` (which also keeps them correct in bfloat16 under `TRITON_INTERPRET=1`, where
bfloat16 `tl.dot` is wrong):

- shrink, grid `(T, K, cdiv(r_page, BLOCK_R))`: `h[t, q, r] = coef[t, q] * A[p, r, :] . x[t]` in float32 (rounded
  to bf16 in a bf16 call, as the reference rounds it); zeros where p < 0 (and A is not read);
- expand, grid `(T, cdiv(N, BLOCK_N))`: each program sums `h[t, q, :] @ B[p, :, block]` over q in float32 and adds
  it into out's block once (no atomics: one program owns each output element). A row whose pages are all -1 is
  not written at all, so base-model tokens keep their exact bits (even -0.0).

r_page need not be a power of two: rank rows are masked. `out` may be a column slice of a wider tensor (every
tensor goes by its strides). Graph-safe: no host sync, no data-dependent shape; the only allocation is
`h [T, K, r_page]` float32. `pool_lora_add_triton` is the `torch.library` custom op `remix::pool_lora_add_triton`
(mutates `out`, fake impl), so a torch.compile graph keeps it as one node; `delta.lora_add` calls it for CUDA tensors.

Tested on CPU under `TRITON_INTERPRET=1` (tests/plugin/test_pool_triton.py), where the launcher also accepts CPU
tensors; on a GPU, `bench/gpu_check.py`'s pool section compares it with the reference and times it.
"""

from __future__ import annotations

import os

import torch
from vllm.triton_utils import HAS_TRITON, tl, triton

BLOCK_IN = 256  # shrink: input columns per step
BLOCK_N = 128  # expand: output columns per program
SMALL_GRID = 128  # below T*K (token, page) pairs, the shrink takes one rank row per program for parallelism


# Triton runs kernels in its interpreter (tests only): CPU tensors are then allowed. Read once, at import, so that
# `usable` is a constant to torch.compile.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def usable(device: torch.device) -> bool:
    """The kernels can run on tensors of `device`: CUDA with Triton, or any device under the interpreter."""
    return HAS_TRITON and (device.type == "cuda" or INTERPRET)


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, pages_ptr, coef_ptr, h_ptr,
    IN, R,
    sx_t, sx_i, sa_p, sa_r, sa_i, sp_t, sp_k, sc_t, sc_k, sh_t, sh_k,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    page = tl.load(pages_ptr + t * sp_t + q * sp_k)
    valid = page >= 0
    # A skipped page reads nothing: its limits become 0 (a scalar `& valid` mask is not supported by the interpreter)
    rows_read = rows < tl.where(valid, R, 0)
    in_limit = tl.where(valid, IN, 0)
    a_rows = a_ptr + tl.maximum(page, 0) * sa_p + rows[:, None] * sa_r
    x_row = x_ptr + t * sx_t
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, IN, BLOCK_I):
        cols = start + tl.arange(0, BLOCK_I)
        col_ok = cols < in_limit
        xv = tl.load(x_row + cols * sx_i, mask=col_ok, other=0.0).to(tl.float32)
        av = tl.load(a_rows + cols[None, :] * sa_i, mask=rows_read[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(av.to(tl.float32) * xv[None, :], axis=1)
    c = tl.load(coef_ptr + t * sc_t + q * sc_k).to(tl.float32)
    acc = acc * tl.where(valid, c, 0.0)  # a skipped page's coef (anything) never reaches h
    if x_ptr.dtype.element_ty == tl.bfloat16:  # rounded to bf16, as the reference does
        acc = acc.to(tl.bfloat16).to(tl.float32)
    tl.store(h_ptr + t * sh_t + q * sh_k + rows, acc, mask=rows < R)


@triton.jit
def _expand_kernel(
    h_ptr, b_ptr, pages_ptr, out_ptr,
    K, R, N,
    sh_t, sh_k, sb_p, sb_r, sb_n, sp_t, sp_k, so_t, so_n,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    # pages this token reads (a block, not a scalar: a scalar in a mask is what the interpreter rejects); none, as
    # for a base token, leaves its row of out untouched
    used = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for q in range(0, K):
        page = tl.load(pages_ptr + t * sp_t + q * sp_k)
        valid = page >= 0
        used += tl.where(valid, 1, 0)
        r_limit = tl.where(valid, R, 0)
        b_page = b_ptr + tl.maximum(page, 0) * sb_p
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            hv = tl.load(h_ptr + t * sh_t + q * sh_k + rows, mask=rows < R, other=0.0)
            b_mask = (rows < r_limit)[:, None] & col_ok[None, :]
            bv = tl.load(b_page + rows[:, None] * sb_r + cols[None, :] * sb_n, mask=b_mask, other=0.0)
            acc += tl.sum(hv[:, None] * bv.to(tl.float32), axis=0)
    out_cols = out_ptr + t * so_t + cols * so_n
    keep = col_ok & (used > 0)
    old = tl.load(out_cols, mask=keep, other=0.0)
    tl.store(out_cols, (old.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=keep)


def _pow2_at_most(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), cap)


def launch(
    out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, pages: torch.Tensor, coef: torch.Tensor
) -> None:
    """Run the two kernels (no checks beyond shapes; the custom op is the public entry)."""
    T, K = pages.shape
    R, N = A.shape[1], out.shape[1]
    if T == 0 or K == 0 or N == 0:
        return
    h = torch.empty(T, K, R, dtype=torch.float32, device=out.device)
    shrink_r = 1 if T * K < SMALL_GRID else _pow2_at_most(R, 4)
    _shrink_kernel[(T, K, triton.cdiv(R, shrink_r))](
        x, A, pages, coef, h,
        x.shape[1], R,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), pages.stride(0), pages.stride(1),
        coef.stride(0), coef.stride(1), h.stride(0), h.stride(1),
        BLOCK_R=shrink_r, BLOCK_I=min(BLOCK_IN, triton.next_power_of_2(x.shape[1])),
    )  # fmt: skip
    block_n = min(BLOCK_N, triton.next_power_of_2(N))
    _expand_kernel[(T, triton.cdiv(N, block_n))](
        h, B, pages, out,
        K, R, N,
        h.stride(0), h.stride(1), B.stride(0), B.stride(1), B.stride(2), pages.stride(0), pages.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_R=_pow2_at_most(R, 16), BLOCK_C=block_n,
    )  # fmt: skip


@torch.library.custom_op("remix::pool_lora_add_triton", mutates_args=("out",))
def pool_lora_add_triton(
    out: torch.Tensor,
    offset: int,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    pages: torch.Tensor,
    coef: torch.Tensor,
) -> None:
    """`delta.lora_add_reference(out[:, offset:offset + N], x, A, B, pages, coef)` in Triton: adds the pool delta
    into columns `[offset, offset + N)` of `out` in place (N = B's width).

    The op takes the whole output and an offset, not a column view, as `cpu_kernels.pool_lora_add_op` does: vLLM's
    compile backend miscompiled an op mutating a view of an intermediate (tests/plugin/test_pool_engine.py).
    Shapes as the reference: out `[T, >= offset + N]` (any strides), x `[T, in]`, A `[P, r_page, in]`,
    B `[P, r_page, N]`, pages `[T, K]` int64 (-1 = skip), coef `[T, K]` float32. CUDA tensors, or any under
    `TRITON_INTERPRET=1`.
    """
    if not usable(out.device):
        raise RuntimeError(
            f"remix::pool_lora_add_triton needs CUDA tensors and Triton (got {out.device}, HAS_TRITON={HAS_TRITON}); "
            "CPU tensors only under TRITON_INTERPRET=1"
        )
    out = out.narrow(1, offset, B.shape[2])
    T, K = pages.shape
    if pages.dtype != torch.int64 or coef.shape != (T, K) or x.shape[0] != T or out.shape[0] != T:
        raise ValueError(
            f"pool_lora_add_triton: pages {tuple(pages.shape)} {pages.dtype} (int64 wanted), coef "
            f"{tuple(coef.shape)}, x {tuple(x.shape)}, out {tuple(out.shape)} disagree"
        )
    if A.shape[:2] != B.shape[:2] or A.shape[2] != x.shape[1] or B.shape[2] != out.shape[1]:
        raise ValueError(
            f"pool_lora_add_triton: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit x {tuple(x.shape)} and "
            f"out {tuple(out.shape)}"
        )
    launch(out, x, A, B, pages, coef)


@pool_lora_add_triton.register_fake
def _(
    out: torch.Tensor,
    offset: int,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    pages: torch.Tensor,
    coef: torch.Tensor,
) -> None:
    return None
