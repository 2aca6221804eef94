"""What `hf_overrides["remix"]` carries from remix-serve (or a plain vLLM command line) to the plugin: one typed spec.

The model reads it in the worker (`RemixOverrides.from_hf_config`), the endpoint plugin in the API process
(`RemixOverrides.from_server_args`), and `hf_overrides()` writes it; remix-serve's `--adapter` help is the field's
description. A multi-checkpoint pool (issue 14) adds its settings here.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class RemixOverrides(BaseModel):
    """The `remix` entry of vLLM's `hf_overrides` for a ReMix model class."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str = Field(
        min_length=1,
        description="ReMix checkpoint folder (remix_config.json + adapter.safetensors); an absolute path in "
        "hf_overrides, since the engine's working directory may differ",
    )

    @classmethod
    def parse(cls, value: Any, where: str) -> RemixOverrides:
        """Validate `value`; ValueError naming `where`, every problem and the value otherwise."""
        try:
            return cls.model_validate(value)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'remix'}: {err['msg']}" for err in e.errors())
            raise ValueError(
                f"{where} must be {{'checkpoint': '<folder>'}} (hf_overrides={{'remix': {{...}}}}): {problems}; "
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
