"""The batched LoRA bank: stacking at load time and the per-token selection mask between the two GEMMs.

Per adapted projection, `h = x A_all^T` ([T, n*r]), zero (or weight) the r-blocks of each token's LoRAs,
`y = x W^T + h B_all^T`. The plugin (model.py) runs the expand GEMM fused with the base projection:
`[x | masked h] @ [W | B_all]^T`. This module holds the math around the GEMMs. Dense on purpose: static shapes,
no gather, no host sync, so it is safe under CUDA graphs and torch.compile. It wastes n/k of a small product;
on CPU, decode-sized batches skip that waste with a gather kernel (`cpu_kernels.shrink_concat`, tested against
this module), since there the shrink GEMM's call costs more than its arithmetic.
"""

from __future__ import annotations

from typing import Any

import torch

# The fused path's dense bank may add at most this share of the base's projection multiply-adds per token before
# `auto` gathers instead (bench/serve_multi.py (c), SmolLM2-135M bf16 on the 2-core CPU, 2026-12-07: n=8 r=8 on
# gate/up/down of all 30 layers adds 11.5% and prefills fused at 0.89x the base, decoding about 5% faster than the
# gather path; n=8 r=16 adds 23% and prefills fused at 0.79x, under the 0.85x the gather path keeps).
FUSED_MAX_SHARE = 0.12


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


def dense_share(config: Any, hf_config: Any) -> float:
    """Multiply-adds per token of a fused bank (`n*r*(in + out)` per adapted projection: the shrink and the expand
    over all n LoRAs) over those of the base's projections (attention and MLP weights of every layer).

    Args:
        config: the checkpoint's `RemixConfig`.
        hf_config: the base's text config (hidden_size, intermediate_size, heads, layers).
    """
    D, inter = hf_config.hidden_size, hf_config.intermediate_size
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or D // heads
    base = hf_config.num_hidden_layers * (D * head_dim * 2 * (heads + kv_heads) + 3 * D * inter)
    fans = sum(D + inter for _ in config.target_modules)  # gate, up: D -> I; down: I -> D
    return len(config.adapted_layers) * config.num_loras * config.rank * fans / base


def auto_bank_path(config: Any, hf_config: Any, gather_kernels: bool) -> str:
    """What `bank_path="auto"` serves: `gather` where its kernels run (`gather_kernels`) and the fused bank would
    add more than FUSED_MAX_SHARE of the base's work per token (prefill slows with it, n*r per token, where the
    gather path costs k*r), else `fused` (the faster decode for a small bank, and the path with no gather kernel)."""
    if gather_kernels and dense_share(config, hf_config) > FUSED_MAX_SHARE:
        return "gather"
    return "fused"
