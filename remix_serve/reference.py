"""ReMix on a Hugging Face model: the training model and the correctness oracle for the vLLM plugin.

`apply_remix` wraps the MLP of every adapted decoder layer of a Llama-family transformers model (Llama,
SmolLM2, Qwen2, Mistral: gate/up/down MLP) in a `RemixMLP` that keeps the frozen MLP as `base_mlp` and owns
the router and the LoRA bank. Clarity beats speed here: the bank is an einsum over all n LoRAs, masked by
the selection weights; the routing itself comes from `routing.py`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from remix_serve import routing
from remix_serve.checkpoint import RemixConfig, load_checkpoint, router_name, save_checkpoint, tensor_name

Selection = Literal["topk", "sample"]


class RemixMLP(nn.Module):
    """A frozen gate/up/down MLP plus a router and a bank of n LoRAs on its adapted projections.

    For a token with MLP input x and selected set I, each adapted projection computes
    `y = W z + omega * sum_{i in I} w_i B_i (A_i z)` (w_i = 1 for ReMix, renormalised q_i for softmax).
    """

    def __init__(self, base_mlp: nn.Module, layer: int, config: RemixConfig):
        super().__init__()
        for proj in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            if not hasattr(base_mlp, proj):
                raise ValueError(
                    f"layer {layer}: MLP {type(base_mlp).__name__} has no {proj}; ReMix needs a gate/up/down MLP"
                )
        self.base_mlp = base_mlp
        self.layer = layer
        self.num_loras, self.top_k, self.rank = config.num_loras, config.top_k, config.rank
        self.omega = config.omega  # resolved once at save time; forward only reads it
        self.weighting: routing.Weighting = config.weighting
        self.target_modules = list(config.target_modules)
        dtype = config.torch_dtype
        n, r = self.num_loras, self.rank
        hidden = base_mlp.gate_proj.in_features
        self.router = nn.Parameter(torch.empty(n, hidden, dtype=dtype))
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))  # nn.Linear's default init
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for proj in self.target_modules:
            lin: nn.Linear = getattr(base_mlp, proj)
            a = torch.empty(n, r, lin.in_features, dtype=dtype)
            for i in range(n):  # like PEFT: A as nn.Linear, B zero, so a fresh bank is a no-op
                nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
            self.lora_A[proj] = nn.Parameter(a)
            self.lora_B[proj] = nn.Parameter(torch.zeros(n, lin.out_features, r, dtype=dtype))
        # Routing state, set by `routing_mode`; read by forward.
        self.selection: Selection = "topk"
        self.generator: torch.Generator | None = None
        self.last_log_q: torch.Tensor | None = None  # [..., T] per-token log Q of the last sampled forward
        self.last_weights: torch.Tensor | None = None  # [..., T, n] selection weights of the last forward
        self.recorded: list[torch.Tensor] | None = None  # ids [..., T, k] per forward, when recording

    def _delta(self, proj: str, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """omega * sum_i w_i B_i A_i z, computed over all n LoRAs and masked by `weights` ([..., n])."""
        a, b = self.lora_A[proj], self.lora_B[proj]
        h = torch.einsum("...d,nrd->...nr", z.to(a.dtype), a)  # [..., n, r]
        h = h * weights.to(a.dtype).unsqueeze(-1)
        return torch.einsum("...nr,nor->...o", h, b) * self.omega  # [..., out]

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Select LoRAs for every token of `x` ([..., D]); returns selection weights [..., n]."""
        if self.selection == "sample":
            # The router input is detached: the RLOO term must reach the router P only (docs/method.md, "Training").
            logits = routing.router_logits(x.detach(), self.router)  # [..., n]
            ids = routing.gumbel_topk_ids(logits.detach(), self.top_k, self.generator)  # [..., k]
            self.last_log_q = routing.plackett_luce_log_prob(logits, ids)  # [...]
        else:
            logits = routing.router_logits(x, self.router)
            ids = routing.topk_ids(logits, self.top_k)
            self.last_log_q = None
        if self.recorded is not None:
            self.recorded.append(ids.detach().cpu())
        weights = routing.selection_weights(logits, ids, self.weighting)  # [..., n]
        self.last_weights = weights
        return weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.base_mlp
        weights = self.route(x)
        gate, up = m.gate_proj(x), m.up_proj(x)
        if "gate_proj" in self.lora_A:
            gate = gate + self._delta("gate_proj", x, weights).to(gate.dtype)
        if "up_proj" in self.lora_A:
            up = up + self._delta("up_proj", x, weights).to(up.dtype)
        h = m.act_fn(gate) * up
        out = m.down_proj(h)
        if "down_proj" in self.lora_A:
            out = out + self._delta("down_proj", h, weights).to(out.dtype)
        return out


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a Llama-family CausalLM (`model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        children = ", ".join(name for name, _ in model.named_children())
        raise ValueError(
            f"{type(model).__name__}: expected decoder layers at .model.layers (Llama, Qwen2, Mistral);"
            f" found children: {children}"
        )
    return layers


def apply_remix(model: nn.Module, config: RemixConfig, tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Wrap the MLPs of `config.adapted_layers` in RemixMLPs (in place) and freeze the base.

    With `tensors` (adapter.safetensors contents), the banks and routers are loaded from them; otherwise
    they are freshly initialised (B = 0, so the model still computes the base function).
    """
    layers = decoder_layers(model)
    if config.layers is not None and max(config.layers, default=-1) >= len(layers):
        raise ValueError(f"layers {config.layers} outside the model's {len(layers)} decoder layers")
    for p in model.parameters():  # freeze by structure: everything that exists before the banks
        p.requires_grad_(False)
    for layer in config.adapted_layers:
        layers[layer].mlp = RemixMLP(layers[layer].mlp, layer, config).to(next(layers[layer].mlp.parameters()).device)
    if tensors is not None:
        load_remix_tensors(model, tensors)
    return model


def remix_mlps(model: nn.Module) -> dict[int, RemixMLP]:
    """Adapted layer index -> its RemixMLP."""
    return {m.layer: m for m in model.modules() if isinstance(m, RemixMLP)}


def remix_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's routers and banks under their adapter.safetensors names."""
    out = {}
    for layer, mlp in remix_mlps(model).items():
        out[router_name(layer)] = mlp.router.detach()
        for proj in mlp.target_modules:
            out[tensor_name(layer, proj, "lora_A")] = mlp.lora_A[proj].detach()
            out[tensor_name(layer, proj, "lora_B")] = mlp.lora_B[proj].detach()
    return out


@torch.no_grad()
def load_remix_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors (named as in adapter.safetensors) into the model's RemixMLPs."""
    for layer, mlp in remix_mlps(model).items():
        mlp.router.copy_(tensors[router_name(layer)])
        for proj in mlp.target_modules:
            mlp.lora_A[proj].copy_(tensors[tensor_name(layer, proj, "lora_A")])
            mlp.lora_B[proj].copy_(tensors[tensor_name(layer, proj, "lora_B")])


@contextlib.contextmanager
def routing_mode(model: nn.Module, selection: Selection, generator: torch.Generator | None = None) -> Iterator[None]:
    """Switch every RemixMLP to deterministic top-k ("topk") or Gumbel-top-k sampling ("sample")."""
    mlps = list(remix_mlps(model).values())
    before = [(m.selection, m.generator) for m in mlps]
    for m in mlps:
        m.selection, m.generator = selection, generator
    try:
        yield
    finally:
        for m, (sel, gen) in zip(mlps, before, strict=True):
            m.selection, m.generator = sel, gen


def sequence_log_q(model: nn.Module, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the last sampled forward's log Q over adapted layers and non-padding tokens: `[B]`."""
    per_token = torch.stack([m.last_log_q for m in remix_mlps(model).values()]).sum(0)  # [B, T]
    if attention_mask is not None:
        per_token = per_token * attention_mask.to(per_token.dtype)
    return per_token.sum(-1)


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record the selected LoRA ids of every forward: yields {layer: [ids [..., T, k] per forward]}."""
    mlps = remix_mlps(model)
    for m in mlps.values():
        m.recorded = []
    records = {layer: m.recorded for layer, m in mlps.items()}
    try:
        yield records
    finally:
        for m in mlps.values():
            m.recorded = None


def load_model(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[nn.Module, object]:
    """Load a remix/v1 checkpoint onto its base: returns (model in eval mode, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from remix_serve import bases

    ckpt = load_checkpoint(path)
    base_path = bases.resolve_base(ckpt.config.base_model, relative_to=ckpt.path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device)
    apply_remix(model, ckpt.config, ckpt.tensors)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    return model.eval(), tokenizer


def save_model(model: nn.Module, path: str | os.PathLike, config: RemixConfig, extra_files: dict | None = None) -> None:
    """Write the model's routers and banks as a remix/v1 checkpoint (atomic)."""
    tensors = {name: t.to(config.torch_dtype) for name, t in remix_tensors(model).items()}
    save_checkpoint(path, config, tensors, extra_files)
