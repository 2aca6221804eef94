"""The batched LoRA bank: stacking at load time, tensor-parallel sharding, and the masked two-GEMM delta."""

from __future__ import annotations

from typing import Literal

import torch


def stack_bank(lora_A: torch.Tensor, lora_B: torch.Tensor, omega: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a bank of n rank-r LoRAs into one rank-(n r) pair, omega folded into B.

    Folding omega into B once at load time (as vLLM's `LoRALayerWeights.optimize` folds its scaling) keeps
    the forward free of a scale multiply.

    Args:
        lora_A: `[n, r, in]`.
        lora_B: `[n, out, r]`.
        omega: constant weight of a selected LoRA.

    Returns:
        `A_all [n*r, in]` (LoRA i in rows i*r .. i*r+r-1) and `B_all [out, n*r]` (same column blocks).
    """
    n, r, in_features = lora_A.shape
    a_all = lora_A.reshape(n * r, in_features)
    b_all = (lora_B * omega).permute(1, 0, 2).reshape(lora_B.shape[1], n * r)
    return a_all, b_all


def shard_bank(
    a_all: torch.Tensor, b_all: torch.Tensor, parallel: Literal["column", "row"], rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of a stacked bank that tensor-parallel rank `rank` of `world` holds.

    `column` (gate_proj / up_proj, vLLM's ColumnParallelLinear): the output is split, so B_all's rows are
    split and A_all is replicated. `row` (down_proj, RowParallelLinear): the input is split, so A_all's columns
    are split and B_all is replicated; each rank's delta is then a partial sum that adds into the layer's
    partial output before vLLM's all-reduce (the masked product is linear in the input).
    """
    if parallel == "column":
        rows = b_all.shape[0] // world
        return a_all, b_all[rank * rows : (rank + 1) * rows]
    cols = a_all.shape[1] // world
    return a_all[:, rank * cols : (rank + 1) * cols], b_all


def bank_shrink(x: torch.Tensor, a_all: torch.Tensor, weights: torch.Tensor, rank: int) -> torch.Tensor:
    """`h = x A_all^T` with each token's r-blocks scaled by its selection weight (0 for unselected LoRAs).

    Dense on purpose: static shapes, no gather, no host sync, so it is safe under CUDA graphs and
    torch.compile. It wastes n/k of a small product; when n*r grows past a few hundred a grouped (gather)
    kernel may win: measure before adding one.

    Args:
        x: `[T, in]`.
        a_all: `[m*n*r, in]`: the A banks of m projections that share the input `x`, stacked.
        weights: `[T, n]` selection weights (1/0 for ReMix), in `x`'s dtype.
        rank: r.

    Returns:
        `[T, m*n*r]`, in `x`'s dtype.
    """
    T, n = weights.shape
    h = x @ a_all.t()  # [T, m*n*r]
    return (h.view(T, -1, n, rank) * weights.view(T, 1, n, 1)).view(T, -1)


def bank_delta(
    x: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor, weights: torch.Tensor, rank: int
) -> torch.Tensor:
    """The routed LoRA delta of one projection: `[T, in] -> [T, out]`, two dense GEMMs and a mask."""
    return bank_shrink(x, a_all, weights, rank) @ b_all.t()  # [T, out]
