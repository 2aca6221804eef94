"""The remix_* Prometheus metrics, and the one path by which the worker's counters reach the API process.

A background task polls the worker (`collective_rpc("remix_counts")`, answered between engine steps) and keeps
the latest snapshot; the Prometheus collector only reads that snapshot, so a scrape never waits on the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from remix_serve import routing

logger = logging.getLogger(__name__)

# Metric name -> (type, labels, documentation). Counters are exposed with prometheus_client's `_total` suffix.
METRICS: dict[str, tuple[str, list[str], str]] = {
    "remix_lora_activations": (
        "counter",
        ["model_name", "layer", "lora"],
        "Tokens routed to LoRA `lora` of adapted layer `layer`.",
    ),
    "remix_routed_tokens": ("counter", ["model_name", "layer"], "Tokens that passed the router of layer `layer`."),
    "remix_layer_usage_ess": (
        "gauge",
        ["model_name", "layer"],
        "Effective support size of the layer's cumulative LoRA usage (1 = collapsed onto one LoRA, n = even).",
    ),
}


@dataclass
class UsageSnapshot:
    """Cumulative routing counts of every adapted layer, as last read from the worker."""

    layers: list[int] = field(default_factory=list)
    activations: list[list[int]] = field(default_factory=list)  # [layers][n]
    routed: list[int] = field(default_factory=list)

    @classmethod
    def from_rpc(cls, results: list[dict]) -> UsageSnapshot:
        """Sum the answers of every worker (tensor-parallel ranks all count the same tokens: take rank 0)."""
        first = results[0]
        return cls(layers=first["layers"], activations=first["activations"], routed=first["routed"])

    def ess(self) -> list[float]:
        if not self.activations:
            return []
        return routing.ess(torch.tensor(self.activations, dtype=torch.float64)).tolist()

    def as_json(self) -> list[dict]:
        return [
            {"layer": layer, "activations": acts, "routed_tokens": routed, "usage_ess": ess}
            for layer, acts, routed, ess in zip(self.layers, self.activations, self.routed, self.ess(), strict=True)
        ]


class RemixCollector(Collector):
    """Exposes the latest UsageSnapshot as the remix_* metrics."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.snapshot = UsageSnapshot()

    def collect(self) -> Iterator:
        snap, name = self.snapshot, self.model_name
        acts = CounterMetricFamily(
            "remix_lora_activations", METRICS["remix_lora_activations"][2], labels=METRICS["remix_lora_activations"][1]
        )
        routed = CounterMetricFamily(
            "remix_routed_tokens", METRICS["remix_routed_tokens"][2], labels=METRICS["remix_routed_tokens"][1]
        )
        ess = GaugeMetricFamily(
            "remix_layer_usage_ess", METRICS["remix_layer_usage_ess"][2], labels=METRICS["remix_layer_usage_ess"][1]
        )
        for layer, layer_acts, layer_routed, layer_ess in zip(
            snap.layers, snap.activations, snap.routed, snap.ess(), strict=True
        ):
            for lora, count in enumerate(layer_acts):
                acts.add_metric([name, str(layer), str(lora)], count)
            routed.add_metric([name, str(layer)], layer_routed)
            ess.add_metric([name, str(layer)], layer_ess)
        yield from (acts, routed, ess)


async def read_usage(engine_client) -> UsageSnapshot:
    """Ask the workers for their counters now (one RPC, answered between engine steps)."""
    return UsageSnapshot.from_rpc(await engine_client.collective_rpc("remix_counts"))


class UsagePoller:
    """Keeps a RemixCollector's snapshot fresh by polling the engine every `interval` seconds."""

    def __init__(self, engine_client, collector: RemixCollector, interval: float = 1.0):
        self.engine_client, self.collector, self.interval = engine_client, collector, interval
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def refresh(self) -> UsageSnapshot:
        self.collector.snapshot = await read_usage(self.engine_client)
        return self.collector.snapshot

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # the engine may be starting or shutting down: keep the last snapshot
                logger.debug("remix usage poll failed", exc_info=True)
            await asyncio.sleep(self.interval)


def register_collector(collector: RemixCollector) -> None:
    """Register on the registry that vLLM's /metrics serves (the global one; remix_ names survive vLLM's
    clean-up of collectors named like 'vllm')."""
    with contextlib.suppress(ValueError):  # already registered in this process
        REGISTRY.register(collector)
