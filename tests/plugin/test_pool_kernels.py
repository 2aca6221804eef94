"""The pool's CPU gather kernel (`cpu_kernels.pool_lora_add`) equals its PyTorch reference (`pool/delta.py`)."""

from __future__ import annotations

import pytest
import torch

from remix_serve.vllm_plugin import cpu_kernels
from remix_serve.vllm_plugin.pool import delta
from tests.helpers.pool_tolerance import assert_close_up_to_h_rounding, h_rounding_slack

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ toolchain to build the CPU kernels")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# After float32 accumulation in another order, the results may differ by one rounding to the output dtype.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def pool_case(T: int, K: int, r_page: int, dtype: torch.dtype, *, D: int = 96, N: int = 80, P: int = 12, seed: int = 0):
    """Random x, A, B, out (out a column slice `gate_up[:, N:]` of a `[T, 2N]` tensor), pages with -1s mixed in,
    every third token from the third a base token (all -1), duplicate pages within some tokens, random coefficients."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype)
    A = (torch.randn(P, r_page, D, generator=g) * 0.2).to(dtype)
    B = (torch.randn(P, r_page, N, generator=g) * 0.2).to(dtype)
    gate_up = torch.randn(T, 2 * N, generator=g).to(dtype)
    pages = torch.randint(0, P, (T, K), generator=g)
    skip = torch.rand(T, K, generator=g) < 0.3
    skip[:, 0] = False  # every token but the base ones keeps a page
    pages[skip] = -1
    pages[2::3] = -1  # base-model tokens
    if K > 1:
        pages[1::3, 1] = pages[1::3, 0].clamp(min=0)  # a page twice in one token
    coef = torch.randn(T, K, generator=g) * 0.7 + 1.0
    return gate_up, x, A, B, pages, coef


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 5, 64, 300])
@pytest.mark.parametrize("K", [1, 3, 8])
@pytest.mark.parametrize("r_page", [4, 8, 16])
def test_pool_lora_add_equals_reference(dtype, T, K, r_page):
    gate_up, x, A, B, pages, coef = pool_case(T, K, r_page, dtype, seed=T * 100 + K * 10 + r_page)
    N = gate_up.shape[1] // 2
    before = gate_up.clone()
    expected = delta.lora_add_reference(before.clone()[:, N:], x, A, B, pages, coef)

    cpu_kernels.pool_lora_add(gate_up[:, N:], x, A, B, pages, coef)

    assert torch.equal(gate_up[:, :N], before[:, :N]), "the other columns of the wider tensor were written"
    base = (pages < 0).all(dim=1)
    assert torch.equal(gate_up[base], before[base]), "a base token's row changed"
    if T > 1:
        assert (~base).any() and base.any()
    assert not torch.equal(gate_up[~base, N:], before[~base, N:]), "no delta was added"
    slack = h_rounding_slack(x, A, B, pages, coef)
    assert_close_up_to_h_rounding(gate_up[:, N:], expected, slack, rtol=RTOL[dtype], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_lora_add_reads_a_column_slice_of_x(dtype):
    gate_up, x, A, B, pages, coef = pool_case(7, 3, 8, dtype, seed=3)
    wide = torch.randn(7, x.shape[1] + 40).to(dtype)
    wide[:, 16 : 16 + x.shape[1]] = x
    N = gate_up.shape[1] // 2
    got, expected = gate_up[:, :N].clone(), gate_up[:, :N].clone()
    cpu_kernels.pool_lora_add(got, wide[:, 16 : 16 + x.shape[1]], A, B, pages, coef)
    cpu_kernels.pool_lora_add(expected, x, A, B, pages, coef)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_lora_add_sums_the_coefficient_weighted_pages(dtype):
    """Independent of the reference: two listed pages give c0 * delta(page a) + c1 * delta(page b), and a page listed
    twice counts twice."""
    g = torch.Generator().manual_seed(7)
    D, N, r = 64, 48, 4
    x = torch.randn(2, D, generator=g).to(dtype)
    A, B = torch.randn(5, r, D, generator=g).to(dtype), torch.randn(5, r, N, generator=g).to(dtype)
    pages = torch.tensor([[1, 3], [2, 2]])
    coef = torch.tensor([[0.5, -2.0], [1.0, 1.0]])
    out = torch.zeros(2, N, dtype=dtype)
    cpu_kernels.pool_lora_add(out, x, A, B, pages, coef)
    xf, Af, Bf = x.double(), A.double(), B.double()

    def h(c: float, p: int, t: int) -> torch.Tensor:  # rounded to bf16 in a bf16 call, as the contract says
        v = c * (Af[p] @ xf[t])
        return v.to(dtype).double() if dtype == torch.bfloat16 else v

    expected = torch.stack([h(0.5, 1, 0) @ Bf[1] + h(-2.0, 3, 0) @ Bf[3], 2 * h(1.0, 2, 1) @ Bf[2]])
    slack = h_rounding_slack(x, A, B, pages, coef)
    assert_close_up_to_h_rounding(out, expected.to(dtype), slack, rtol=RTOL[dtype], atol=1e-4)


def test_pool_lora_add_is_batch_invariant():
    """A token's result does not depend on the other tokens of its batch (decode batches change every step)."""
    gate_up, x, A, B, pages, coef = pool_case(40, 3, 8, torch.bfloat16, seed=5)
    out = gate_up[:, 80:]
    full = out.clone()
    cpu_kernels.pool_lora_add(full, x, A, B, pages, coef)
    assert not torch.equal(full, out)
    for t in (0, 1, 2, 20, 39):
        one = out[t : t + 1].clone()
        cpu_kernels.pool_lora_add(one, x[t : t + 1], A, B, pages[t : t + 1], coef[t : t + 1])
        assert torch.equal(one[0], full[t])


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_pages_skipped_leaves_out_unchanged(impl, dtype):
    _, x, A, B, pages, coef = pool_case(9, 4, 8, dtype, seed=11)
    out = torch.randn(9, B.shape[2]).to(dtype)
    out[0, :3] = torch.tensor([float("nan"), -0.0, float("inf")])
    before = out.clone()
    if impl == "kernel":
        cpu_kernels.pool_lora_add(out, x, A, B, torch.full_like(pages, -1), coef)
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        assert torch.equal(out.view(bits), before.view(bits))  # the kernel does not touch the row at all
    else:
        delta.lora_add_reference(out, x, A, B, torch.full_like(pages, -1), coef)
        # The reference adds a zero delta: the same values (-0.0 + 0.0 gives +0.0, equal but not the same bits).
        torch.testing.assert_close(out, before, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bad", [12, 1000, -2])
def test_an_out_of_range_page_raises_with_its_value_and_writes_nothing(bad):
    gate_up, x, A, B, pages, coef = pool_case(6, 3, 4, torch.float32, seed=1)  # P = 12
    pages[4, 2] = bad
    out = gate_up[:, 80:]
    before = out.clone()
    with pytest.raises(RuntimeError, match=rf"page id {bad} \(token 4\) out of range for a pool of P=12 pages"):
        cpu_kernels.pool_lora_add(out, x, A, B, pages, coef)
    assert torch.equal(out, before)


def test_bad_shapes_and_dtypes_get_a_clear_error():
    _, x, A, B, pages, coef = pool_case(4, 2, 4, torch.float32, seed=2)
    out = torch.zeros(4, B.shape[2])
    with pytest.raises(RuntimeError, match="must share a dtype"):
        cpu_kernels.pool_lora_add(out, x.bfloat16(), A, B, pages, coef)
    with pytest.raises(RuntimeError, match="pages must be an int64"):
        cpu_kernels.pool_lora_add(out, x, A, B, pages.int(), coef)
    with pytest.raises(RuntimeError, match="coef must be a float32"):
        cpu_kernels.pool_lora_add(out, x, A, B, pages, coef.double())
    with pytest.raises(RuntimeError, match=r"expected \[P, r_page, 96\] and \[P, r_page, 80\]"):
        cpu_kernels.pool_lora_add(out, x, A[:, :, :50].contiguous(), B, pages, coef)
    with pytest.raises(RuntimeError, match="out must be \\[T, N\\] with contiguous rows"):
        cpu_kernels.pool_lora_add(torch.zeros(80, 4).t(), x, A, B, pages, coef)


def test_lora_add_dispatches_to_the_kernel_on_cpu(monkeypatch):
    gate_up, x, A, B, pages, coef = pool_case(10, 3, 8, torch.bfloat16, seed=4)
    calls = []
    real = cpu_kernels.pool_lora_add

    def spy(*args):
        calls.append(args)
        real(*args)

    monkeypatch.setattr(cpu_kernels, "pool_lora_add", spy)
    start = gate_up[:, 80:].clone()
    expected = delta.lora_add_reference(start.clone(), x, A, B, pages, coef)
    out = gate_up[:, 80:]
    assert delta.lora_add(out, x, A, B, pages, coef) is out
    assert len(calls) == 1 and calls[0][0] is out
    slack = h_rounding_slack(x, A, B, pages, coef)
    assert_close_up_to_h_rounding(out, expected, slack, rtol=RTOL[torch.bfloat16], atol=1e-5)

    # Without the built kernels, the reference runs.
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    out = start.clone()
    assert delta.lora_add(out, x, A, B, pages, coef) is out
    assert len(calls) == 1
    assert torch.equal(out, expected)


def test_pool_lora_add_op_passes_torch_library_opcheck():
    """Schema (out mutated), fake implementation and dispatch agree: what torch.compile relies on to trace it."""
    gate_up, x, A, B, pages, coef = pool_case(5, 3, 4, torch.float32, seed=9)
    torch.library.opcheck(cpu_kernels.pool_lora_add_op, (gate_up.clone(), 80, x, A, B, pages, coef, 3))
    out = gate_up.clone()
    cpu_kernels.pool_lora_add_op(out, 80, x, A, B, pages, coef, 1)  # into the second half: columns 80..159
    assert torch.equal(out[:, :80], gate_up[:, :80])
    torch.testing.assert_close(out[:, 80:], delta.lora_add_reference(gate_up[:, 80:].clone(), x, A, B, pages, coef))


def test_pool_route_op_passes_torch_library_opcheck():
    case = route_case(6, S=4, n_max=5, ppl=2, dtype=torch.float32)
    torch.library.opcheck(cpu_kernels.pool_route_op, (*case, 3))


# --- the AMX path: bf16 calls of 32 tokens or more on the matrix units, where the CPU has them

needs_amx = pytest.mark.skipif(
    not (cpu_kernels.available() and cpu_kernels.amx_available()), reason="this CPU has no AMX-BF16"
)


def lora_pages(T: int, k: int, ppl: int, loras: int, seed: int) -> torch.Tensor:
    """Pages as pool_route lists them: k picks per token, each pick its LoRA's ppl pages (LoRA l owns pages
    l*ppl ... l*ppl+ppl-1; every third LoRA has rank r_page only, its later pages -1); some picks empty (k below
    k_max) and every third token from the third a base token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(loras, generator=g)[:k] for _ in range(T)])  # [T, k], distinct per token
    pages = ids[:, :, None] * ppl + torch.arange(ppl)
    pages[:, :, 1:] = torch.where(ids[:, :, None] % 3 == 0, -1, pages[:, :, 1:])
    pages[torch.rand(T, k, generator=g) < 0.15] = -1
    pages[2::3] = -1
    return pages.reshape(T, k * ppl)


def picks_case(T: int, k: int, ppl: int, r_page: int, D: int, N: int, seed: int):
    """bf16 x, A, B for 12 LoRAs of ppl pages each, `lora_pages`' pages, one coefficient per pick (on its pages),
    `start` [T, 2N] (the delta goes into its second half) and the reference's result for that half."""
    loras = 12
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).bfloat16()
    A = (torch.randn(loras * ppl, r_page, D, generator=g) * 0.2).bfloat16()
    B = (torch.randn(loras * ppl, r_page, N, generator=g) * 0.2).bfloat16()
    pages = lora_pages(T, k, ppl, loras, seed=T)
    coef = (torch.rand(T, k, generator=g) + 0.5).repeat_interleave(ppl, dim=1)
    start = torch.randn(T, 2 * N, generator=g).bfloat16()
    expected = delta.lora_add_reference(start[:, N:].clone(), x, A, B, pages, coef)
    return x, A, B, pages, coef, start, expected


