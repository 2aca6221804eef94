"""Page bookkeeping of the adapter pool: which pages of a fixed-size store hold which LoRA's rank chunks.

Pure Python (no torch, no vLLM), so every rule here is tested without an engine; the device tensors that the page
ids index are the integration step's (see the package docstring). Vocabulary:

- A *page* holds `r_page` rank rows of one LoRA of one projection: rows `[j*r_page, (j+1)*r_page)` of its A
  (`[r_page, in]`) and the matching columns of its B (`[out, r_page]`). A LoRA of rank r takes
  `ceil(r / r_page)` pages; when r is not a multiple of r_page only the last page's tail is unused (its A rows and
  B columns must be zero there), and nothing is padded to the largest n or r in the pool.
- A *store* is the set of pages of one projection shape: `gate_up` (gate_proj and up_proj: in D, out I) and `down`
  (in I, out D). A page of either store holds `r_page * (D + I)` values, so both cost the same bytes.
- A checkpoint is *resident* when its pages are allocated, *on host* when it is known but was evicted (its
  tensors stay in host memory, its pages are free), *pinned* while a running request uses it (never evicted).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PROJECTIONS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")  # the same order as checkpoint.PROJECTIONS
STORES: tuple[str, ...] = ("gate_up", "down")
STORE_OF: dict[str, str] = {"gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down"}

PageKey = tuple[int, str, int]  # (layer, projection, lora)


class PoolError(ValueError):
    """A pool operation that cannot be done. `problems` holds one line per defect, as CheckpointError does."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else problems
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class LoraLayout:
    """What of a checkpoint takes pages: n LoRAs of rank r on `target_modules` of each layer in `layers`."""

    num_loras: int
    rank: int
    layers: tuple[int, ...]
    target_modules: tuple[str, ...]

    def __post_init__(self) -> None:
        problems = []
        if self.num_loras < 1 or self.rank < 1:
            problems.append(f"num_loras={self.num_loras} and rank={self.rank} must both be at least 1")
        if not self.layers or any(layer < 0 for layer in self.layers) or len(set(self.layers)) != len(self.layers):
            problems.append(f"layers {list(self.layers)} must be distinct non-negative indices, at least one")
        unknown = [p for p in self.target_modules if p not in PROJECTIONS]
        if not self.target_modules or unknown or len(set(self.target_modules)) != len(self.target_modules):
            problems.append(f"target_modules {list(self.target_modules)} must be distinct names from {PROJECTIONS}")
        if problems:
            raise PoolError(problems)

    @classmethod
    def of(cls, config: Any) -> LoraLayout:
        """The layout of a `RemixConfig` (or anything with num_loras, rank, adapted_layers, target_modules)."""
        return cls(config.num_loras, config.rank, tuple(config.adapted_layers), tuple(config.target_modules))

    def pages_per_lora(self, r_page: int) -> int:
        return math.ceil(self.rank / r_page)

    def page_keys(self) -> Iterable[PageKey]:
        """Every (layer, projection, lora) that takes pages, in allocation order."""
        targets = [p for p in PROJECTIONS if p in self.target_modules]
        for layer in sorted(self.layers):
            for proj in targets:
                for lora in range(self.num_loras):
                    yield layer, proj, lora

    def describe(self) -> str:
        return f"n={self.num_loras}, r={self.rank}, {len(self.layers)} layers, {'/'.join(self.target_modules)}"


def pages_needed(layout: LoraLayout, r_page: int) -> dict[str, int]:
    """Pages of each store that `layout` takes: `ceil(r / r_page)` per (layer, projection, LoRA) it adapts."""
    need = dict.fromkeys(STORES, 0)
    per_lora = layout.pages_per_lora(r_page)
    for proj in layout.target_modules:
        need[STORE_OF[proj]] += len(layout.layers) * layout.num_loras * per_lora
    return need


def page_rows(rank: int, r_page: int) -> list[tuple[int, int]]:
    """For each page of a rank-`rank` LoRA, the rows `[start, stop)` of its A (columns of its B) it holds.

    The last page holds fewer than r_page rows when r_page does not divide rank; its tail must be zero.
    """
    return [(start, min(start + r_page, rank)) for start in range(0, rank, r_page)]


@dataclass
class Residency:
    """A resident checkpoint: its pages, by (layer, projection, lora), and how many users pin it."""

    name: str
    layout: LoraLayout
    pages: dict[PageKey, list[int]]
    pins: int = 0

    def page_ids(self, store: str) -> list[int]:
        return [p for (_, proj, _), ids in self.pages.items() if STORE_OF[proj] == store for p in ids]


@dataclass(frozen=True)
class PoolStats:
    """Counters and gauges of a pool; pages are per store."""

    loads: int
    reloads: int
    evictions: int
    resident: list[str]
    on_host: list[str]
    pinned: list[str]
    pages_total: dict[str, int]
    pages_used: dict[str, int]
    pages_free: dict[str, int]


