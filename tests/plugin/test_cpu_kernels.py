"""The fused CPU kernels equal the routing and bank math they replace (remix_serve/routing.py, bank.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from remix_serve import routing
from remix_serve.vllm_plugin import bank, cpu_kernels
from tests.helpers.variants import variant

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ toolchain to build the CPU kernels")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Bank shapes (n, k, r) from the variant table (tests/helpers/variants.py), each beside the token count T, the input
# width D and the number of banks side by side that the kernel test feeds it (data shapes, not checkpoint fields).
N8_K2_R8, N4_K3_R3, N2_K1_R5 = variant("n8-k2-r8"), variant("n4-k3-r3"), variant("n2-k1-r5")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "D", "n", "k"), [(1, 64, 4, 1), (37, 576, 8, 2), (300, 130, 16, 3)])
def test_route_equals_routing_module(dtype, T, D, n, k):
    g = torch.Generator().manual_seed(T + D)
    x = torch.randn(T, D, generator=g).to(dtype)
    router = torch.randn(n, D, generator=g)
    mask, ids = cpu_kernels.route(x, router, k)
    logits = routing.router_logits(x, router)
    expected = routing.topk_ids(logits, k)
    # Logits are summed in another order than BLAS: a token whose k-th and (k+1)-th logits lie within rounding
    # of each other may pick differently. Such near-ties are excluded here; exact ties are tested below.
    top = logits.sort(dim=-1, descending=True).values
    clear = (
        (top[:, k - 1] - top[:, k]).abs() > 1e-4 * logits.abs().amax(dim=-1)
        if k < n
        else torch.ones(T, dtype=torch.bool)
    )
    assert clear.float().mean() > 0.9
    assert torch.equal(ids[clear], expected[clear])
    assert mask.dtype == dtype
    assert torch.equal(mask, routing.selection_mask(ids, n, dtype))


def test_route_breaks_ties_to_the_lowest_index_like_topk_ids():
    router = torch.zeros(6, 8)
    router[[1, 3, 4]] = 1.0  # LoRAs 1, 3 and 4 always tie for the highest logit
    x = torch.rand(5, 8) + 0.1
    mask, ids = cpu_kernels.route(x, router, 2)
    assert ids.tolist() == [[1, 3]] * 5
    assert torch.equal(ids, routing.topk_ids(routing.router_logits(x, router), 2))


def test_route_reads_strided_rows():
    x = torch.randn(6, 40)[:, 4:36]  # rows 40 apart
    router = torch.randn(5, 32)
    _, ids = cpu_kernels.route(x, router, 2)
    assert torch.equal(ids, cpu_kernels.route(x.contiguous(), router, 2)[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("banks", [1, 2])
def test_masked_concat_equals_bank_module(dtype, banks):
    g = torch.Generator().manual_seed(banks)
    T, D, n, r = 11, 24, 4, 3
    x = torch.randn(T, D, generator=g).to(dtype)
    h = torch.randn(T, banks * n * r + 5, generator=g).to(dtype)[:, : banks * n * r]  # a column slice
    w = torch.rand(T, n, generator=g).to(dtype)
    assert torch.equal(cpu_kernels.masked_concat(x, h, w, r), bank.masked_concat(x, h, w, r))


def routed_weights(x: torch.Tensor, n: int, k: int, weighting: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection weights `[T, n]` (zero off the selected LoRAs) and ids `[T, k]`, as the plugin's route() gives."""
    router = torch.randn(n, x.shape[1], generator=torch.Generator().manual_seed(seed))
    logits = routing.router_logits(x, router)
    ids = routing.topk_ids(logits, k)
    return routing.selection_weights(logits, ids, weighting, dtype=x.dtype), ids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighting", ["constant", "softmax"])
@pytest.mark.parametrize(
    ("T", "D", "case", "banks"),
    [(32, 576, N8_K2_R8, 2), (5, 130, N4_K3_R3, 1), (1, 40, N2_K1_R5, 3)],
    ids=["T32-D576-n8-k2-r8-banks2", "T5-D130-n4-k3-r3-banks1", "T1-D40-n2-k1-r5-banks3"],
)
def test_shrink_concat_equals_dense_shrink_then_masked_concat(dtype, weighting, T, D, case, banks):
    n, k, r = case.num_loras, case.top_k, case.rank
    g = torch.Generator().manual_seed(T * D)
    x = torch.randn(T, D, generator=g).to(dtype)
    bank_A = (torch.randn(banks * n * r, D, generator=g) * 0.1).to(dtype)
    w, ids = routed_weights(x, n, k, weighting, seed=D)
    expected = bank.masked_concat(x, x @ bank_A.t(), w, r)  # the dense GEMM, then the mask
    got = cpu_kernels.shrink_concat(x, bank_A, ids, w, r)
    assert got.dtype == dtype and got.shape == (T, D + banks * n * r)
    assert torch.equal(got[:, :D], x)
    # The same float32 sums in another order: equal up to one rounding of the output dtype.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=2**-7 if dtype != torch.float32 else 1e-5)
    # A float32 copy of the bank gives the same result as the bank in x's dtype.
    torch.testing.assert_close(cpu_kernels.shrink_concat(x, bank_A.float(), ids, w, r), got, atol=0, rtol=2**-7)