@needs_amx
@pytest.mark.parametrize("T", [32, 300, 1100])  # 1100: more than one chunk of the AMX path
@pytest.mark.parametrize(("k", "ppl", "r_page"), [(2, 1, 8), (2, 2, 8), (3, 2, 4), (2, 1, 16), (2, 4, 4), (1, 2, 16)])
def test_amx_path_equals_the_reference_and_the_avx512_path(T, k, ppl, r_page):
    """On the matrix units with a pick's pages as one matrix (ppl * r_page <= 16; else page by page), the result is
    the reference's and the AVX-512 path's up to one rounding of the output; base tokens stay bit-identical."""
    N = 96
    x, A, B, pages, coef, start, expected = picks_case(T, k, ppl, r_page, 160, N, seed=T + 10 * ppl + r_page)
    was = cpu_kernels.set_amx(False)
    try:
        avx = start.clone()
        cpu_kernels.pool_lora_add(avx[:, N:], x, A, B, pages, coef, ppl)
    finally:
        cpu_kernels.set_amx(was)
    amx = start.clone()
    cpu_kernels.pool_lora_add(amx[:, N:], x, A, B, pages, coef, ppl)
    base = (pages < 0).all(dim=1)
    assert torch.equal(amx[:, :N], start[:, :N]) and torch.equal(amx[base], start[base])
    assert not torch.equal(amx[~base], start[~base])
    slack = h_rounding_slack(x, A, B, pages, coef)
    assert_close_up_to_h_rounding(amx[:, N:], expected, slack, rtol=RTOL[torch.bfloat16], atol=1e-5)
    assert_close_up_to_h_rounding(amx[:, N:], avx[:, N:], slack, rtol=RTOL[torch.bfloat16], atol=1e-5)
    assert (amx == avx).float().mean() > 0.99  # all but the rare value at a rounding boundary