class PagePool:
    """Residency and LRU eviction of checkpoints over fixed page stores.

    `add` makes a name known (on host, no pages); `acquire` makes it resident, allocating the lowest free page ids
    and evicting least-recently-used unpinned checkpoints to host when a store is short; `pin`/`unpin` count its
    users; `evict` sends it to host; `unload` frees its pages and forgets it. A failed call changes nothing.

    Args:
        pages: pages per store, e.g. `{"gate_up": 512, "down": 256}` (see `split_pages`, `pages_for_checkpoints`).
        r_page: rank rows per page.
        size_hint: how to make the pool larger, said in errors (the serving flags, once they exist).
    """

    def __init__(self, pages: Mapping[str, int], r_page: int, size_hint: str = "make the pool larger"):
        if set(pages) != set(STORES) or any(n < 0 for n in pages.values()) or r_page < 1:
            raise PoolError(
                f"a pool needs pages for exactly the stores {STORES} and r_page >= 1; got {dict(pages)}"
                f" and r_page={r_page}"
            )
        self.r_page, self.size_hint = r_page, size_hint
        self.pages_total = {store: pages[store] for store in STORES}
        self._free = {store: list(range(n)) for store, n in self.pages_total.items()}  # heaps: lowest id first
        self._known: dict[str, LoraLayout] = {}
        self._resident: OrderedDict[str, Residency] = OrderedDict()  # least recently used first
        self._was_resident: set[str] = set()
        self.loads = self.reloads = self.evictions = 0

    # --- queries ---

    def residency(self, name: str) -> Residency | None:
        """The checkpoint's pages if it is resident, None if it is on host (PoolError if unknown)."""
        self._layout(name)
        return self._resident.get(name)

    def lru_order(self) -> list[str]:
        """Resident checkpoints, least recently used first."""
        return list(self._resident)

    def stats(self) -> PoolStats:
        free = {store: len(self._free[store]) for store in STORES}
        return PoolStats(
            loads=self.loads,
            reloads=self.reloads,
            evictions=self.evictions,
            resident=list(self._resident),
            on_host=sorted(set(self._known) - set(self._resident)),
            pinned=[name for name, res in self._resident.items() if res.pins],
            pages_total=dict(self.pages_total),
            pages_used={store: self.pages_total[store] - free[store] for store in STORES},
            pages_free=free,
        )

    # --- lifecycle ---

    def add(self, name: str, layout: LoraLayout) -> None:
        """Make `name` known (on host). PoolError if the name is taken or the checkpoint exceeds a whole store."""
        if name in self._known:
            where = "resident" if name in self._resident else "on host"
            raise PoolError(
                f"checkpoint name {name!r} is taken by a loaded checkpoint ({where},"
                f" {self._known[name].describe()}); unload it first"
            )
        problems = [
            f"checkpoint {name!r} needs {need} pages of the {store} store; the pool has {self.pages_total[store]}"
            f" ({self.size_hint})"
            for store, need in pages_needed(layout, self.r_page).items()
            if need > self.pages_total[store]
        ]
        if problems:
            raise PoolError(problems)
        self._known[name] = layout

    def acquire(self, name: str, *, pin: bool = False) -> tuple[Residency, bool]:
        """Make `name` resident and most recently used; with `pin`, also pin it (atomically).

        Returns its residency and whether its pages were allocated by this call (the caller then copies the
        checkpoint's weights into them). Raises PoolError when the name is unknown, or when the pages it needs
        are held by pinned checkpoints.
        """
        layout = self._layout(name)
        res = self._resident.get(name)
        fresh = res is None
        if res is None:
            need = pages_needed(layout, self.r_page)
            for victim in self._victims(name, need):
                self._to_host(victim)
            per_lora = layout.pages_per_lora(self.r_page)
            pages = {
                key: [heapq.heappop(self._free[STORE_OF[key[1]]]) for _ in range(per_lora)]
                for key in layout.page_keys()
            }
            res = Residency(name, layout, pages)
            self._resident[name] = res
            if name in self._was_resident:
                self.reloads += 1
            else:
                self.loads += 1
            self._was_resident.add(name)
        self._resident.move_to_end(name)
        if pin:
            res.pins += 1
        return res, fresh

    def pin(self, name: str) -> None:
        """Count one more user of a resident checkpoint; a pinned checkpoint is never evicted."""
        res = self._resident.get(name)
        if res is None:
            self._layout(name)
            raise PoolError(f"checkpoint {name!r} is on host, not resident; acquire it (pin=True) to pin it")
        res.pins += 1

    def unpin(self, name: str) -> None:
        res = self._resident.get(name)
        if res is None or res.pins == 0:
            self._layout(name)
            raise PoolError(f"checkpoint {name!r} is not pinned (unpin without a matching pin)")
        res.pins -= 1

    def evict(self, name: str) -> None:
        """Free the pages of an unpinned resident checkpoint; it stays known, on host."""
        self._check_unpinned(name, "evicting")
        if name in self._resident:
            self._to_host(name)

    def unload(self, name: str) -> None:
        """Free the checkpoint's pages for real and forget its name (PoolError if it is pinned)."""
        self._check_unpinned(name, "unloading")
        res = self._resident.pop(name, None)
        if res is not None:
            self._free_pages(res)
        del self._known[name]
        self._was_resident.discard(name)

    # --- the dense table a kernel indexes ---

    def dense_table(self, name: str, num_layers: int, n_max: int, pages_per_lora_max: int) -> list[int]:
        """Page ids of a resident checkpoint as a flat row-major `[num_layers, 3, n_max, pages_per_lora_max]` list
        (projections in PROJECTIONS order; gate/up ids index the gate_up store, down ids the down store), -1 where
        the checkpoint has no page: a layer or projection it does not adapt, a LoRA past its n, a page past its r.
        The caller copies it into its slot's row of a device table: `table[slot].copy_(torch.tensor(flat).view(..))`.
        """
        res = self._resident.get(name)
        if res is None:
            self._layout(name)
            raise PoolError(f"checkpoint {name!r} is on host, not resident; acquire it before building its table")
        layout, per_lora = res.layout, res.layout.pages_per_lora(self.r_page)
        problems = []
        if layout.num_loras > n_max or per_lora > pages_per_lora_max:
            problems.append(
                f"checkpoint {name!r} has n={layout.num_loras} and {per_lora} pages per LoRA; the table"
                f" holds n_max={n_max} and {pages_per_lora_max} pages per LoRA"
            )
        if max(layout.layers) >= num_layers:
            problems.append(f"checkpoint {name!r} adapts layer {max(layout.layers)}; the table has {num_layers}")
        if problems:
            raise PoolError(problems)
        flat = [-1] * (num_layers * len(PROJECTIONS) * n_max * pages_per_lora_max)
        for (layer, proj, lora), ids in res.pages.items():
            start = ((layer * len(PROJECTIONS) + PROJECTIONS.index(proj)) * n_max + lora) * pages_per_lora_max
            flat[start : start + len(ids)] = ids
        return flat

    def check(self) -> None:
        """Raise PoolError if any page is lost, doubly owned or out of range, or a count disagrees with a layout."""
        problems = []
        for store in STORES:
            owned = [p for res in self._resident.values() for p in res.page_ids(store)] + self._free[store]
            if sorted(owned) != list(range(self.pages_total[store])):
                problems.append(
                    f"{store} store: free and resident pages are not 0..{self.pages_total[store] - 1} once each"
                )
        for name, res in self._resident.items():
            if name not in self._known or res.pins < 0:
                problems.append(f"{name!r}: resident but not known, or pinned {res.pins} times")
            if {k: len(v) for k, v in res.pages.items()} != dict.fromkeys(
                res.layout.page_keys(), res.layout.pages_per_lora(self.r_page)
            ):
                problems.append(f"{name!r}: its pages do not match its layout {res.layout.describe()}")
        if problems:
            raise PoolError(problems)

    # --- internals ---

    def _layout(self, name: str) -> LoraLayout:
        if name not in self._known:
            raise PoolError(f"unknown checkpoint {name!r}; loaded: {sorted(self._known) or '(none)'}")
        return self._known[name]

    def _check_unpinned(self, name: str, doing: str) -> None:
        self._layout(name)
        res = self._resident.get(name)
        if res is not None and res.pins:
            raise PoolError(f"checkpoint {name!r} is in use (pinned {res.pins} times); unpin it before {doing}")

    def _victims(self, name: str, need: dict[str, int]) -> list[str]:
        """Least recently used unpinned checkpoints to evict so that every store has `need` free pages."""
        short = {store: n - len(self._free[store]) for store, n in need.items() if n > len(self._free[store])}
        if not short:
            return []
        evictable = [res for res in self._resident.values() if not res.pins and res.name != name]
        problems = []
        for store, missing in short.items():
            if sum(len(res.page_ids(store)) for res in evictable) < missing:
                holders = [n for n, res in self._resident.items() if res.pins and res.page_ids(store)]
                pinned = sum(len(self._resident[n].page_ids(store)) for n in holders)
                problems.append(
                    f"no room for checkpoint {name!r}: it needs {need[store]} pages of the {store} store,"
                    f" {len(self._free[store])} are free and {pinned} are held by checkpoints in use"
                    f" {holders}; retry when their requests finish, or {self.size_hint}"
                )
        if problems:
            raise PoolError(problems)
        victims = []
        for res in evictable:
            if not short:
                break
            freed = {store: len(res.page_ids(store)) for store in short}
            if any(freed.values()):
                victims.append(res.name)
                short = {s: m - freed[s] for s, m in short.items() if m > freed[s]}
        return victims

    def _to_host(self, name: str) -> None:
        self._free_pages(self._resident.pop(name))
        self.evictions += 1

    def _free_pages(self, res: Residency) -> None:
        for (_, proj, _), ids in res.pages.items():
            for page in ids:
                heapq.heappush(self._free[STORE_OF[proj]], page)
