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
        return torch.ones(num_tokens, dtype=torch.bool)
    return ~ctx.is_padding[:num_tokens]


class RoutingCounters:
    """Cumulative routing counts of one model: `[L, n]` tokens per LoRA and the tokens that were routed.

    Each adapted layer hands over its selected ids (no op, no host sync); `end()` counts every layer's real
    tokens at once into this forward's float32 `step` with one scatter-add and folds it into the int64 totals.
    Float32 is exact for the per-forward counts (far below 2^24 tokens), int64 for the totals.
    """

    def __init__(self, layers: list[int], num_loras: int, device: torch.device):
        self.layers = layers
        self.step = torch.zeros(len(layers), num_loras, dtype=torch.float32, device=device)
        self.activations = torch.zeros(len(layers), num_loras, dtype=torch.int64, device=device)
        self.routed = torch.zeros((), dtype=torch.int64, device=device)
        self.real: torch.Tensor | None = None  # [T] float32 for the forward in progress
        self.pending: list[torch.Tensor | None] = []  # ids [T, k] per layer slot, this forward
        self.recorded: dict[int, list[torch.Tensor]] | None = None  # layer -> ids [T_real, k] per forward

    def begin(self, num_tokens: int) -> None:
        real = real_token_mask(num_tokens)
        self.real = None if real is None else real.to(device=self.step.device, dtype=torch.float32)
        self.pending = [None] * len(self.layers)

    def add(self, slot: int, ids: torch.Tensor) -> None:
        """Note one layer's selection, `ids [T, k]`; `end()` counts it."""
        if self.real is None:
            return
        self.pending[slot] = ids
        if self.recorded is not None:  # debugging aid: a host sync per layer, off by default
            self.recorded[self.layers[slot]].append(ids[self.real.bool()].cpu())

    def end(self) -> None:
        if self.real is None:
            return
        if self.pending:  # a pipeline-parallel rank may hold no adapted layer
            ids = torch.stack(self.pending)  # [L, T, k]
            L, T, k = ids.shape
            real = self.real.repeat_interleave(k).expand(L, T * k)  # each pick of a real token counts 1
            self.step.zero_().scatter_add_(1, ids.view(L, T * k), real)
            self.activations.add_(self.step.round().to(torch.int64))
        self.routed.add_(self.real.sum().round().to(torch.int64))
        self.real, self.pending = None, []

    def snapshot(self) -> dict[str, list]:
        """{"layers": [...], "activations": [[n] per layer], "routed": [tokens per layer]} as plain lists."""
        routed = int(self.routed.item())
        return {
            "layers": list(self.layers),
            "activations": self.activations.tolist(),
            "routed": [routed] * len(self.layers),
        }

    def reset(self) -> None:
        self.activations.zero_()
        self.routed.zero_()

    def record(self, on: bool) -> dict[int, list[list[int]]] | None:
        """Start (on=True) or stop recording the selected ids; stopping returns {layer: [[ids of a token], ...]}."""
        if on:
            self.recorded = {layer: [] for layer in self.layers}
            return None
        out = {layer: torch.cat(ids).tolist() if ids else [] for layer, ids in (self.recorded or {}).items()}
        self.recorded = None
        return out
