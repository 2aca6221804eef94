"""Shared fixtures: tiny random Llama bases and ReMix checkpoints, written once per session, for every test folder.

Helpers (ROOT, the remix-serve subprocess, the checkpoint variant table) live in tests/helpers/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from remix_serve import tiny
from tests.helpers.variants import DEFAULT


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 128, head_dim 64, vocab 320) with a byte-level tokenizer."""
    return tiny.build_tiny_base(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random ReMix checkpoint on `tiny_base`, the table's `default` variant: n=4, k=2, r=4, all three
    projections, both layers."""
    return DEFAULT.build(tmp_path_factory.mktemp("ckpt") / "remix-tiny", tiny_base, seed=1)
