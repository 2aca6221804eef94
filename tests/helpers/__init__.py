"""Helpers shared by every test folder (fixtures live in tests/conftest.py).

`ROOT` is the repository root, for tests that read files of the checkout (examples/, docker/, bench/, ...).
Modules: `server` (a real remix-serve subprocess), `dashboard` (the Grafana dashboard's PromQL and metric names),
`train_task` (a tiny synthetic training task), `variants` (the table of checkpoint variants),
`triton_interpret` and `vllm_compile_on_cpu` (run by tests as `python -m tests.helpers.<name>`).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