needs_tiled = pytest.mark.skipif(
    not (cpu_kernels.available() and cpu_kernels.tiled_available()), reason="this CPU has no AVX512-BF16"
)


@needs_tiled
@pytest.mark.parametrize("T", [4, 33, 300, 1100])  # 1100: more than one chunk of the tiled path
@pytest.mark.parametrize(("k", "ppl", "r_page"), [(2, 1, 8), (2, 2, 8), (3, 2, 4), (2, 1, 16), (2, 4, 8), (1, 3, 12)])
@pytest.mark.parametrize(("D", "N"), [(160, 96), (97, 131)])  # 97, 131: tails of the 32-value dots, 64-column blocks
def test_tiled_path_equals_the_reference_and_the_page_path(T, k, ppl, r_page, D, N):
    """Tiled on AVX512-BF16 (four tokens and four rank rows at a time; a pick's pages as one unit up to 32 ranks,
    else page by page, as (1, 3, 12) is), the result is the reference's and the page-by-page path's up to one
    rounding of the output; base tokens and the other columns stay bit-identical."""
    x, A, B, pages, coef, start, expected = picks_case(T, k, ppl, r_page, D, N, seed=T + 10 * ppl + r_page + D)
    was = cpu_kernels.set_amx(False), cpu_kernels.set_tiled(False)
    try:
        by_page = start.clone()
        cpu_kernels.pool_lora_add(by_page[:, N:], x, A, B, pages, coef, ppl)
        cpu_kernels.set_tiled(True)
        tiled = start.clone()
        cpu_kernels.pool_lora_add(tiled[:, N:], x, A, B, pages, coef, ppl)
    finally:
        cpu_kernels.set_amx(was[0]), cpu_kernels.set_tiled(was[1])
    base = (pages < 0).all(dim=1)
    assert torch.equal(tiled[:, :N], start[:, :N]) and torch.equal(tiled[base], start[base])
    assert not torch.equal(tiled[~base], start[~base])
    slack = h_rounding_slack(x, A, B, pages, coef)
    assert_close_up_to_h_rounding(tiled[:, N:], expected, slack, rtol=RTOL[torch.bfloat16], atol=1e-5)
    assert_close_up_to_h_rounding(tiled[:, N:], by_page[:, N:], slack, rtol=RTOL[torch.bfloat16], atol=1e-5)
    assert (tiled == by_page).float().mean() > 0.99  # all but the rare value at a rounding boundary


