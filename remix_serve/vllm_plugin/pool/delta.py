"""The pool's per-layer math in PyTorch, the reference its kernels are tested against: routing and the LoRA delta.

`route_reference`: each token is routed with its own slot's router (`routing.per_token_selection`), and its picks
become pages through its slot's page table. `lora_add_reference`: the LoRA delta over pages,
`out[t] += sum_q coef[t, q] * (x[t] A[p]^T) B[p]` with `p = pages[t, q]`, for one projection of one layer and every
token of a mixed batch at once. Each token brings its own pages (its checkpoint's top-k LoRAs, `ceil(r / r_page)`
rank-chunk pages each) and a coefficient per page (1 for ReMix, whose omega is folded into B; the renormalised
softmax weight for softmax checkpoints); page -1 is skipped, so base-model tokens and unused picks cost nothing.
In a bf16 call `coef * (A x)` is rounded to bf16 before the expand; the sums are float32 and out is rounded once
per token.
Work per token is `K * r_page * (in + out)` whatever the checkpoints' n.

Store layout (`AdapterPool` in `pool/model.py` allocates it once): `A [P, r_page, in]` holds rank rows of A, and
`B [P, r_page, out]` the matching columns of omega * B, transposed so that the expand reads contiguous rows.

The CPU kernels (csrc/remix_cpu.cpp) meet these contracts: `cpu_kernels.pool_route` and `cpu_kernels.pool_lora_add`;
on CUDA, `triton_kernels.pool_lora_add_triton` meets `lora_add_reference`'s (routing stays `route_reference`, plain
PyTorch on the GPU). `lora_add` picks the kernel for the tensors' device, else the reference; `route` and `add` are
what the models call (the pool's `AdapterPool` and the one-checkpoint gather path, model.py): the same choice, and
under torch.compile the kernels' custom-op forms.
"""

from __future__ import annotations

import torch

from remix_serve import routing

PROJECTIONS = 3  # gate, up, down: the page table's second axis
REFERENCE_CHUNK = 256  # tokens per gather in the reference: bounds its [chunk, r_page, in] copies


