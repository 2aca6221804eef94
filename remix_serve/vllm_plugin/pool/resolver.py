"""`--adapter-dir`: a vLLM LoRAResolver that finds a ReMix checkpoint by its folder name on its first request.

vLLM asks the registered resolvers for a `model` it does not know (`OpenAIServingModels.resolve_lora`, only with
`VLLM_ALLOW_RUNTIME_LORA_UPDATING`, which remix-serve's pool mode sets), then loads what they return into the
engine; the worker validates the checkpoint and checks it against the pool (`vllm_hooks`, `admission`), so a
checkpoint that does not validate gets vLLM's 400 "found but could not be loaded" and the reason in the log.
remix-serve's VLLM_PLUGINS allow-list keeps vLLM's own resolvers (PEFT folders, the Hub) out.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from remix_serve.checkpoint import CONFIG_FILE
from remix_serve.vllm_plugin.spec import POOL_ENV

logger = logging.getLogger(__name__)

RESOLVER_NAME = "remix_adapter_dir"


def checkpoint_in(dirs: list[str], name: str) -> Path | None:
    """`DIR/name` of the first `dirs` where it holds remix_config.json; None for names that are not one folder."""
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\\" in name or "\0" in name:
        return None
    for folder in dirs:
        candidate = Path(folder) / name
        if (candidate / CONFIG_FILE).is_file():
            return candidate.resolve()
    return None


class RemixDirResolver(LoRAResolver):
    def __init__(self, dirs: list[str]):
        self.dirs = dirs

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        path = checkpoint_in(self.dirs, lora_name)
        if path is None:
            return None
        logger.info("remix-serve: resolved %r to %s (--adapter-dir)", lora_name, path)
        # vLLM replaces the id with its own counter's next value
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))


def register_from_env() -> bool:
    """Register the resolver when remix-serve's pool mode passed `--adapter-dir`s; idempotent."""
    value = os.environ.get(POOL_ENV)
    dirs = json.loads(value).get("adapter_dirs") if value else None
    if not dirs or RESOLVER_NAME in LoRAResolverRegistry.get_supported_resolvers():
        return False
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, RemixDirResolver(dirs))
    return True
