"""Routing statistics of every training step (TrainArgs.trace_routing): ESS of the router distribution and weights.

The collapse the paper describes (Theorem 1, Figure 3) is a trajectory, so it is read from the training forwards
themselves, at no extra forward cost: a forward hook on each RemixMLP takes the MLP input x, recomputes the router
distribution q = softmax(P x) (one [tokens, D] x [D, n] product) and reads the selection weights the layer applied.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from remix_serve import routing
from remix_serve.reference import remix_mlps


class RoutingTrace:
    """Per-step, per-layer means over non-padding tokens of ESS(q) (over the n LoRAs) and ESS of the weights, and the
    ESS of the step's selection counts (usage).

    ESS(q) ranges 1 (the router puts all mass on one LoRA) to n; the weight ESS is k for constant weighting by
    construction and falls toward 1 when softmax weights collapse. For ReMix the training forwards are the M
    sampled passes, so the weights are those of the sampled selections.
    """

    def __init__(self, model: nn.Module) -> None:
        self.mlps = remix_mlps(model)
        self.mask: torch.Tensor | None = None  # [B, T] attention mask of the forward under way
        self._sums: dict[int, list[float]] = {}  # layer -> [sum ESS(q), sum weight ESS, tokens]
        self._usage: dict[int, torch.Tensor] = {}  # layer -> tokens routed to each LoRA [n]
        self._handles = [m.register_forward_hook(self._hook) for m in self.mlps.values()]

    @torch.no_grad()
    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0]  # [S, T, D]; S = B or B*M (the routed passes repeat each example M times)
        real = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        if self.mask is not None and self.mask.dim() == 2 and x.dim() == 3 and x.shape[0] % self.mask.shape[0] == 0:
            real = self.mask.bool().repeat_interleave(x.shape[0] // self.mask.shape[0], 0)  # [S, T]
        q = torch.softmax(routing.router_logits(x[real], module.router), dim=-1)  # [N, n]
        w = module.last_weights[real]  # [N, n]
        s = self._sums.setdefault(module.layer, [0.0, 0.0, 0])
        s[0] += float(routing.ess(q).sum())
        s[1] += float(routing.ess(w).sum())
        s[2] += int(q.shape[0])
        counts = (w > 0).sum(0)  # [n]
        self._usage[module.layer] = self._usage.get(module.layer, torch.zeros_like(counts)) + counts

    @contextmanager
    def batch(self, attention_mask: torch.Tensor) -> Iterator[None]:
        """Count only the real tokens of the forwards run inside (attention_mask `[B, T]`)."""
        self.mask = attention_mask
        try:
            yield
        finally:
            self.mask = None

    def pop(self) -> dict:
        """Since the last pop: {"router_ess", "weight_ess" (token means), "usage_ess" (of the selection counts)},
        each {layer: value}; resets the sums."""
        out: dict = {"router_ess": {}, "weight_ess": {}, "usage_ess": {}}
        for layer, (q_sum, w_sum, n) in sorted(self._sums.items()):
            out["router_ess"][str(layer)] = round(q_sum / max(n, 1), 4)
            out["weight_ess"][str(layer)] = round(w_sum / max(n, 1), 4)
            out["usage_ess"][str(layer)] = round(float(routing.ess(self._usage[layer])), 4)
        self._sums, self._usage = {}, {}
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