@needs_tiled
def test_tiled_path_rounds_nan_and_overflow_as_the_page_path():
    """The tiled path rounds its float32 sums into bf16 with its own vector code: a NaN in out stays NaN, a sum past
    bf16's range becomes inf, as in the page-by-page path (float_to_bf16)."""
    gate_up, x, A, B, pages, coef = pool_case(64, 2, 8, torch.bfloat16, seed=9)
    gate_up[1, 80:90] = float("nan")
    gate_up[4, 80:90] = 3.3e38  # + the delta may round past bf16's largest finite value
    was = cpu_kernels.set_amx(False), cpu_kernels.set_tiled(False)
    try:
        by_page = gate_up.clone()
        cpu_kernels.pool_lora_add(by_page[:, 80:], x, A, B, pages, coef)
        cpu_kernels.set_tiled(True)
        tiled = gate_up.clone()
        cpu_kernels.pool_lora_add(tiled[:, 80:], x, A, B, pages, coef)
    finally:
        cpu_kernels.set_amx(was[0]), cpu_kernels.set_tiled(was[1])
    assert tiled[1, 80:90].isnan().all()
    slack = h_rounding_slack(x, A, B, pages, coef)
    assert_close_up_to_h_rounding(tiled[:, 80:], by_page[:, 80:], slack, rtol=RTOL[torch.bfloat16], atol=1e-5,
                                  equal_nan=True)  # fmt: skip
    assert torch.equal(tiled[:, :80], by_page[:, :80])