def test_shrink_concat_is_batch_invariant():
    """A token's output does not depend on the other tokens of its batch (decode batches change every step)."""
    x = torch.randn(24, 96).bfloat16()
    bank_A = (torch.randn(2 * 8 * 4, 96) * 0.1).bfloat16()
    w, ids = routed_weights(x, 8, 2, "constant", seed=0)
    full = cpu_kernels.shrink_concat(x, bank_A, ids, w, 4)
    for t in (0, 7, 23):
        one = cpu_kernels.shrink_concat(x[t : t + 1], bank_A, ids[t : t + 1], w[t : t + 1], 4)
        assert torch.equal(one[0], full[t])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("T", "inter", "case"), [(32, 1536, N8_K2_R8), (3, 37, N4_K3_R3)], ids=["T32-I1536-n8-k2-r8", "T3-I37-n4-k3-r3"]
)
def test_silu_mul_shrink_concat_equals_silu_and_mul_then_shrink_concat(dtype, T, inter, case):
    n, k, r = case.num_loras, case.top_k, case.rank
    g = torch.Generator().manual_seed(T * inter)
    gate_up = (torch.randn(T, 2 * inter, generator=g) * 4).to(dtype)
    gate_up[0, :4] = torch.tensor([-120.0, -30.0, 30.0, 0.0])  # exp(-gate) overflows, underflows; silu(0) = 0
    bank_A = (torch.randn(n * r, inter, generator=g) * 0.1).to(dtype)
    w, ids = routed_weights(torch.randn(T, 16, generator=g).to(dtype), n, k, "constant", seed=inter)
    got = cpu_kernels.silu_mul_shrink_concat(gate_up, bank_A, ids, w, r)
    act = torch.nn.functional.silu(gate_up[:, :inter].float()) * gate_up[:, inter:].float()  # float32, rounded once
    assert got.dtype == dtype and got.shape == (T, inter + n * r)
    # float32 within a few ulps (its own exp); bf16/fp16 at most one ulp apart (a float32 value next to a rounding
    # boundary may round either way)
    ulp = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(got[:, :inter], act.to(dtype), atol=1e-6, rtol=ulp)
    assert torch.isfinite(got).all()
    # The shrink sees the activation as rounded to the output dtype, as it would after vLLM's SiLU-and-mul.
    torch.testing.assert_close(got, cpu_kernels.shrink_concat(got[:, :inter], bank_A, ids, w, r), atol=0, rtol=0)


def test_silu_mul_shrink_concat_is_batch_invariant():
    gate_up = torch.randn(24, 2 * 96).bfloat16()
    bank_A = (torch.randn(8 * 4, 96) * 0.1).bfloat16()
    w, ids = routed_weights(torch.randn(24, 16).bfloat16(), 8, 2, "constant", seed=0)
    full = cpu_kernels.silu_mul_shrink_concat(gate_up, bank_A, ids, w, 4)
    for t in (0, 11, 23):
        one = cpu_kernels.silu_mul_shrink_concat(gate_up[t : t + 1], bank_A, ids[t : t + 1], w[t : t + 1], 4)
        assert torch.equal(one[0], full[t])


def test_bad_input_gets_a_clear_error():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="router must be a contiguous float32"):
        cpu_kernels.route(x, torch.randn(3, 8).half(), 1)
    with pytest.raises(RuntimeError, match="k=4 must be in"):
        cpu_kernels.route(x, torch.randn(3, 8), 4)
    with pytest.raises(RuntimeError, match="router width 9 != x width 8"):
        cpu_kernels.route(x, torch.randn(3, 9), 1)
    with pytest.raises(RuntimeError, match="h must be"):
        cpu_kernels.masked_concat(x, torch.randn(4, 7), torch.randn(4, 3), 2)
    w, ids = torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"A is \[5, 8\], expected \[m\*6, 8\]"):
        cpu_kernels.shrink_concat(x, torch.randn(5, 8), ids, w, 2)
    with pytest.raises(RuntimeError, match="LoRA id 3 out of range for n=3"):
        cpu_kernels.shrink_concat(x, torch.randn(6, 8), ids + 3, w, 2)
    with pytest.raises(RuntimeError, match="ids must be an int64"):
        cpu_kernels.shrink_concat(x, torch.randn(6, 8), ids.int(), w, 2)
    with pytest.raises(RuntimeError, match="silu_and_mul needs an even width, got 7"):
        cpu_kernels.silu_mul_shrink_concat(torch.randn(4, 7), torch.randn(6, 3), ids, w, 2)
    with pytest.raises(RuntimeError, match="route: tensors must be on the CPU, got meta"):
        cpu_kernels.route(x.to("meta"), torch.randn(3, 8), 1)


