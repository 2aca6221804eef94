"""Sizing the adapter pool: bytes per page, pages in a byte budget, pages for N checkpoints, the split by store.

Pure Python, like `pages.py`: a flag in bytes or in checkpoints becomes the `pages` argument of `PagePool`.
"""

from __future__ import annotations

import math
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


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_pool_size(value: str) -> tuple[str, int]:
    """`--pool-size`: a bare integer is a number of checkpoints ("16"), one with a unit is bytes ("512MiB", "2GB").

    Returns ("checkpoints", N) or ("bytes", N); PoolError names the bad value."""
    text = value.strip().lower().replace(" ", "")
    digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(digits) :]
    if not digits.isdigit() or int(digits) < 1 or (unit and unit not in _UNITS):
        raise PoolError(
            f"--pool-size {value!r} is neither a number of checkpoints (e.g. 16) nor a size in bytes with a unit"
            f" (e.g. 512MiB; units {', '.join(_UNITS)})"
        )
    return ("bytes", int(digits) * _UNITS[unit]) if unit else ("checkpoints", int(digits))


def plan_pool(
    configs: list[Any],
    *,
    max_loras: int,
    hidden_size: int,
    intermediate_size: int,
    dtype: Any,
    pool_size: str | None = None,
    r_page: int | None = None,
    n_max: int | None = None,
    k_max: int | None = None,
    r_max: int | None = None,
) -> dict:
    """The `PoolSettings` fields (spec.py) for a server that starts with `configs` (RemixConfigs, at least one).

    Defaults: n_max, k_max and r_max are the largest of the configs; r_page is the ranks' greatest common divisor
    (no page padding), or the smallest rank where the divisor is below 4 (fewer, fuller pages); the pool holds
    `max(len(configs), max_loras)` checkpoints as large as the largest. `pool_size` overrides the size (see
    `parse_pool_size`). PoolError when the pool cannot hold `max_loras` of the largest checkpoint at once."""
    if not configs:
        raise PoolError("a pool needs at least one checkpoint to size it")
    layouts = [LoraLayout.of(c) for c in configs]
    ranks = [c.rank for c in configs]
    if r_page is None:
        r_page = math.gcd(*ranks)
        if r_page < 4:
            r_page = min(ranks)
    settings = {
        "r_page": r_page,
        "n_max": n_max or max(c.num_loras for c in configs),
        "k_max": k_max or max(c.top_k for c in configs),
        "r_max": r_max or max(ranks),
    }
    largest = pages_for_checkpoints(1, layouts, r_page)
    kind, amount = parse_pool_size(pool_size) if pool_size else ("checkpoints", max(len(configs), max_loras))
    if kind == "checkpoints":
        pages = {store: max(amount * n, 1) for store, n in largest.items()}
    else:
        total = pages_in_bytes(amount, hidden_size, intermediate_size, r_page, dtype)
        widest = max(layouts, key=lambda lay: sum(pages_needed(lay, r_page).values()))
        pages = split_pages(total, widest, r_page)
    short = [f"{largest[s] * max_loras} pages of the {s} store" for s in STORES if largest[s] * max_loras > pages[s]]
    if short:
        raise PoolError(
            f"a pool of {pages} pages is too small: --max-loras {max_loras} checkpoints as large as the largest"
            f" need {' and '.join(short)}; raise --pool-size or lower --max-loras"
        )
    return {**settings, "pages": pages}
