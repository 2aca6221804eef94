"""Fused CPU kernels for the decode path (csrc/remix_cpu.cpp), built once with torch's C++ extension loader.

On a small CPU each extra PyTorch op between two GEMMs costs 10-20 us, far more than its arithmetic: routing
(float32 logits, stable top-k, mask) is seven ops and appending the masked shrink output to a GEMM input is two.
`route` and `masked_concat` do each in one op, with the same results as `routing` and `bank.masked_concat`
(tests/test_cpu_kernels.py). The build (about 25 s, needs a C++ compiler and ninja) is cached under
`TORCH_EXTENSIONS_DIR` (default ~/.cache/torch_extensions); `scripts/install.sh` and the CPU image run it at
install time, and a build folder this process cannot write (a read-only image) is loaded as it is. Where it cannot
build, `available()` is False and the plugin uses the PyTorch ops. `REMIX_CPU_KERNELS=0` turns them off.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "remix_cpu.cpp"


@cache
def available() -> bool:
    """Build (or load the cached build of) the kernels; False, with a warning, where that fails or is turned off."""
    if os.environ.get("REMIX_CPU_KERNELS", "1") == "0":
        return False
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        build = Path(_get_build_directory("remix_cpu", verbose=False))
        prebuilt = build / "remix_cpu.so"
        if prebuilt.exists() and not os.access(build, os.W_OK):  # a read-only prebuilt copy (the CPU image)
            torch.ops.load_library(str(prebuilt))
        else:
            load(name="remix_cpu", sources=[str(SOURCE)], extra_cflags=["-O3"], is_python_module=False)
    except Exception as e:  # no compiler, no ninja, read-only cache: serve with the PyTorch ops instead
        log.warning("remix-serve: fused CPU kernels unavailable, using PyTorch ops (%s: %s)", type(e).__name__, e)
        return False
    return True


def route(x: torch.Tensor, router: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[T, n]` selection mask in x's dtype and `[T, k]` ids: routing.topk_ids + selection_mask of the logits."""
    mask, ids = torch.ops.remix_cpu.route(x, router, k)
    return mask, ids


def masked_concat(x: torch.Tensor, h: torch.Tensor, weights: torch.Tensor, rank: int) -> torch.Tensor:
    """`[x | h * weights]`, as `bank.masked_concat`; h may be a column slice (rows contiguous)."""
    return torch.ops.remix_cpu.masked_concat(x, h, weights, rank)
