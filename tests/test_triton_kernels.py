"""The Triton test harness (tests/triton_interpret.py) really interprets, and fails loudly when it cannot.

float32 and float16 only: the interpreter's bfloat16 `tl.dot` is wrong, so a bf16 case would test the interpreter.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from tests import triton_interpret

pytestmark = pytest.mark.triton


# ---- run in the interpreted subprocess (tests/triton_interpret.py imports this module after its shim) ----


@triton.jit
def _add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


def add_case(n: int) -> dict:
    """A trivial kernel on CPU tensors: its error and the class that ran it."""
    x = torch.arange(n, dtype=torch.float32)
    y = torch.full((n,), 0.5)
    out = torch.full((n,), float("nan"))
    _add_kernel[(triton.cdiv(n, 16),)](x, y, out, n, BLOCK=16)
    return {"max_err": (out - (x + y)).abs().max().item(), "kernel": type(_add_kernel).__name__}


# ---- the tests (pytest process; no vLLM import here) ----


def test_harness_interprets_a_trivial_kernel_on_cpu_tensors():
    result = triton_interpret.run("tests.test_triton_kernels:add_case", n=37)
    assert result == {"max_err": 0.0, "kernel": "InterpretedFunction"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU driver Triton compiles instead of failing")
def test_harness_without_triton_interpret_reports_the_driver_error():
    with pytest.raises(triton_interpret.InterpretedRunError, match="0 active drivers"):
        triton_interpret.run("tests.test_triton_kernels:add_case", interpret=False, n=37)
