"""Checkpoint format remix/v1: the contract between remix-train and remix-serve (docs/checkpoint-format.md).

A folder holding `remix_config.json` (the typed `RemixConfig` below) and `adapter.safetensors`. This module
reads, writes (atomically) and validates it; it never unpickles anything. Validation collects every problem
and raises one `CheckpointError` before any engine starts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from remix_serve import bases, routing
from remix_serve.bases import BaseFingerprint  # re-exported: the checkpoint stores one

FORMAT = "remix/v1"
CONFIG_FILE = "remix_config.json"
ADAPTER_FILE = "adapter.safetensors"
PROJECTIONS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

Projection = Literal["gate_proj", "up_proj", "down_proj"]


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not fit its base. `problems` holds one line per defect."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class RemixConfig(BaseModel):
    """`remix_config.json`: everything needed to rebuild the ReMix banks on top of a base model."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["remix/v1"] = Field(default=FORMAT, description="Format tag; this reader knows remix/v1.")
    base_model: str = Field(
        description="A bundled base name (e.g. 'smollm2-135m') or a path, absolute or relative to the checkpoint."
    )
    base_fingerprint: BaseFingerprint = Field(description="Shape of the base the bank was trained on.")
    num_loras: int = Field(ge=1, description="n: LoRAs per adapted layer.")
    top_k: int = Field(ge=1, description="k: LoRAs selected per token.")
    rank: int = Field(ge=1, description="r: rank of every LoRA.")
    omega: float = Field(description="Resolved constant weight of a selected LoRA (see omega_rule).")
    omega_rule: routing.OmegaRule = Field(description="'lora': alpha/(k r); 'rslora': alpha/sqrt(k r).")
    alpha: float = Field(gt=0, description="LoRA alpha the omega was derived from.")
    target_modules: list[Projection] = Field(min_length=1, description="Adapted MLP projections.")
    layers: list[int] | None = Field(default=None, description="Adapted decoder layers; null means all.")
    weighting: routing.Weighting = Field(
        default="constant", description="'constant' (ReMix) or 'softmax' (MixLoRA-style baseline)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(description="dtype of adapter.safetensors.")
    training: dict[str, Any] = Field(default_factory=dict, description="Free-form provenance.")

    @field_validator("target_modules")
    @classmethod
    def _unique_targets(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"target_modules has duplicates: {v}")
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> RemixConfig:
        problems = []
        if self.top_k > self.num_loras:
            problems.append(f"top_k={self.top_k} is larger than num_loras={self.num_loras}")
        else:
            expected = routing.omega(self.alpha, self.top_k, self.rank, self.omega_rule, self.weighting)
            if not math.isclose(self.omega, expected, rel_tol=1e-6):
                problems.append(
                    f"omega={self.omega} does not match omega_rule={self.omega_rule!r} with alpha={self.alpha},"
                    f" top_k={self.top_k}, rank={self.rank} (expected {expected})"
                )
        if self.layers is not None:
            n_layers = self.base_fingerprint.num_hidden_layers
            bad = [i for i in self.layers if not 0 <= i < n_layers]
            if bad:
                problems.append(f"layers {bad} are outside the base's {n_layers} layers")
            if len(set(self.layers)) != len(self.layers):
                problems.append(f"layers has duplicates: {self.layers}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def adapted_layers(self) -> list[int]:
        """Adapted layer indices, sorted (all layers when `layers` is null)."""
        if self.layers is None:
            return list(range(self.base_fingerprint.num_hidden_layers))
        return sorted(self.layers)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def router_name(layer: int) -> str:
    """Name of layer `layer`'s router tensor in adapter.safetensors."""
    return f"layers.{layer}.router.weight"


def tensor_name(layer: int, proj: str, kind: Literal["lora_A", "lora_B"]) -> str:
    """Name of a LoRA bank tensor in adapter.safetensors, e.g. `layers.3.mlp.up_proj.lora_A`."""
    return f"layers.{layer}.mlp.{proj}.{kind}"


def projection_shape(proj: str, fp: BaseFingerprint) -> tuple[int, int]:
    """(in_features, out_features) of an MLP projection of the base."""
    if proj == "down_proj":
        return fp.intermediate_size, fp.hidden_size
    return fp.hidden_size, fp.intermediate_size


def expected_shapes(config: RemixConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor adapter.safetensors must hold, with its shape."""
    n, r, fp = config.num_loras, config.rank, config.base_fingerprint
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in config.adapted_layers:
        shapes[router_name(layer)] = (n, fp.hidden_size)
        for proj in config.target_modules:
            in_f, out_f = projection_shape(proj, fp)
            shapes[tensor_name(layer, proj, "lora_A")] = (n, r, in_f)
            shapes[tensor_name(layer, proj, "lora_B")] = (n, out_f, r)
    return shapes


@dataclass
class Checkpoint:
    """A validated checkpoint: its folder, config and adapter tensors."""

    path: Path
    config: RemixConfig
    tensors: dict[str, torch.Tensor]


def _format_validation_error(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] not in ("missing", "value_error"):  # pydantic's own messages omit the value; ours name it
            got = repr(e["input"])
            msg += f", got {got if len(got) <= 80 else got[:77] + '...'}"
        lines.append(f"{CONFIG_FILE}: {loc + ': ' if loc else ''}{msg}")
    return lines


def load_config(path: str | os.PathLike) -> RemixConfig:
    """Read and validate `remix_config.json` of the checkpoint folder `path`. Raises CheckpointError."""
    folder = Path(path)
    if not folder.is_dir():
        what = "is a file, not a checkpoint folder" if folder.exists() else "checkpoint folder does not exist"
        raise CheckpointError([f"{folder}: {what}"])
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError([f"{cfg_path}: missing ({CONFIG_FILE} is required in a remix/v1 checkpoint)"])
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError([f"{cfg_path}: not valid JSON ({e})"]) from None
    if not isinstance(raw, dict):
        raise CheckpointError([f"{cfg_path}: expected a JSON object, found {type(raw).__name__}"])
    if raw.get("format") != FORMAT:
        raise CheckpointError(
            [f"{cfg_path}: format is {raw.get('format')!r}; this version of remix-serve reads {FORMAT!r}"]
        )
    try:
        return RemixConfig.model_validate(raw)
    except ValidationError as e:
        raise CheckpointError([f"{folder}/{line}" for line in _format_validation_error(e)]) from None


def check_tensors(config: RemixConfig, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Every problem with the adapter tensors against the config, one line each (empty: all good)."""
    problems = []
    expected = expected_shapes(config)
    for name in sorted(set(expected) - set(tensors)):
        problems.append(f"{ADAPTER_FILE}: {name} is missing (expected shape {list(expected[name])})")
    for name in sorted(set(tensors) - set(expected)):
        problems.append(f"{ADAPTER_FILE}: unexpected tensor {name} (not implied by {CONFIG_FILE})")
    for name in sorted(set(expected) & set(tensors)):
        t = tensors[name]
        if tuple(t.shape) != expected[name]:
            problems.append(
                f"{ADAPTER_FILE}: {name} is {list(t.shape)}; {CONFIG_FILE} (n={config.num_loras},"
                f" rank={config.rank}, base {config.base_fingerprint.hidden_size}/"
                f"{config.base_fingerprint.intermediate_size}) needs {list(expected[name])}"
            )
        if t.dtype != config.torch_dtype:
            problems.append(f"{ADAPTER_FILE}: {name} has dtype {t.dtype}; {CONFIG_FILE} says {config.dtype}")
        elif not torch.isfinite(t).all():
            problems.append(f"{ADAPTER_FILE}: {name} contains NaN or Inf values")
    return problems


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    with safe_open(path, framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
            tensors[name] = f.get_tensor(name)
    return tensors


def load_checkpoint(path: str | os.PathLike, *, check_base: bool = True) -> Checkpoint:
    """Load and fully validate a checkpoint folder.

    Checks the config, every adapter tensor (presence, shape, dtype, finiteness) and, with `check_base`,
    that the base model exists and matches `base_fingerprint`. All problems are reported together in one
    CheckpointError, one per line.
    """
    folder = Path(path)
    config = load_config(folder)
    problems: list[str] = []
    adapter_path = folder / ADAPTER_FILE
    tensors: dict[str, torch.Tensor] = {}
    if not adapter_path.is_file():
        problems.append(f"{adapter_path}: missing ({ADAPTER_FILE} is required in a remix/v1 checkpoint)")
    else:
        try:
            tensors = _read_tensors(adapter_path)
        except (SafetensorError, OSError, ValueError) as e:
            problems.append(f"{adapter_path}: not a readable safetensors file ({e})")
        else:
            problems += [f"{folder}/{p}" for p in check_tensors(config, tensors)]
    if check_base:
        problems += check_base_model(config, folder)
    if problems:
        raise CheckpointError(problems)
    return Checkpoint(path=folder, config=config, tensors=tensors)


def fingerprint_problems(config: RemixConfig, actual: BaseFingerprint, where: str, base: str) -> list[str]:
    """One line per fingerprint field where the checkpoint's base (`config`) and `actual` differ."""
    stored = config.base_fingerprint
    return [
        f"{where}: base_fingerprint.{key} is {getattr(stored, key)}, but {base} has {getattr(actual, key)}"
        " (trained on another base?)"
        for key in BaseFingerprint.model_fields
        if getattr(stored, key) != getattr(actual, key)
    ]


def check_base_model(config: RemixConfig, folder: Path) -> list[str]:
    """Problems with the checkpoint's base model: it must exist and have the stored fingerprint."""
    try:
        actual = bases.base_fingerprint(config.base_model, relative_to=folder)
    except bases.BaseModelError as e:
        return [f"{folder / CONFIG_FILE}: base_model: {e}"]
    return fingerprint_problems(config, actual, str(folder / CONFIG_FILE), f"base {config.base_model!r}")


def save_checkpoint(
    path: str | os.PathLike,
    config: RemixConfig,
    tensors: Mapping[str, torch.Tensor],
    extra_files: Mapping[str, bytes | str] | None = None,
) -> Path:
    """Write a checkpoint folder atomically and return its path.

    The folder is assembled under a temporary name beside `path` and renamed into place, so a half-written
    checkpoint never appears under the final name; an existing checkpoint at `path` is replaced only after
    the new one is complete. Tensors are checked against the config first (CheckpointError on mismatch).

    Args:
        path: destination folder.
        config: the checkpoint's config.
        tensors: adapter tensors, named by `router_name` / `tensor_name`.
        extra_files: optional further files (e.g. a model card `README.md`, `routing.png`).
    """
    dest = Path(path)
    problems = check_tensors(config, tensors)
    if problems:
        raise CheckpointError(problems)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        save_file(contiguous, str(tmp / ADAPTER_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(config.model_dump_json(indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            target = tmp / name
            if isinstance(content, str):
                target.write_text(content)
            else:
                target.write_bytes(content)
        _fsync_tree(tmp)
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename `tmp` to `dest`; an existing `dest` is moved aside first and removed after the swap."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.rmdir(old)
        os.rename(dest, old)
    os.rename(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
