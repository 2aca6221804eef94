"""The batched LoRA bank: stacking at load time and the per-token selection mask between the two GEMMs.

Per adapted projection, `h = x A_all^T` ([T, n*r]), zero (or weight) the r-blocks of each token's LoRAs,
`y = x W^T + h B_all^T`. The plugin (model.py) runs the expand GEMM fused with the base projection:
`[x | masked h] @ [W | B_all]^T`. This module holds the math around the GEMMs. Dense on purpose: static shapes,
no gather, no host sync, so it is safe under CUDA graphs and torch.compile. It wastes n/k of a small product;
on CPU, decode-sized batches skip that waste with a gather kernel (`cpu_kernels.shrink_concat`, tested against
this module), since there the shrink GEMM's call costs more than its arithmetic.
"""

from __future__ import annotations

import torch


def stack_bank(lora_A: torch.Tensor, lora_B: torch.Tensor, omega: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a bank of n rank-r LoRAs into one rank-(n r) pair, omega folded into B.

    Folding omega into B once at load time (as vLLM's `LoRALayerWeights.optimize` folds its scaling) keeps the
    forward free of a scale multiply.

    Args:
        lora_A: `[n, r, in]`.
        lora_B: `[n, out, r]`.
        omega: constant weight of a selected LoRA.

    Returns:
        `A_all [n*r, in]` (LoRA i in rows i*r .. i*r+r-1) and `B_all [out, n*r]` (the same column blocks).
    """
    n, r, in_features = lora_A.shape
    a_all = lora_A.reshape(n * r, in_features)
    b_all = (lora_B * omega).permute(1, 0, 2).reshape(lora_B.shape[1], n * r)
    return a_all, b_all


def mask_blocks(h: torch.Tensor, weights: torch.Tensor, rank: int) -> torch.Tensor:
    """Scale each token's r-blocks of `h` by its LoRA's selection weight (0 for unselected LoRAs).

    Args:
        h: `[T, m*n*r]`, the shrink output of m stacked banks that share one selection.
        weights: `[T, n]` selection weights (1/0 for ReMix), in `h`'s dtype.
        rank: r.

    Returns:
        `[T, m*n*r]`.
    """
    T, n = weights.shape
    return (h.view(T, -1, n, rank) * weights.view(T, 1, n, 1)).view(T, -1)


def masked_concat(x: torch.Tensor, h: torch.Tensor, weights: torch.Tensor, rank: int) -> torch.Tensor:
    """`[x | mask_blocks(h, weights, rank)]`: the input of a base projection fused with its expand bank.

    Args:
        x: `[T, D]` the base projection's input.
        h: `[T, n*r]` one bank's shrink output.
        weights: `[T, n]` selection weights, in `h`'s dtype.
        rank: r.

    Returns:
        `[T, D + n*r]`.
    """
    return torch.cat([x, mask_blocks(h, weights, rank)], dim=1)
