"""The vLLM general plugin: registers the ReMix model classes (in every vLLM process, lazily, idempotently)."""

from __future__ import annotations

# Base architecture (as in a model's config.json) -> the ReMix architecture that extends it.
BASE_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "RemixLlamaForCausalLM",
    "MistralForCausalLM": "RemixMistralForCausalLM",
    "Qwen2ForCausalLM": "RemixQwen2ForCausalLM",
}
# Base architecture -> the multi-checkpoint (pool) architecture that extends it.
POOL_ARCHITECTURES: dict[str, str] = {base: f"RemixPool{base}" for base in BASE_ARCHITECTURES}
# ReMix architecture -> "module:Class", imported lazily by vLLM.
ARCHITECTURES: dict[str, str] = {
    **{arch: f"remix_serve.vllm_plugin.model:{arch}" for arch in BASE_ARCHITECTURES.values()},
    **{arch: f"remix_serve.vllm_plugin.pool.model:{arch}" for arch in POOL_ARCHITECTURES.values()},
}
WORKER_EXTENSION = "remix_serve.vllm_plugin.worker.RemixWorkerExtension"
# The one module vLLM's LoRA machinery wraps in a multi-checkpoint model (pool/vllm_hooks.py): --lora-target-modules
from remix_serve.vllm_plugin.spec import ANCHOR  # noqa: E402  (re-exported)

# LoRA adapters kept in each worker's host cache (vLLM's --max-cpu-loras): above any realistic number of names, so
# that a checkpoint is never read from disk again inside an engine step (it stays on host, validated, once loaded).
MAX_CPU_LORAS = 4096


def register() -> None:
    """Entry point of `vllm.general_plugins`; safe to call more than once per process.

    Also installs the ReMix adapter loader (`pool/vllm_hooks.py`), so that a LoRA adapter path holding a ReMix
    checkpoint loads as one in every worker; other adapters keep vLLM's own loader.
    """
    from vllm import ModelRegistry

    from remix_serve.vllm_plugin.pool import resolver, vllm_hooks

    supported = ModelRegistry.get_supported_archs()
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
    vllm_hooks.install()
    resolver.register_from_env()  # remix-serve --adapter-dir: checkpoints found by folder name on first request


def remix_architecture(base_architectures: list[str], pool: bool = False) -> str:
    """The ReMix (or, with `pool`, multi-checkpoint) architecture for a base model's `architectures` list;
    ValueError names the supported ones."""
    for arch in base_architectures:
        if arch in BASE_ARCHITECTURES:
            return POOL_ARCHITECTURES[arch] if pool else BASE_ARCHITECTURES[arch]
    raise ValueError(
        f"base architectures {base_architectures} are not supported by remix-serve; supported: "
        f"{sorted(BASE_ARCHITECTURES)}"
    )


def hf_overrides(checkpoint: str, base_architectures: list[str], bank_path: str | None = None) -> dict:
    """The `hf_overrides` that make vLLM serve a base model with a ReMix checkpoint (spec.RemixOverrides);
    `bank_path` (auto, fused, gather) says how its bank is applied (default auto)."""
    from remix_serve.vllm_plugin.spec import RemixOverrides

    remix = RemixOverrides(checkpoint=checkpoint, bank_path=bank_path).model_dump(exclude_none=True)
    return {"architectures": [remix_architecture(base_architectures)], "remix": remix}


def pool_engine_kwargs(settings: dict, base_architectures: list[str], max_loras: int) -> dict:
    """vLLM engine arguments (LLM / AsyncEngineArgs keywords) of a multi-checkpoint server: the pool architecture
    and sizes, and vLLM's LoRA machinery reduced to carrying each request's checkpoint (one 1x1 anchor wrapped)."""
    return {
        "hf_overrides": pool_hf_overrides(settings, base_architectures),
        "enable_lora": True,
        "max_loras": max_loras,
        "max_lora_rank": 1,
        "max_cpu_loras": max(MAX_CPU_LORAS, max_loras),
        "lora_target_modules": [ANCHOR],
        "worker_extension_cls": WORKER_EXTENSION,
    }


def pool_hf_overrides(settings: dict, base_architectures: list[str]) -> dict:
    """The `hf_overrides` of a multi-checkpoint server: the base's pool architecture and the pool's sizes
    (spec.PoolSettings fields); its checkpoints come as LoRA adapters (`--enable-lora`, see pool/model.py)."""
    from remix_serve.vllm_plugin.spec import RemixOverrides

    remix = RemixOverrides(pool=settings).model_dump(exclude_none=True)
    return {"architectures": [remix_architecture(base_architectures, pool=True)], "remix": remix}
