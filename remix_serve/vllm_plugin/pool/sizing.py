"""Sizing the adapter pool: bytes per page, pages in a byte budget, pages for N checkpoints, the split by store.

Pure Python, like `pages.py`: a flag in bytes or in checkpoints becomes the `pages` argument of `PagePool`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from remix_serve.vllm_plugin.pool.pages import STORES, LoraLayout, PoolError, pages_needed

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}


def page_bytes(hidden_size: int, intermediate_size: int, r_page: int, dtype: Any) -> int:
    """Bytes of one page of either store: `r_page` rows of A plus `r_page` columns of B, `r_page * (D + I)`
    values. `dtype` is a name ("bfloat16") or a torch dtype; an unknown one raises PoolError."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise PoolError(f"dtype {name!r} has no pool page size; known: {sorted(DTYPE_BYTES)}")
    return r_page * (hidden_size + intermediate_size) * DTYPE_BYTES[name]


def split_pages(total: int, like: LoraLayout | None = None, r_page: int = 1) -> dict[str, int]:
    """Split `total` pages between the stores in proportion to what `like` needs (default: 2 gate_up to 1 down,
    the proportion of a checkpoint adapting all three projections). Every store gets at least one page."""
    weights = pages_needed(like, r_page) if like is not None else {"gate_up": 2, "down": 1}
    if total < len(STORES) or sum(weights.values()) == 0:
        raise PoolError(f"a pool of {total} pages is too small to split between the stores {STORES}")
    gate_up = round(total * weights["gate_up"] / sum(weights.values()))
    gate_up = min(max(gate_up, 1), total - 1)
    return {"gate_up": gate_up, "down": total - gate_up}


def pages_for_checkpoints(count: int, layouts: Iterable[LoraLayout], r_page: int) -> dict[str, int]:
    """Pages of each store that hold `count` checkpoints as large, store by store, as the largest of `layouts`."""
    largest = dict.fromkeys(STORES, 0)
    for layout in layouts:
        for store, n in pages_needed(layout, r_page).items():
            largest[store] = max(largest[store], n)
    return {store: count * n for store, n in largest.items()}


def pages_in_bytes(nbytes: int, hidden_size: int, intermediate_size: int, r_page: int, dtype: Any) -> int:
    """How many whole pages (of either store) fit in `nbytes`."""
    return nbytes // page_bytes(hidden_size, intermediate_size, r_page, dtype)
