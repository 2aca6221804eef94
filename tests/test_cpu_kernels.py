"""The fused CPU kernels equal the routing and bank math they replace (remix_serve/routing.py, bank.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from remix_serve import routing
from remix_serve.vllm_plugin import bank, cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ toolchain to build the CPU kernels")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


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
