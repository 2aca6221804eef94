"""Per-LoRA activation counters kept in the worker: which tokens count, and how they are added up."""

from __future__ import annotations

import torch
from vllm.forward_context import get_forward_context, is_forward_context_available


def real_token_mask(num_tokens: int) -> torch.Tensor | None:
    """`[T]` bool mask of the real scheduled tokens of this forward, or None when nothing should count.

    vLLM runs dummy forwards before the first request (memory profiling, compile warm-up, CUDA-graph capture)
    and pads batches up to captured sizes. Dummy runs carry no attention metadata, except graph captures,
    which mark every row as padding; real steps mark padding rows in `is_padding`. Counting only non-padding
    rows of forwards that have attention metadata therefore counts exactly the scheduled tokens.
    """
    if not is_forward_context_available():
        return None
    ctx = get_forward_context()
    if not ctx.attn_metadata:
        return None
    if ctx.is_padding is None:
        return None if num_tokens == 0 else torch.ones(num_tokens, dtype=torch.bool)
    return ~ctx.is_padding[:num_tokens]


def add_counts(activations: torch.Tensor, routed: torch.Tensor, mask: torch.Tensor, real: torch.Tensor | None) -> None:
    """Add one forward's selections to a layer's counters, in place, without a host sync.

    Args:
        activations: `[n]` int64 running count of tokens routed to each LoRA.
        routed: `[1]` int64 running count of tokens that passed the router.
        mask: `[T, n]` selection mask (1 on the k selected LoRAs).
        real: `[T]` bool mask of real tokens (see `real_token_mask`), None to count nothing.
    """
    if real is None:
        return
    real = real.to(device=mask.device, dtype=mask.dtype)  # [T]
    activations.add_((real @ mask).round().to(activations.dtype))  # [n]
    routed.add_(real.sum().round().to(routed.dtype))
