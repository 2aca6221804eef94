"""The pool's LoRA delta over pages: `out[t] += sum_q coef[t, q] * (x[t] A[p]^T) B[p]` with `p = pages[t, q]`.

One projection of one layer, every token of a mixed batch at once. Each token brings its own list of pages (its
checkpoint's top-k LoRAs, `ceil(r / r_page)` rank-chunk pages each) and a coefficient per page (1 for ReMix, whose
omega is folded into B; the renormalised softmax weight for softmax checkpoints); page -1 is skipped, so base-model
tokens and unused picks cost nothing. Work per token is `K * r_page * (in + out)` whatever the checkpoints' n.

Store layout (`PoolStores` in `pool/model.py` allocates it once): `A [P, r_page, in]` holds rank rows of A, and
`B [P, r_page, out]` the matching columns of omega * B, transposed so that the expand reads contiguous rows.

`lora_add` uses the CPU gather kernel (`cpu_kernels.pool_lora_add`, csrc/remix_cpu.cpp) where it is built and the
tensors are on the CPU, else `lora_add_reference`, the PyTorch reference every kernel is tested against.
"""

from __future__ import annotations

import torch

REFERENCE_CHUNK = 256  # tokens per gather in the reference: bounds its [chunk, r_page, in] copies


def lora_add_reference(
    out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, pages: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """Add the pool delta into `out` in place (PyTorch ops; float32 accumulation, one rounding to out's dtype).

    Args:
        out: `[T, out]`, may be a column slice of a wider tensor.
        x: `[T, in]`.
        A: `[P, r_page, in]`; B: `[P, r_page, out]`.
        pages: `[T, K]` int64 page ids, -1 = skip.
        coef: `[T, K]` float32 coefficient of each page.

    Returns:
        `out`.
    """
    T, K = pages.shape
    for start in range(0, T, REFERENCE_CHUNK):
        stop = min(start + REFERENCE_CHUNK, T)
        p, c = pages[start:stop], coef[start:stop].float()
        c = torch.where(p >= 0, c, torch.zeros_like(c))
        p = p.clamp(min=0)
        xs = x[start:stop].float()
        delta = torch.zeros(stop - start, out.shape[1], dtype=torch.float32, device=out.device)
        for q in range(K):
            h = torch.bmm(A[p[:, q]].float(), xs[:, :, None])[:, :, 0] * c[:, q : q + 1]  # [t, r_page]
            delta += torch.bmm(h[:, None, :], B[p[:, q]].float())[:, 0]  # [t, out]
        out[start:stop] = (out[start:stop].float() + delta).to(out.dtype)
    return out


def lora_add(
    out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, pages: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """`lora_add_reference`'s result, by the fastest implementation available for these tensors."""
    from remix_serve.vllm_plugin import cpu_kernels

    if out.device.type == "cpu" and cpu_kernels.available():
        cpu_kernels.pool_lora_add(out, x, A, B, pages, coef)
        return out
    return lora_add_reference(out, x, A, B, pages, coef)
