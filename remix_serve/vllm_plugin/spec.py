"""What `hf_overrides["remix"]` carries from remix-serve (or a plain vLLM command line) to the plugin: one typed spec.

The model reads it in the worker (`RemixOverrides.from_hf_config`), the endpoint plugin in the API process
(`RemixOverrides.from_server_args`), and `hf_overrides()` / `pool_hf_overrides()` write it; remix-serve's
`--adapter` help is the field's description. It holds either one checkpoint (fused into the base weights) or the
settings of a multi-checkpoint pool (`pool/`), whose checkpoints arrive as vLLM LoRA adapters.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# remix-serve's pool mode passes its own settings (server/pool_cli.PoolServerConfig, JSON) to the API process's
# plugins (the endpoint, the --adapter-dir resolver) in this environment variable.
POOL_ENV = "REMIX_POOL_SERVER"
# How a one-checkpoint model applies its bank (model.py, RemixMLP): "fused" appends B to the base weights (a dense
# bank, n*r per token), "gather" keeps the base weights and adds each token's k LoRAs with the pool's kernels;
# "auto" gathers a bank that fused would add more than bank.FUSED_MAX_SHARE of the base's work to, where the CPU
# kernels run; else fused (bank.auto_bank_path, model.resolve_bank_path).
BankPath = Literal["auto", "fused", "gather"]
# The one module vLLM's LoRA machinery wraps in a multi-checkpoint model (pool/vllm_hooks.py): --lora-target-modules.
# Here, not in the package's __init__, so that pool/vllm_hooks.py imports it without an import cycle.
ANCHOR = "remix_anchor"


class PoolSettings(BaseModel):
    """The adapter pool's fixed sizes, chosen at start-up (allocated once, so vLLM's memory profiling counts them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pages: dict[str, int] = Field(description="pages per store: {'gate_up': P1, 'down': P2}")
    r_page: int = Field(ge=1, description="rank rows per page")
    n_max: int = Field(ge=1, description="the largest n (LoRAs per layer) a served checkpoint may have")
    k_max: int = Field(ge=1, description="the largest k (LoRAs selected per token) a served checkpoint may have")
    r_max: int = Field(ge=1, description="the largest rank r a served checkpoint may have")


class RemixOverrides(BaseModel):
    """The `remix` entry of vLLM's `hf_overrides` for a ReMix model class."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str | None = Field(
        default=None,
        min_length=1,
        description="ReMix checkpoint folder (remix_config.json + adapter.safetensors); an absolute path in "
        "hf_overrides, since the engine's working directory may differ",
    )
    pool: PoolSettings | None = Field(default=None, description="multi-checkpoint pool settings (pool/)")
    bank_path: BankPath | None = Field(
        default=None,
        description="how one checkpoint's bank is applied: auto (the default), fused or gather; not with a pool",
    )

    @model_validator(mode="after")
    def _one_mode(self) -> RemixOverrides:
        if (self.checkpoint is None) == (self.pool is None):
            raise ValueError("exactly one of 'checkpoint' and 'pool' must be given")
        if self.pool is not None and self.bank_path is not None:
            raise ValueError(f"bank_path={self.bank_path!r} applies to one checkpoint, not to a pool")
        return self

    @classmethod
    def parse(cls, value: Any, where: str) -> RemixOverrides:
        """Validate `value`; ValueError naming `where`, every problem and the value otherwise."""
        try:
            return cls.model_validate(value)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'remix'}: {err['msg']}" for err in e.errors())
            raise ValueError(
                f"{where} must be {{'checkpoint': '<folder>'}} or {{'pool': {{...}}}} (in hf_overrides' remix): "
                f"{problems}; "
                f"got {value!r}"
            ) from None

    @classmethod
    def from_hf_config(cls, hf_config: object) -> RemixOverrides:
        """The spec a ReMix model class is built with (vLLM sets `hf_config.remix` from `hf_overrides`)."""
        return cls.parse(getattr(hf_config, "remix", None), "hf_config.remix")

    @classmethod
    def from_server_args(cls, hf_overrides: str | dict | None) -> RemixOverrides | None:
        """The spec in a vLLM server's `--hf-overrides` (a JSON string or a dict), or None when it has none."""
        if isinstance(hf_overrides, str):
            hf_overrides = json.loads(hf_overrides)
        if not isinstance(hf_overrides, dict) or "remix" not in hf_overrides:
            return None
        return cls.parse(hf_overrides["remix"], "--hf-overrides' remix")
