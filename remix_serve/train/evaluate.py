"""Evaluation under deterministic top-k routing (what the served model computes): loss, LoRA usage, ESS.

Three ESS figures: of the applied weights (k for ReMix by construction), of each layer's usage counts (how evenly
traffic spreads over the bank), and of the router distribution q over all n LoRAs (what Figure 3 of the paper plots).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from remix_serve import routing
from remix_serve.reference import remix_mlps
from remix_serve.train.data import IGNORE, Example, collate
from remix_serve.train.loss import model_nll
from remix_serve.train.trace import RoutingTrace


@dataclass
class EvalResult:
    loss: float  # token-weighted mean NLL of the supervised tokens, deterministic top-k routing
    tokens: int  # supervised tokens
    usage: dict[int, list[int]]  # layer -> tokens routed to each LoRA (non-padding tokens)
    weight_ess: float  # mean over tokens and layers of ESS of the k routing weights (k for constant weighting)
    router_ess: dict[int, float] = field(default_factory=dict)  # layer -> mean over tokens of ESS(q), q over n

    @property
    def usage_ess(self) -> dict[int, float]:
        return {layer: float(routing.ess(torch.tensor(c, dtype=torch.float64))) for layer, c in self.usage.items()}


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 8) -> EvalResult:
    """Eval loss and per-layer LoRA usage under deterministic top-k routing (what the served model computes)."""
    was_training = model.training
    model.eval()
    mlps = remix_mlps(model)
    usage = {layer: torch.zeros(m.num_loras, dtype=torch.long) for layer, m in mlps.items()}
    nll_sum, n_tok, ess_sum, n_routed = 0.0, 0, 0.0, 0
    trace = RoutingTrace(model)
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id)
        with trace.batch(batch["attention_mask"]):
            per_seq = model_nll(model, batch)  # [B], mean over each sequence's tokens
        counts = (batch["labels"][:, 1:] != IGNORE).sum(-1)
        nll_sum += float((per_seq.double() * counts).sum())  # .item()-style sync, once per eval batch
        n_tok += int(counts.sum())
        real = batch["attention_mask"].bool()  # [B, T]; padding tokens are routed but not counted
        for layer, m in mlps.items():
            w = m.last_weights[real]  # [tokens, n]
            usage[layer] += (w > 0).sum(0)
            ess_sum += float(routing.ess(w).sum())
            n_routed += w.shape[0]
    model.train(was_training)
    trace.close()
    return EvalResult(
        loss=nll_sum / max(n_tok, 1),
        tokens=n_tok,
        usage={layer: c.tolist() for layer, c in usage.items()},
        weight_ess=ess_sum / max(n_routed, 1),
        router_ess={int(layer): v for layer, v in trace.pop()["router_ess"].items()},
    )


def usage_stats(final: EvalResult, initial: EvalResult | None) -> dict:
    """Per-layer usage counts and ESS, and the mean routing-weight ESS (now and before this run), for provenance."""
    return {
        "usage_data": "eval" if initial is not None else "train (first 64 examples; no --eval-data)",
        "usage": {str(k): v for k, v in final.usage.items()},
        "usage_ess": {str(k): round(v, 4) for k, v in final.usage_ess.items()},
        "routing_weight_ess": round(final.weight_ess, 4),
        "routing_weight_ess_initial": round(initial.weight_ess, 4) if initial else None,
        "router_ess": {str(k): round(v, 4) for k, v in final.router_ess.items()},
    }
