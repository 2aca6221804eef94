"""The adapter pool's page bookkeeping (remix_serve/vllm_plugin/pool/pages.py, sizing.py): no engine, no torch."""

from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest

from remix_serve.vllm_plugin.pool.pages import (
    PROJECTIONS,
    STORES,
    LoraLayout,
    PagePool,
    PoolError,
    page_rows,
    pages_needed,
)
from remix_serve.vllm_plugin.pool.sizing import page_bytes, pages_for_checkpoints, pages_in_bytes, split_pages

ALL = ("gate_proj", "up_proj", "down_proj")

# (description, layout, r_page, pages needed per store). k is not a field: it changes no page count.
LAYOUTS = [
    ("all targets, r = r_page", LoraLayout(4, 8, (0, 1), ALL), 8, {"gate_up": 2 * 2 * 4, "down": 2 * 4}),
    ("r twice r_page", LoraLayout(4, 16, (0, 1), ALL), 8, {"gate_up": 2 * 2 * 4 * 2, "down": 2 * 4 * 2}),
    ("r not a multiple of r_page", LoraLayout(3, 5, (2,), ALL), 4, {"gate_up": 2 * 3 * 2, "down": 3 * 2}),
    ("up and down, 3 layers", LoraLayout(8, 8, (0, 3, 7), ("up_proj", "down_proj")), 8, {"gate_up": 24, "down": 24}),
    ("gate only", LoraLayout(2, 4, (1,), ("gate_proj",)), 2, {"gate_up": 4, "down": 0}),
    ("down only, r_page 1", LoraLayout(64, 2, (0,), ("down_proj",)), 1, {"gate_up": 0, "down": 128}),
]


def layout(n: int = 2, r: int = 4, layers: tuple[int, ...] = (0,), targets: tuple[str, ...] = ALL) -> LoraLayout:
    return LoraLayout(n, r, layers, targets)


