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
# The multi-checkpoint pool's metrics (pool mode only), from `collective_rpc("remix_pool_stats")`.
POOL_METRICS: dict[str, tuple[str, list[str], str]] = {
    "remix_pool_pages": (
        "gauge",
        ["store", "state"],
        "Adapter pool pages of store `store` by state (used, free, total).",
    ),
    "remix_pool_resident_checkpoints": ("gauge", [], "Checkpoints whose LoRA banks are in the pool's device pages."),
    "remix_pool_pinned_checkpoints": ("gauge", [], "Resident checkpoints in a vLLM LoRA slot (never evicted)."),
    "remix_pool_loads": ("counter", [], "Checkpoints copied into the pool (first loads and reloads)."),
    "remix_pool_reloads": ("counter", [], "Checkpoints copied into the pool again after an eviction."),
    "remix_pool_evictions": ("counter", [], "Checkpoints evicted from the pool to host memory (LRU)."),
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


def _family(name: str, table: dict):
    kind, labels, doc = table[name]
    return (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc, labels=labels)


class RemixCollector(Collector):
    """Exposes the latest UsageSnapshot as the remix_* metrics (one checkpoint: single-checkpoint mode)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.snapshot = UsageSnapshot()

    def collect(self) -> Iterator:
        return iter(usage_families({self.model_name: self.snapshot}))


class PoolCollector(Collector):
    """Pool mode: the remix_* metrics of every checkpoint (`model_name` = its LoRA name) and the pool's."""

    def __init__(self):
        self.snapshots: dict[str, UsageSnapshot] = {}
        self.stats: dict | None = None

    def collect(self) -> Iterator:
        yield from usage_families(self.snapshots)
        stats = self.stats
        if stats is None:
            return
        pages = _family("remix_pool_pages", POOL_METRICS)
        for state in ("used", "free", "total"):
            for store, n in stats[f"pages_{state}"].items():
                pages.add_metric([store, state], n)
        yield pages
        for name, value in (
            ("remix_pool_resident_checkpoints", len(stats["resident"])),
            ("remix_pool_pinned_checkpoints", len(stats["pinned"])),
            ("remix_pool_loads", stats["loads"]),
            ("remix_pool_reloads", stats["reloads"]),
            ("remix_pool_evictions", stats["evictions"]),
        ):
            family = _family(name, POOL_METRICS)
            family.add_metric([], value)
            yield family


def usage_families(snapshots: dict[str, UsageSnapshot]) -> list:
    """The remix_* usage metric families of the checkpoints in `snapshots`, by served name."""
    acts = CounterMetricFamily(
        "remix_lora_activations", METRICS["remix_lora_activations"][2], labels=METRICS["remix_lora_activations"][1]
    )
    routed = CounterMetricFamily(
        "remix_routed_tokens", METRICS["remix_routed_tokens"][2], labels=METRICS["remix_routed_tokens"][1]
    )
    ess = GaugeMetricFamily(
        "remix_layer_usage_ess", METRICS["remix_layer_usage_ess"][2], labels=METRICS["remix_layer_usage_ess"][1]
    )
    for name, snap in snapshots.items():
        for layer, layer_acts, layer_routed, layer_ess in zip(
            snap.layers, snap.activations, snap.routed, snap.ess(), strict=True
        ):
            for lora, count in enumerate(layer_acts):
                acts.add_metric([name, str(layer), str(lora)], count)
            routed.add_metric([name, str(layer)], layer_routed)
            ess.add_metric([name, str(layer)], layer_ess)
    return [acts, routed, ess]


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


class PoolPoller(UsagePoller):
    """Pool mode: every checkpoint's counters (`remix_counts` -> {"checkpoints": {name: ...}}) and the pool's
    stats (`remix_pool_stats`), in one refresh."""

    collector: PoolCollector

    async def refresh(self) -> dict[str, UsageSnapshot]:
        counts = (await self.engine_client.collective_rpc("remix_counts"))[0]["checkpoints"]
        stats = (await self.engine_client.collective_rpc("remix_pool_stats"))[0]
        self.collector.snapshots = {name: UsageSnapshot.from_rpc([c]) for name, c in counts.items()}
        self.collector.stats = stats
        return self.collector.snapshots


def register_collector(collector: Collector) -> None:
    """Register on the registry that vLLM's /metrics serves (the global one; remix_ names survive vLLM's
    clean-up of collectors named like 'vllm')."""
    with contextlib.suppress(ValueError):  # already registered in this process
        REGISTRY.register(collector)