def lora_add_reference(
    out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, pages: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """Add the pool delta into `out` in place (PyTorch ops; float32 accumulation, one rounding to out's dtype).

    In a bf16 call `h = coef * (A x)` is rounded to bf16 before the expand, as PEFT's LoRA layers and vLLM's LoRA
    kernels round theirs: the CPU kernel's expand then multiplies bf16 pairs, half the instructions of float32 h
    (`csrc/remix_cpu.cpp`). float32 and float16 calls keep float32 h.

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
    compiling = torch.compiler.is_compiling()  # one graph serves every batch size: one chunk, whatever T
    for start in [0] if compiling else range(0, T, REFERENCE_CHUNK):
        stop = T if compiling else min(start + REFERENCE_CHUNK, T)
        p, c = pages[start:stop], coef[start:stop].float()
        c = torch.where(p >= 0, c, torch.zeros_like(c))
        p = p.clamp(min=0)
        xs = x[start:stop].float()
        delta = torch.zeros(stop - start, out.shape[1], dtype=torch.float32, device=out.device)
        for q in range(K):
            h = torch.bmm(A[p[:, q]].float(), xs[:, :, None])[:, :, 0] * c[:, q : q + 1]  # [t, r_page]
            if x.dtype == torch.bfloat16:  # rounded, as a LoRA GEMM's output is
                h = h.bfloat16().float()
            delta += torch.bmm(h[:, None, :], B[p[:, q]].float())[:, 0]  # [t, out]
        out[start:stop] = (out[start:stop].float() + delta).to(out.dtype)
    return out


def lora_add(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    pages: torch.Tensor,
    coef: torch.Tensor,
    pages_per_pick: int = 1,
) -> torch.Tensor:
    """`lora_add_reference`'s result, by the fastest implementation available for these tensors: the C++ kernel on
    the CPU, the Triton custom op `remix::pool_lora_add_triton` on CUDA (`pool/triton_kernels.py`; also on CPU
    tensors in a test process that runs Triton's interpreter without the C++ kernel), else the reference.
    `pages_per_pick`: pages of one pick's LoRA in each token's list (a grouping hint for the CPU kernel)."""
    from remix_serve.vllm_plugin import cpu_kernels

    if out.device.type == "cpu" and cpu_kernels.available():
        cpu_kernels.pool_lora_add(out, x, A, B, pages, coef, pages_per_pick)
        return out
    from remix_serve.vllm_plugin.pool import triton_kernels

    if triton_kernels.usable(out.device):
        torch.ops.remix.pool_lora_add_triton(out, 0, x, A, B, pages, coef)
        return out
    return lora_add_reference(out, x, A, B, pages, coef)


def route_reference(
    x: torch.Tensor,
    routers: torch.Tensor,
    bias: torch.Tensor,
    k: torch.Tensor,
    softmax: torch.Tensor,
    slots: torch.Tensor,
    tables: torch.Tensor,
    k_max: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's routing for a mixed batch: `(pages [T, 3, k_max*ppl], coef [T, k_max*ppl], ids [T, k_max])`.

    Args:
        x: `[T, D]` the layer's MLP input.
        routers: `[S, n_max, D]` float32, each slot's router (zero rows past its n).
        bias: `[S, n_max]` float32, 0 on a slot's LoRAs and -inf past its n.
        k: `[S]` int64, each slot's k in this layer (0: no LoRA, e.g. the base row or a layer it does not adapt).
        softmax: `[S]` bool, the slot's weighting is `softmax`.
        slots: `[T]` int64 each token's slot.
        tables: `[S, 3, n_max, ppl]` int64 page ids per (slot, projection, LoRA, rank chunk), -1 = none.
        k_max: picks per token.

    Returns:
        pages (-1 = none), each page's coefficient (its pick's weight), and the picks (-1 past the token's k).
    """
    T, S, n_max = x.shape[0], routers.shape[0], routers.shape[1]
    ppl = tables.shape[-1]
    if T <= S and not torch.compiler.is_compiling():  # each token against its own router only: T n_max D MACs
        logits = torch.bmm(routers[slots], x.float()[:, :, None])[:, :, 0]
    else:  # one GEMM over every slot's router, then each token's block: fewer, larger reads
        logits_all = routing.router_logits(x, routers.view(-1, routers.shape[-1])).view(T, S, n_max)
        logits = logits_all.gather(1, slots.view(T, 1, 1).expand(T, 1, n_max))[:, 0]
    k_tok = k[slots]
    ids, weights = routing.per_token_selection(logits + bias[slots], k_tok, softmax[slots], k_max)
    used = torch.arange(k_max, device=x.device)[None, :] < k_tok[:, None]  # [T, k_max]
    rows = tables[slots]  # [T, 3, n_max, ppl]
    pages = rows.gather(2, ids.view(T, 1, k_max, 1).expand(T, PROJECTIONS, k_max, ppl))
    pages = torch.where(used.view(T, 1, k_max, 1), pages, -1).view(T, PROJECTIONS, k_max * ppl)
    return pages, weights.repeat_interleave(ppl, dim=1), torch.where(used, ids, -1)


def route(
    x: torch.Tensor,
    routers: torch.Tensor,
    bias: torch.Tensor,
    k: torch.Tensor,
    softmax: torch.Tensor,
    slots: torch.Tensor,
    tables: torch.Tensor,
    k_max: int,
    cpu_kernels_on: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`route_reference`'s result: by `cpu_kernels.pool_route` where `cpu_kernels_on` (its custom op when compiling:
    one opaque node), else by the reference."""
    args = (x, routers, bias, k, softmax, slots, tables, k_max)
    if not cpu_kernels_on:
        return route_reference(*args)
    from remix_serve.vllm_plugin import cpu_kernels

    return (cpu_kernels.pool_route_op if torch.compiler.is_compiling() else cpu_kernels.pool_route)(*args)


def add(
    out: torch.Tensor,
    offset: int,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    pages: torch.Tensor,
    coef: torch.Tensor,
    pages_per_pick: int,
    cpu_kernels_on: bool,
) -> None:
    """Add the delta of (A, B)'s pages into columns `[offset, offset + N)` of `out` in place (N = B's width).

    Eager: `lora_add` on a column view. Compiled: ops that take the whole output and the offset, never a view (a
    compiled graph in vLLM's backend got wrong results from an op mutating a view of an intermediate)."""
    if not torch.compiler.is_compiling():
        lora_add(out.narrow(1, offset, B.shape[2]), x, A, B, pages, coef, pages_per_pick)
        return
    from remix_serve.vllm_plugin.pool import triton_kernels

    if cpu_kernels_on:
        from remix_serve.vllm_plugin import cpu_kernels

        cpu_kernels.pool_lora_add_op(out, offset, x, A, B, pages, coef, pages_per_pick)
    elif triton_kernels.usable(out.device):
        torch.ops.remix.pool_lora_add_triton(out, offset, x, A, B, pages, coef)
    else:
        lora_add_reference(out.narrow(1, offset, B.shape[2]), x, A, B, pages, coef)
