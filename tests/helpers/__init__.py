"""Helpers shared by every test folder (fixtures live in tests/conftest.py).

`ROOT` is the repository root, for tests that read files of the checkout (examples/, docker/, bench/, ...);
`load_script` imports one of its scripts (bench/, examples/), which are not in a package.
Modules: `server` (a real remix-serve subprocess), `dashboard` (the Grafana dashboard's PromQL and metric names),
`train_task` (a tiny synthetic training task), `variants` (the table of checkpoint variants),
`triton_interpret` and `vllm_compile_on_cpu` (run by tests as `python -m tests.helpers.<name>`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_script(relative: str) -> ModuleType:
    """Import `ROOT / relative` (a .py script outside any package) as a module named after its file."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