@needs_amx
def test_amx_path_with_pages_that_are_not_one_pick_per_run():
    """A pages_per_pick hint the pages do not follow (random pages, one id in several runs with other partners)
    falls back to page by page: still the reference's result."""
    gate_up, x, A, B, pages, coef = pool_case(300, 4, 8, torch.bfloat16, seed=21)
    expected = delta.lora_add_reference(gate_up[:, 80:].clone(), x, A, B, pages, coef)
    cpu_kernels.pool_lora_add(gate_up[:, 80:], x, A, B, pages, coef, 2)
    slack = h_rounding_slack(x, A, B, pages, coef)
    assert_close_up_to_h_rounding(gate_up[:, 80:], expected, slack, rtol=RTOL[torch.bfloat16], atol=1e-5)


@needs_amx
def test_amx_path_leaves_the_matrix_units_as_it_found_them():
    """The kernel saves the thread's tile configuration and restores it: oneDNN's bf16 GEMMs (on the same units)
    give the same bits before and after it."""
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(64, 256, generator=g).bfloat16(), torch.randn(512, 256, generator=g).bfloat16()
    before = torch.nn.functional.linear(a, w)
    gate_up, x, A, B, pages, coef = pool_case(200, 2, 8, torch.bfloat16, seed=3)
    cpu_kernels.pool_lora_add(gate_up[:, 80:], x, A, B, pages, coef)
    assert torch.equal(torch.nn.functional.linear(a, w), before)


