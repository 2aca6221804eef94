"""The vLLM general plugin: registers the ReMix model classes (in every vLLM process, lazily, idempotently)."""

from __future__ import annotations

# Base architecture (as in a model's config.json) -> the ReMix architecture that extends it.
BASE_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "RemixLlamaForCausalLM",
    "MistralForCausalLM": "RemixMistralForCausalLM",
    "Qwen2ForCausalLM": "RemixQwen2ForCausalLM",
}
# ReMix architecture -> "module:Class", imported lazily by vLLM.
ARCHITECTURES: dict[str, str] = {arch: f"remix_serve.vllm_plugin.model:{arch}" for arch in BASE_ARCHITECTURES.values()}
WORKER_EXTENSION = "remix_serve.vllm_plugin.worker.RemixWorkerExtension"


def register() -> None:
    """Entry point of `vllm.general_plugins`; safe to call more than once per process."""
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)


def remix_architecture(base_architectures: list[str]) -> str:
    """The ReMix architecture for a base model's `architectures` list; ValueError names the supported ones."""
    for arch in base_architectures:
        if arch in BASE_ARCHITECTURES:
            return BASE_ARCHITECTURES[arch]
    raise ValueError(
        f"base architectures {base_architectures} are not supported by remix-serve; supported: "
        f"{sorted(BASE_ARCHITECTURES)}"
    )


def hf_overrides(checkpoint: str, base_architectures: list[str]) -> dict:
    """The `hf_overrides` that make vLLM serve a base model with a ReMix checkpoint (spec.RemixOverrides)."""
    from remix_serve.vllm_plugin.spec import RemixOverrides

    remix = RemixOverrides(checkpoint=checkpoint).model_dump()
    return {"architectures": [remix_architecture(base_architectures)], "remix": remix}