@pytest.mark.parametrize(("desc", "lay", "r_page", "need"), LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_pages_needed_has_no_padding(desc: str, lay: LoraLayout, r_page: int, need: dict[str, int]) -> None:
    assert pages_needed(lay, r_page) == need
    pool = PagePool({"gate_up": 200, "down": 200}, r_page)
    pool.add("x", lay)
    res, fresh = pool.acquire("x")
    assert fresh
    assert pool.stats().pages_used == need
    per_lora = math.ceil(lay.rank / r_page)
    assert {key: len(ids) for key, ids in res.pages.items()} == dict.fromkeys(lay.page_keys(), per_lora)
    assert {key[0] for key in res.pages} == set(lay.layers)
    assert {key[1] for key in res.pages} == set(lay.target_modules)
    pool.check()


def test_mixed_checkpoints_take_only_their_own_pages() -> None:
    pool = PagePool({"gate_up": 300, "down": 300}, r_page=4)
    for i, (_, lay, _, _) in enumerate(LAYOUTS):
        pool.add(f"c{i}", lay)
        pool.acquire(f"c{i}")
    used = pool.stats().pages_used
    assert used == {s: sum(pages_needed(lay, 4)[s] for _, lay, _, _ in LAYOUTS) for s in STORES}
    pool.check()


def test_page_rows_waste_only_the_last_pages_tail() -> None:
    assert page_rows(8, 8) == [(0, 8)]
    assert page_rows(16, 8) == [(0, 8), (8, 16)]
    assert page_rows(5, 4) == [(0, 4), (4, 5)]  # 3 rows of the last page unused
    assert page_rows(3, 8) == [(0, 3)]
    for r in range(1, 40):
        for r_page in (1, 3, 8):
            rows = page_rows(r, r_page)
            assert len(rows) == math.ceil(r / r_page)
            assert sum(stop - start for start, stop in rows) == r
            assert all(stop - start == r_page for start, stop in rows[:-1])


def test_layout_of_a_remix_config(tiny_base) -> None:
    from remix_serve import tiny
    from remix_serve.bases import base_fingerprint
    from remix_serve.checkpoint import PROJECTIONS as CHECKPOINT_PROJECTIONS

    fp = base_fingerprint(str(tiny_base))
    config = tiny.tiny_config(str(tiny_base), fp, num_loras=6, top_k=3, rank=5, target_modules=("down_proj",))
    assert LoraLayout.of(config) == LoraLayout(6, 5, (0, 1), ("down_proj",))
    config = tiny.tiny_config(str(tiny_base), fp, layers=[1])
    assert LoraLayout.of(config).layers == (1,)
    assert PROJECTIONS == CHECKPOINT_PROJECTIONS


def test_layout_rejects_bad_values_all_at_once() -> None:
    with pytest.raises(PoolError) as err:
        LoraLayout(0, 4, (0, 0), ("q_proj",))
    assert err.value.problems == [
        "num_loras=0 and rank=4 must both be at least 1",
        "layers [0, 0] must be distinct non-negative indices, at least one",
        "target_modules ['q_proj'] must be distinct names from ('gate_proj', 'up_proj', 'down_proj')",
    ]


def test_dense_table_indexes_every_page_and_marks_the_rest() -> None:
    pool = PagePool({"gate_up": 64, "down": 64}, r_page=4)
    pool.add("pad", layout(1, 4, (0,), ("down_proj",)))  # takes down page 0, so ids of the stores differ
    pool.acquire("pad")
    lay = layout(n=2, r=6, layers=(1, 3), targets=("up_proj", "down_proj"))
    pool.add("x", lay)
    res, _ = pool.acquire("x")
    L, n_max, ppl = 4, 3, 2
    flat = pool.dense_table("x", L, n_max, ppl)
    assert len(flat) == L * 3 * n_max * ppl

    def at(layer: int, proj: str, lora: int, j: int) -> int:
        return flat[((layer * 3 + PROJECTIONS.index(proj)) * n_max + lora) * ppl + j]

    seen = 0
    for layer in range(L):
        for proj in PROJECTIONS:
            for lora in range(n_max):
                ids = res.pages.get((layer, proj, lora), [])
                for j in range(ppl):
                    assert at(layer, proj, lora, j) == (ids[j] if j < len(ids) else -1)
                    seen += j < len(ids)
    assert seen == sum(pages_needed(lay, 4).values()) == 16
    assert res.pages[(1, "down_proj", 0)] == [1, 2]  # down page 0 belongs to "pad"
    assert res.pages[(1, "up_proj", 0)] == [0, 1]
    with pytest.raises(PoolError) as err:
        pool.dense_table("x", 3, 1, 1)
    assert err.value.problems == [
        "checkpoint 'x' has n=2 and 2 pages per LoRA; the table holds n_max=1 and 1 pages per LoRA",
        "checkpoint 'x' adapts layer 3; the table has 3",
    ]


def pool_of(sizes: dict[str, int], **layouts: LoraLayout) -> PagePool:
    pool = PagePool(sizes, r_page=4)
    for name, lay in layouts.items():
        pool.add(name, lay)
    return pool


def test_lru_evicts_the_least_recently_used() -> None:
    one = layout(n=2, r=4)  # 4 gate_up pages, 2 down pages
    pool = pool_of({"gate_up": 12, "down": 6}, a=one, b=one, c=one, d=one)
    for name in "abc":
        pool.acquire(name)
    pool.acquire("a")  # a hit: no pages allocated, a becomes most recent
    assert pool.lru_order() == ["b", "c", "a"]
    _, fresh = pool.acquire("d")
    assert fresh
    assert pool.lru_order() == ["c", "a", "d"]
    assert pool.residency("b") is None
    assert pool.stats().on_host == ["b"]
    _, fresh = pool.acquire("b")  # back from host: evicts c
    assert fresh
    assert pool.lru_order() == ["a", "d", "b"]
    stats = pool.stats()
    assert (stats.loads, stats.reloads, stats.evictions) == (4, 1, 2)
    assert stats.pages_free == {"gate_up": 0, "down": 0}
    pool.check()


def test_pinned_checkpoints_are_never_evicted() -> None:
    one = layout(n=2, r=4)
    pool = pool_of({"gate_up": 12, "down": 6}, a=one, b=one, c=one, d=one)
    pool.acquire("a", pin=True)
    pool.acquire("b")
    pool.acquire("c")
    pool.acquire("d")  # a is the least recently used but pinned: b goes
    assert pool.lru_order() == ["a", "c", "d"]
    pool.pin("c")
    pool.pin("d")
    before = (pool.lru_order(), pool.stats())
    with pytest.raises(PoolError) as err:
        pool.acquire("b")
    assert str(err.value) == (
        "no room for checkpoint 'b': it needs 4 pages of the gate_up store, 0 are free and 12 are held by checkpoints"
        " in use ['a', 'c', 'd']; retry when their requests finish, or make the pool larger\n"
        "no room for checkpoint 'b': it needs 2 pages of the down store, 0 are free and 6 are held by checkpoints"
        " in use ['a', 'c', 'd']; retry when their requests finish, or make the pool larger"
    )
    assert (pool.lru_order(), pool.stats()) == before  # a failed acquire changes nothing
    pool.unpin("d")
    pool.acquire("b")
    assert pool.lru_order() == ["a", "c", "b"]
    pool.check()


def test_eviction_skips_checkpoints_that_free_nothing_where_short() -> None:
    pool = pool_of(
        {"gate_up": 8, "down": 8},
        gate=layout(n=2, r=4, targets=("gate_proj",)),  # 2 gate_up pages
        down=layout(n=8, r=4, targets=("down_proj",)),  # 8 down pages: the whole store
        up=layout(n=6, r=4, targets=("up_proj",)),  # 6 gate_up pages
        more=layout(n=1, r=4, targets=("gate_proj",)),  # 1 gate_up page
    )
    pool.acquire("down")  # least recently used, but holds no gate_up page
    pool.acquire("gate")
    pool.acquire("up")
    pool.acquire("more")  # gate_up is full: "gate" goes, "down" stays
    assert pool.lru_order() == ["down", "up", "more"]
    assert pool.stats().evictions == 1


def test_unload_frees_pages_for_reuse_and_forgets_the_name() -> None:
    one = layout(n=2, r=4)
    pool = pool_of({"gate_up": 8, "down": 4}, a=one, b=one)
    res_a, _ = pool.acquire("a")
    pool.acquire("b")
    a_pages = {store: sorted(res_a.page_ids(store)) for store in STORES}
    pool.unload("a")
    assert pool.stats().pages_free == {"gate_up": 4, "down": 2}
    with pytest.raises(PoolError, match="unknown checkpoint 'a'; loaded: \\['b'\\]"):
        pool.acquire("a")
    pool.add("a", layout(n=1, r=8))  # the name is free again, with another layout
    res, _ = pool.acquire("a")
    assert {store: sorted(res.page_ids(store)) for store in STORES} == a_pages  # the lowest free ids: a's old pages
    pool.unload("b")
    pool.unload("a")
    stats = pool.stats()
    assert stats.pages_free == stats.pages_total and stats.resident == stats.on_host == []
    pool.add("host-only", one)
    pool.unload("host-only")  # never resident: nothing to free
    pool.check()


def test_error_messages() -> None:
    big = layout(n=8, r=16, layers=(0, 1, 2), targets=("down_proj",))  # 8 * 4 * 3 = 96 down pages
    pool = PagePool({"gate_up": 64, "down": 64}, r_page=4, size_hint="raise --pool-bytes")
    with pytest.raises(PoolError) as err:
        pool.add("x", big)
    assert str(err.value) == "checkpoint 'x' needs 96 pages of the down store; the pool has 64 (raise --pool-bytes)"
    with pytest.raises(PoolError) as err:
        pool.add("x", layout(n=8, r=16, layers=(0, 1, 2)))
    assert err.value.problems == [
        "checkpoint 'x' needs 192 pages of the gate_up store; the pool has 64 (raise --pool-bytes)",
        "checkpoint 'x' needs 96 pages of the down store; the pool has 64 (raise --pool-bytes)",
    ]
    assert pool.stats().on_host == []  # a refused add leaves no trace
    pool.add("a", layout())
    with pytest.raises(PoolError) as err:
        pool.add("a", layout(n=3))
    assert str(err.value) == (
        "checkpoint name 'a' is taken by a loaded checkpoint (on host, n=2, r=4, 1 layers,"
        " gate_proj/up_proj/down_proj); unload it first"
    )
    with pytest.raises(PoolError, match="^unknown checkpoint 'b'; loaded: \\['a'\\]$"):
        pool.pin("b")
    with pytest.raises(PoolError, match="^unknown checkpoint 'b'; loaded: \\(none\\)$"):
        PagePool({"gate_up": 1, "down": 1}, 1).unload("b")
    with pytest.raises(PoolError, match="^checkpoint 'a' is on host, not resident; acquire it \\(pin=True\\) to pin"):
        pool.pin("a")
    with pytest.raises(PoolError, match="^checkpoint 'a' is not pinned \\(unpin without a matching pin\\)$"):
        pool.unpin("a")
    with pytest.raises(PoolError, match="^checkpoint 'a' is on host, not resident; acquire it before building"):
        pool.dense_table("a", 1, 2, 1)
    pool.acquire("a", pin=True)
    pool.pin("a")
    for call, doing in ((pool.unload, "unloading"), (pool.evict, "evicting")):
        with pytest.raises(PoolError) as err:
            call("a")
        assert str(err.value) == f"checkpoint 'a' is in use (pinned 2 times); unpin it before {doing}"
    with pytest.raises(PoolError, match="exactly the stores"):
        PagePool({"gate_up": 4}, 4)


def test_check_detects_a_lost_or_doubled_page() -> None:
    pool = pool_of({"gate_up": 8, "down": 4}, a=layout())
    pool.acquire("a")
    pool._free["down"].append(0)  # page 0 of down is now both free and a's
    with pytest.raises(PoolError, match="down store: free and resident pages are not 0..3 once each"):
        pool.check()


def test_random_operations_keep_every_page_accounted_for() -> None:
    """A seeded random walk over add/acquire/pin/unpin/evict/unload: after every step no page is lost or
    shared, used pages are exactly what the resident layouts need, and no pinned checkpoint was ever evicted."""
    rng = random.Random(1234)
    r_page = 4
    pool = PagePool({"gate_up": 40, "down": 24}, r_page)
    names = [f"c{i}" for i in range(10)]
    pins: dict[str, int] = {}
    ops = ["add"] * 2 + ["acquire"] * 4 + ["pin"] + ["unpin"] * 3 + ["evict"] + ["unload"] * 2
    errors = 0
    for _ in range(3000):
        name, op = rng.choice(names), rng.choice(ops)
        pinned_before = {n for n, count in pins.items() if count}
        try:
            if op == "add":
                targets = tuple(rng.sample(ALL, rng.randint(1, 3)))
                layers = tuple(rng.sample(range(4), rng.randint(1, 3)))
                pool.add(name, LoraLayout(rng.randint(1, 4), rng.randint(1, 9), layers, targets))
            elif op == "acquire":
                pin = rng.random() < 0.3
                pool.acquire(name, pin=pin)
                pins[name] = pins.get(name, 0) + pin
            elif op == "pin":
                pool.pin(name)
                pins[name] = pins.get(name, 0) + 1
            elif op == "unpin":
                pool.unpin(name)
                pins[name] -= 1
            else:
                getattr(pool, op)(name)
                if op == "unload":
                    pins.pop(name, None)
        except PoolError:
            errors += 1
        pool.check()
        stats = pool.stats()
        assert pinned_before <= set(stats.resident)  # a pinned checkpoint is never evicted
        assert set(stats.pinned) == {n for n, count in pins.items() if count}
        resident = [pool.residency(n).layout for n in stats.resident]
        assert stats.pages_used == {s: sum(pages_needed(lay, r_page)[s] for lay in resident) for s in STORES}
        assert all(stats.pages_used[s] + stats.pages_free[s] == stats.pages_total[s] for s in STORES)
    stats = pool.stats()
    assert stats.loads > 50 and stats.reloads > 20 and stats.evictions > 50 and errors > 50  # every path ran


def test_sizing() -> None:
    # SmolLM2-135M: D=576, I=1536; a page of 8 rows holds 8 * (576 + 1536) values of either store
    assert page_bytes(576, 1536, 8, "bfloat16") == 8 * 2112 * 2 == 33792
    assert page_bytes(576, 1536, 8, "float32") == 2 * page_bytes(576, 1536, 8, "float16")
    assert pages_in_bytes(1 << 20, 576, 1536, 8, "bfloat16") == (1 << 20) // 33792 == 31
    with pytest.raises(PoolError, match="^dtype 'int8' has no pool page size; known: \\['bfloat16', 'float16'"):
        page_bytes(576, 1536, 8, "int8")
    assert split_pages(30) == {"gate_up": 20, "down": 10}
    assert split_pages(30, layout(targets=("up_proj", "down_proj")), 4) == {"gate_up": 15, "down": 15}
    assert split_pages(10, layout(targets=("down_proj",)), 4) == {"gate_up": 1, "down": 9}
    with pytest.raises(PoolError, match="too small to split"):
        split_pages(1)
    demo = layout(n=8, r=8, layers=tuple(range(8)), targets=("up_proj", "down_proj"))
    other = layout(n=4, r=16, layers=(0,), targets=ALL)
    assert pages_for_checkpoints(3, [demo, other], 8) == {"gate_up": 3 * 64, "down": 3 * 64}
    pool = PagePool(pages_for_checkpoints(3, [demo], 8), 8)
    for i in range(3):
        pool.add(f"c{i}", demo)
        pool.acquire(f"c{i}", pin=True)  # exactly three fit, none evicted
    assert pool.stats().pages_free == {"gate_up": 0, "down": 0}


def test_pages_and_sizing_import_neither_torch_nor_vllm() -> None:
    code = (
        "import sys; import remix_serve.vllm_plugin.pool.pages, remix_serve.vllm_plugin.pool.sizing; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm')))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