def test_a_kernel_called_before_the_build_names_what_to_do(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_ext", None)
    with pytest.raises(RuntimeError, match=r"call cpu_kernels.available\(\) first"):
        cpu_kernels.route(torch.randn(2, 4), torch.eye(3, 4), 1)


def test_a_prebuilt_library_in_a_read_only_folder_is_loaded_as_it_is(tmp_path):
    """The CPU image builds the kernels at image build time; at run time its root filesystem is read-only."""
    import shutil
    import subprocess
    import sys

    from torch.utils.cpp_extension import _get_build_directory

    built = Path(_get_build_directory("remix_cpu", verbose=False)) / "remix_cpu.so"
    (tmp_path / "remix_cpu").mkdir()
    shutil.copy(built, tmp_path / "remix_cpu" / "remix_cpu.so")
    script = (
        "import os, torch\n"
        "from remix_serve.vllm_plugin import cpu_kernels\n"
        "os.access = lambda *a, **k: False  # as for a read-only folder (root may write anywhere)\n"
        "assert cpu_kernels.available()\n"
        "print(cpu_kernels.route(torch.ones(2, 4), torch.eye(3, 4), 1)[1].tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)},
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert out.stdout.strip() == "[[0], [0]]"
    assert [p.name for p in (tmp_path / "remix_cpu").iterdir()] == ["remix_cpu.so"]  # nothing was rebuilt


# --- The compiled path: the same kernels as torch.library custom ops (cpu_kernels.route_op, bank_input_op).


@pytest.mark.parametrize("silu_mul", [False, True])
def test_custom_ops_pass_torch_library_opcheck(silu_mul):
    """Schema, fake (meta) implementation and dispatch agree: what torch.compile relies on to trace them."""
    x = torch.randn(5, 48)
    torch.library.opcheck(cpu_kernels.route_op, (x, torch.randn(6, 48), 2))
    for T in (5, cpu_kernels.GATHER_MAX_TOKENS + 3):  # both branches
        inp = torch.randn(T, 2 * 40 if silu_mul else 40)
        w, ids = routed_weights(torch.randn(T, 16), 4, 2, "constant", seed=T)
        torch.library.opcheck(cpu_kernels.bank_input_op, (inp, torch.randn(4 * 3, 40) * 0.1, ids, w, 3, silu_mul))


def test_one_compiled_graph_gives_the_eager_kernels_results_for_every_batch_size():
    """Traced once with a dynamic batch (as vLLM compiles its model): decode-sized batches take the gather kernels,
    larger ones the dense shrink, inside the ops; each equals the eager path the plugin takes at that size."""
    from torch._dynamo.testing import CompileCounterWithBackend

    D, inter, n, k, r = 48, 40, 6, 2, 3
    g = torch.Generator().manual_seed(0)
    router, bank_up, bank_down = torch.randn(n, D, generator=g), torch.randn(n * r, D) * 0.1, torch.randn(n * r, inter)
    w_up = torch.randn(2 * inter, D + n * r, generator=g) * 0.1

    def mlp(x, route, fused_input, down_input):
        weights, ids = route(x, router, k)
        gate_up = fused_input(x, ids, weights) @ w_up.t()
        return down_input(gate_up, ids, weights), ids

    def compiled_mlp(x):
        return mlp(
            x,
            cpu_kernels.route_op,
            lambda x, ids, w: cpu_kernels.bank_input_op(x, bank_up, ids, w, r, False),
            lambda gu, ids, w: cpu_kernels.bank_input_op(gu, bank_down, ids, w, r, True),
        )

    def dense_input(x, bank_A, ids, w):
        return bank.masked_concat(x, x @ bank_A.t(), w, r)

    def silu_mul(gate_up):
        gate, up = gate_up.float().chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)

    counter = CompileCounterWithBackend("inductor")
    fn = torch.compile(compiled_mlp, backend=counter, fullgraph=True, dynamic=True)
    for T in (2, 7, cpu_kernels.GATHER_MAX_TOKENS, cpu_kernels.GATHER_MAX_TOKENS + 1, 150):  # not 1: specialized
        x = torch.randn(T, D, generator=g)
        got, ids = fn(x)
        if T <= cpu_kernels.GATHER_MAX_TOKENS:
            expected, expected_ids = mlp(
                x,
                cpu_kernels.route,
                lambda x, ids, w: cpu_kernels.shrink_concat(x, bank_up, ids, w, r),
                lambda gu, ids, w: cpu_kernels.silu_mul_shrink_concat(gu, bank_down, ids, w, r),
            )
        else:
            expected, expected_ids = mlp(
                x,
                cpu_kernels.route,
                lambda x, ids, w: dense_input(x, bank_up, ids, w),
                lambda gu, ids, w: dense_input(silu_mul(gu), bank_down, ids, w),
            )
        assert torch.equal(ids, expected_ids), T
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1, "recompiled for another batch size"