def test_pages_per_pick_must_divide_k():
    gate_up, x, A, B, pages, coef = pool_case(40, 3, 8, torch.bfloat16, seed=1)
    for bad in (0, 2):
        with pytest.raises(RuntimeError, match=rf"pages_per_pick={bad} must be at least 1 and divide .* K=3"):
            cpu_kernels.pool_lora_add(gate_up[:, 80:], x, A, B, pages, coef, bad)


# --- pool_route: one layer's per-token routing over the slots' routers and page tables


def route_case(T: int, S: int, n_max: int, ppl: int, dtype: torch.dtype, seed: int = 0):
    """Slots with different n (bias -inf past it), k (0 for the base row S-1), weighting; random tables."""
    g = torch.Generator().manual_seed(seed)
    D = 72
    x = torch.randn(T, D, generator=g).to(dtype)
    routers = torch.randn(S, n_max, D, generator=g)
    bias = torch.zeros(S, n_max)
    k = torch.zeros(S, dtype=torch.int64)
    softmax = torch.zeros(S, dtype=torch.bool)
    for s in range(S - 1):
        n = 1 + (s * 5 + 2) % n_max
        bias[s, n:] = float("-inf")
        routers[s, n:] = 0.0
        k[s] = 1 + s % min(n, 3)
        softmax[s] = s % 2 == 1
    routers[S - 1] = 0.0
    routers[0, :] = routers[0, 0]  # slot 0 (n=3, k=1): equal logits, the lowest indices must win in both
    bias[0, 3:] = float("-inf")
    tables = torch.randint(-1, 50, (S, 3, n_max, ppl), generator=g)
    slots = torch.randint(0, S, (T,), generator=g)
    return x, routers, bias, k, softmax, slots, tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3, 40, 200])  # T <= S and T > S take the reference's two logit paths
@pytest.mark.parametrize("ppl", [1, 2])
def test_pool_route_equals_reference(dtype: torch.dtype, T: int, ppl: int) -> None:
    case = route_case(T, S=5, n_max=6, ppl=ppl, dtype=dtype, seed=T)
    k_max = 3
    pages, coef, ids = cpu_kernels.pool_route(*case, k_max)
    ref_pages, ref_coef, ref_ids = delta.route_reference(*case, k_max)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(pages, ref_pages)
    torch.testing.assert_close(coef, ref_coef, rtol=1e-5, atol=1e-6)  # logits summed in another order
    slots, k = case[5], case[3]
    assert (ids[slots == 4] == -1).all() and (pages[slots == 4] == -1).all()  # the base row: no pick, no page
    assert ((ids >= 0).sum(dim=1) == k[slots]).all()  # exactly k picks per token
    tied = slots == 0  # slot 0's LoRAs all have the same router row: equal logits, the lowest indices win
    assert torch.equal(ids[tied], torch.tensor([[0, -1, -1]]).expand(int(tied.sum()), 3))


def test_pool_route_rejects_an_out_of_range_slot() -> None:
    x, routers, bias, k, softmax, slots, tables = route_case(4, S=3, n_max=4, ppl=1, dtype=torch.float32)
    slots[2] = 3
    with pytest.raises(RuntimeError, match="slot 3 of token 2 is outside"):
        cpu_kernels.pool_route(x, routers, bias, k, softmax, slots, tables, 2)


