"""The one table of checkpoint variants (PEFT's `TEST_CASES` idea): every test that needs a checkpoint of a given
shape takes it from here, by name, so a variant is defined once and a new path is checked against all of them.

Who draws from it:
- tests/reference/test_reference.py checks the method's formula by hand on EVERY variant (cheap: HF model, no
  engine), so a new row here is checked against the formula at once; its softmax and layer-subset tests take
  `softmax` and `up-layer1`.
- tests/conftest.py builds the session's `tiny_ckpt` from `default`: every engine, server and compiled test that
  uses `tiny_ckpt` (the server parity test included) runs the default variant.
- tests/plugin/test_plugin.py runs `ENGINE_VARIANTS` there (one engine start each, about 25 s on 2 cores, so only
  the variants that add an engine-level path, not the whole table).
- tests/plugin/test_cpu_kernels.py takes its bank shapes (n, k, r) from `n8-k2-r8`, `n4-k3-r3` and `n2-k1-r5`.
- tests/plugin/test_pool_vllm_hooks.py builds its pool of three checkpoints from `default`, `n6-k3-r2` and
  `n2-k1-r8-gate`.

To test a new path against every variant, parametrize it with `ALL` (pytest ids are the names).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from remix_serve import tiny

ALL_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Variant:
    """A ReMix checkpoint shape on the tiny base (2 layers, hidden 128, intermediate 256)."""

    name: str
    num_loras: int = 4  # n
    top_k: int = 2  # k
    rank: int = 4  # r
    layers: tuple[int, ...] | None = None  # None: every layer
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    weighting: str = "constant"
    dtype: str = "float32"
    used_by: str = field(default="", compare=False)

    def config_kwargs(self) -> dict:
        """The keyword arguments of `tiny.tiny_config` / `tiny.build_tiny_checkpoint` for this variant."""
        return {
            "num_loras": self.num_loras,
            "top_k": self.top_k,
            "rank": self.rank,
            "layers": None if self.layers is None else list(self.layers),
            "target_modules": self.target_modules,
            "weighting": self.weighting,
            "dtype": self.dtype,
        }

    def build(self, folder: str | os.PathLike, base: str | os.PathLike, seed: int = 0) -> Path:
        """Write a random checkpoint of this variant on the tiny base at `base`."""
        return tiny.build_tiny_checkpoint(folder, base, seed=seed, **self.config_kwargs())

    def adapted_layers(self, num_layers: int = 2) -> list[int]:
        return list(range(num_layers)) if self.layers is None else list(self.layers)


# fmt: off
VARIANTS: tuple[Variant, ...] = (
    #        name                        n  k  r  layers  target_modules                       weighting  dtype
    Variant("default",                  4, 2, 4, None,   ALL_PROJECTIONS,                     "constant", "float32",
            used_by="tiny_ckpt (every engine and server test), pool checkpoint a"),
    Variant("softmax",                  4, 2, 4, None,   ALL_PROJECTIONS,                     "softmax",  "float32",
            used_by="reference softmax weights"),
    Variant("up-layer1",                4, 2, 4, (1,),   ("up_proj",),                        "constant", "float32",
            used_by="reference layer and projection subset"),
    Variant("softmax-up-down-layer1",   4, 2, 4, (1,),   ("up_proj", "down_proj"),            "softmax",  "float32",
            used_by="engine: the eager PyTorch path"),
    Variant("gate-down-layer0",         4, 2, 4, (0,),   ("gate_proj", "down_proj"),          "constant", "float32",
            used_by="engine: Mistral and Qwen2 bases"),
    Variant("softmax-n6-k3",            6, 3, 4, (1,),   ("up_proj", "down_proj"),            "softmax",  "float32",
            used_by="engine: the compiled PyTorch path"),
    Variant("n6-k3-r2",                 6, 3, 2, (1,),   ("up_proj", "down_proj"),            "constant", "float32",
            used_by="pool checkpoint b"),
    Variant("n2-k1-r8-gate",            2, 1, 8, None,   ("gate_proj",),                      "constant", "float32",
            used_by="pool checkpoint c"),
    Variant("n8-k2-r8",                 8, 2, 8, None,   ALL_PROJECTIONS,                     "constant", "float32",
            used_by="CPU kernel bank shape"),
    Variant("n4-k3-r3",                 4, 3, 3, None,   ALL_PROJECTIONS,                     "constant", "float32",
            used_by="CPU kernel bank shape"),
    Variant("n2-k1-r5",                 2, 1, 5, None,   ALL_PROJECTIONS,                     "constant", "float32",
            used_by="CPU kernel bank shape"),
    Variant("bf16",                     4, 2, 4, None,   ALL_PROJECTIONS,                     "constant", "bfloat16",
            used_by="a bfloat16 adapter file"),
)
# fmt: on

BY_NAME: dict[str, Variant] = {v.name: v for v in VARIANTS}
assert len(BY_NAME) == len(VARIANTS), "variant names must be unique"

DEFAULT = BY_NAME["default"]


def variant(name: str) -> Variant:
    return BY_NAME[name]


def params(*names: str) -> list:
    """`pytest.param`s of the named variants (every variant without names), with the names as test ids."""
    chosen = [BY_NAME[n] for n in names] if names else list(VARIANTS)
    return [pytest.param(v, id=v.name) for v in chosen]


ALL = params()