@pytest.mark.parametrize("path", ["by_page", "tiled", "amx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skewed_routing_splits_evenly_and_gives_every_thread_count_the_same_bits(path, dtype):
    """Top-k routing sends most of a prefill's tokens to a few LoRAs: here 90% of the tokens pick LoRA 0, so the
    shrink's work is one large group that the threads share, cut mid-group at a point that is not a multiple of the
    four-token tiles (3 threads). Each entry's sums do not depend on where the cut falls: 1, 2 and 3 threads give the
    same bits, and the reference's result up to one rounding."""
    if path != "by_page" and dtype != torch.bfloat16:
        pytest.skip("the tiled and AMX paths take bf16 calls only")
    if path == "tiled" and not cpu_kernels.tiled_available() or path == "amx" and not cpu_kernels.amx_available():
        pytest.skip(f"this CPU has no {path} path")
    T, k, ppl, r_page, D, N, loras = 1101, 2, 2, 8, 160, 96, 12
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, D, generator=g).to(dtype)
    A = (torch.randn(loras * ppl, r_page, D, generator=g) * 0.2).to(dtype)
    B = (torch.randn(loras * ppl, r_page, N, generator=g) * 0.2).to(dtype)
    ids = torch.stack([torch.randperm(loras, generator=g)[:k] for _ in range(T)])
    popular = torch.rand(T, generator=g) < 0.9
    ids[popular, 0] = 0
    ids[popular, 1] = torch.where(ids[popular, 1] == 0, 1, ids[popular, 1])
    pages = (ids[:, :, None] * ppl + torch.arange(ppl)).reshape(T, k * ppl)
    coef = (torch.rand(T, k, generator=g) + 0.5).repeat_interleave(ppl, dim=1)
    start = torch.randn(T, N, generator=g).to(dtype)
    expected = delta.lora_add_reference(start.clone(), x, A, B, pages, coef)
    was = cpu_kernels.set_amx(path == "amx"), cpu_kernels.set_tiled(path == "tiled")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = start.clone()
            cpu_kernels.pool_lora_add(out, x, A, B, pages, coef, ppl)
            results.append(out)
    finally:
        torch.set_num_threads(threads)
        cpu_kernels.set_amx(was[0]), cpu_kernels.set_tiled(was[1])
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    slack = h_rounding_slack(x, A, B, pages, coef)
    assert_close_up_to_h_rounding(results[0], expected, slack, rtol=RTOL[dtype], atol=1e-5)


@pytest.mark.parametrize("path", ["by_page", "tiled", "amx"])
def test_a_bf16_call_rounds_h_to_bf16_before_the_expand(path):
    """The contract rounds `coef * (A x)` to bf16 in a bf16 call (as PEFT and vLLM's LoRA kernels do). Into a zero
    output, where the output's one rounding shows the delta's low bits, the kernel's result is bit for bit the
    reference's nearly everywhere, and visibly not that of float32 h: a path that skipped the rounding would fail."""
    if path == "tiled" and not cpu_kernels.tiled_available() or path == "amx" and not cpu_kernels.amx_available():
        pytest.skip(f"this CPU has no {path} path")
    T, k, ppl, r_page, D, N = 300, 2, 2, 8, 160, 96
    x, A, B, pages, coef, _, _ = picks_case(T, k, ppl, r_page, D, N, seed=77)
    out = torch.zeros(T, N, dtype=torch.bfloat16)
    was = cpu_kernels.set_amx(path == "amx"), cpu_kernels.set_tiled(path == "tiled")
    try:
        cpu_kernels.pool_lora_add(out, x, A, B, pages, coef, ppl)
    finally:
        cpu_kernels.set_amx(was[0]), cpu_kernels.set_tiled(was[1])
    rounded = delta.lora_add_reference(torch.zeros_like(out), x, A, B, pages, coef)
    unrounded = torch.zeros(T, N)  # the same sums with float32 h
    for q in range(pages.shape[1]):
        p, used = pages[:, q].clamp(min=0), pages[:, q] >= 0
        h = torch.bmm(A[p].float(), x.float()[:, :, None])[:, :, 0] * coef[:, q : q + 1] * used[:, None]
        unrounded += torch.bmm(h[:, None, :], B[p].float())[:, 0]
    unrounded = unrounded.bfloat16()
    changed = (pages >= 0).any(dim=1)
    assert (out[changed] == rounded[changed]).float().mean() > 0.99
    assert (out[changed] == unrounded[changed]).float().mean() < 0.9
