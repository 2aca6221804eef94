"""ReMix Llama for vLLM: per-token top-k routing over batched LoRA banks on every adapted MLP.

Adapted from vllm/model_executor/models/llama.py (vLLM 0.32.0): `RemixMLP` extends `LlamaMLP`,
`RemixDecoderLayer` extends `LlamaDecoderLayer`, and `RemixLlamaForCausalLM` passes `layer_type=` to
`LlamaForCausalLM`. The checkpoint is named in `hf_config.remix["checkpoint"]` (set through `hf_overrides`).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from vllm.model_executor.models.utils import extract_layer_index

from remix_serve import routing
from remix_serve.checkpoint import Checkpoint, load_checkpoint, router_name, tensor_name
from remix_serve.vllm_plugin import bank, counters


@cache
def _checkpoint(path: str) -> Checkpoint:
    # One read (and full validation) per process: every decoder layer asks for the same checkpoint.
    return load_checkpoint(path)


def remix_checkpoint(vllm_config: VllmConfig) -> Checkpoint:
    """The validated checkpoint named by `hf_config.remix["checkpoint"]` (CheckpointError if it is bad)."""
    spec = getattr(vllm_config.model_config.hf_config, "remix", None)
    if not isinstance(spec, dict) or "checkpoint" not in spec:
        raise ValueError(
            f"RemixLlamaForCausalLM needs hf_overrides={{'remix': {{'checkpoint': '<folder>'}}}}; got remix={spec!r}"
        )
    return _checkpoint(str(spec["checkpoint"]))


class RemixMLP(LlamaMLP):
    """LlamaMLP plus a router and a stacked LoRA bank per adapted projection.

    Buffers (filled by `RemixLlamaForCausalLM.load_weights`): `router [n, D]` float32; `gate_up_A
    [m*n*r, D]` (m = adapted projections among gate/up, stacked in that order) with `gate_B`/`up_B
    [I/tp, n*r]`; `down_A [n*r, I/tp]`, `down_B [D, n*r]`. omega is folded into every B.
    """

    def __init__(self, *, vllm_config: VllmConfig, ckpt: Checkpoint, layer: int, prefix: str):
        cfg = vllm_config.model_config.hf_config
        self.tp_size = get_tensor_model_parallel_world_size()
        # down_proj's partial sums are reduced here, after the bank delta is added (see forward).
        super().__init__(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            hidden_act=cfg.hidden_act,
            quant_config=vllm_config.quant_config,
            bias=getattr(cfg, "mlp_bias", False),
            prefix=prefix,
            reduce_results=False,
        )
        rc = ckpt.config
        self.layer, self.num_loras, self.top_k, self.rank = layer, rc.num_loras, rc.top_k, rc.rank
        self.weighting: routing.Weighting = rc.weighting
        self.gate_up_targets = [p for p in ("gate_proj", "up_proj") if p in rc.target_modules]
        self.adapt_down = "down_proj" in rc.target_modules
        n, r, dtype = rc.num_loras, rc.rank, vllm_config.model_config.dtype
        inter = cfg.intermediate_size // self.tp_size

        def param(*shape: int, dt: torch.dtype = dtype) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dt), requires_grad=False)

        self.router = param(n, cfg.hidden_size, dt=torch.float32)  # routing is computed in float32
        if self.gate_up_targets:
            self.gate_up_A = param(len(self.gate_up_targets) * n * r, cfg.hidden_size)
            for proj in self.gate_up_targets:
                setattr(self, f"{proj.removesuffix('_proj')}_B", param(inter, n * r))
        if self.adapt_down:
            self.down_A = param(n * r, inter)
            self.down_B = param(cfg.hidden_size, n * r)
        self.register_buffer("activations", torch.zeros(n, dtype=torch.int64), persistent=False)
        self.register_buffer("routed_tokens", torch.zeros(1, dtype=torch.int64), persistent=False)
        self.recorded: list[torch.Tensor] | None = None  # ids [T, k] per real forward, when recording

    @torch.no_grad()
    def load_bank(self, tensors: dict[str, torch.Tensor], omega: float) -> list[str]:
        """Stack, fold omega into, and shard this layer's bank; returns the parameter names it filled."""
        rank, world = get_tensor_model_parallel_rank(), self.tp_size
        self.router.copy_(tensors[router_name(self.layer)])
        filled = ["router"]

        def stacked(proj: str, parallel: str) -> tuple[torch.Tensor, torch.Tensor]:
            a, b = bank.stack_bank(
                tensors[tensor_name(self.layer, proj, "lora_A")].float(),
                tensors[tensor_name(self.layer, proj, "lora_B")].float(),
                omega,
            )
            return bank.shard_bank(a, b, parallel, rank, world)  # type: ignore[arg-type]

        if self.gate_up_targets:
            a_parts = []
            for proj in self.gate_up_targets:
                a, b = stacked(proj, "column")
                a_parts.append(a)
                getattr(self, f"{proj.removesuffix('_proj')}_B").copy_(b)
                filled.append(f"{proj.removesuffix('_proj')}_B")
            self.gate_up_A.copy_(torch.cat(a_parts))
            filled.append("gate_up_A")
        if self.adapt_down:
            a, b = stacked("down_proj", "row")
            self.down_A.copy_(a)
            self.down_B.copy_(b)
            filled += ["down_A", "down_B"]
        return filled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]  # x: [T, D], vLLM's flat token batch
        logits = routing.router_logits(x, self.router)  # [T, n] float32
        ids = routing.topk_ids(logits, self.top_k)  # [T, k]
        mask = routing.selection_mask(ids, self.num_loras)  # [T, n] float32
        weights = mask if self.weighting == "constant" else routing.selection_weights(logits, ids, self.weighting)
        weights = weights.to(x.dtype)
        real = counters.real_token_mask(T)
        counters.add_counts(self.activations, self.routed_tokens, mask, real)
        if self.recorded is not None and real is not None:
            self.recorded.append(ids[real.to(ids.device)].cpu())

        gate_up, _ = self.gate_up_proj(x)  # [T, 2*I/tp]: gate half, then up half (packed_modules_mapping)
        if self.gate_up_targets:
            h = bank.bank_shrink(x, self.gate_up_A, weights, self.rank)  # [T, m*n*r]
            half = gate_up.shape[1] // 2
            for j, proj in enumerate(self.gate_up_targets):
                nr = self.num_loras * self.rank
                b = getattr(self, f"{proj.removesuffix('_proj')}_B")
                lo = 0 if proj == "gate_proj" else half
                gate_up[:, lo : lo + half].addmm_(h[:, j * nr : (j + 1) * nr], b.t())
        act = self.act_fn(gate_up)  # [T, I/tp]
        out, _ = self.down_proj(act)  # [T, D], a partial sum when tp > 1
        if self.adapt_down:
            out = out + bank.bank_delta(act, self.down_A, self.down_B, weights, self.rank)
        if self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out


class RemixDecoderLayer(LlamaDecoderLayer):
    """A LlamaDecoderLayer whose MLP is a RemixMLP on the checkpoint's adapted layers."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        ckpt = remix_checkpoint(vllm_config)
        layer = extract_layer_index(prefix)
        if layer in ckpt.config.adapted_layers:
            # Replaces the LlamaMLP built by super().__init__ (LlamaDecoderLayer has no MLP-type hook).
            self.mlp = RemixMLP(vllm_config=vllm_config, ckpt=ckpt, layer=layer, prefix=f"{prefix}.mlp")


class RemixLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM (SmolLM2, Llama 3) with ReMix banks; base weights load through vLLM's own loader."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        ckpt = remix_checkpoint(vllm_config)  # validate before any weight is allocated
        hf = vllm_config.model_config.hf_config
        fp = ckpt.config.base_fingerprint
        actual = (hf.hidden_size, hf.num_hidden_layers, hf.intermediate_size, hf.vocab_size)
        if actual != (fp.hidden_size, fp.num_hidden_layers, fp.intermediate_size, fp.vocab_size):
            raise ValueError(
                f"{ckpt.path}/remix_config.json: base_fingerprint {fp.model_dump()} does not match the served"
                f" model (hidden, layers, intermediate, vocab) = {actual}"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=RemixDecoderLayer)
        self.remix_checkpoint = ckpt

    def remix_mlps(self) -> list[RemixMLP]:
        return [m for m in self.modules() if isinstance(m, RemixMLP)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        ckpt = self.remix_checkpoint
        names = {module: name for name, module in self.named_modules()}
        for mlp in self.remix_mlps():
            for param in mlp.load_bank(ckpt.tensors, ckpt.config.omega):
                loaded.add(f"{names[mlp]}.{param}")
        return loaded

    # --- counters and routing records, read by the worker extension (worker.py) ---

    def remix_counts(self) -> dict[str, list]:
        """Cumulative counts: {"layers": [l...], "activations": [[n]...], "routed": [...]} (plain lists)."""
        mlps = sorted(self.remix_mlps(), key=lambda m: m.layer)
        return {
            "layers": [m.layer for m in mlps],
            "activations": [m.activations.tolist() for m in mlps],
            "routed": [int(m.routed_tokens.item()) for m in mlps],
        }

    def remix_reset_counts(self) -> None:
        for m in self.remix_mlps():
            m.activations.zero_()
            m.routed_tokens.zero_()

    def remix_record(self, on: bool) -> dict[int, list[list[int]]] | None:
        """Start (on=True) or stop recording routing; stopping returns {layer: [[ids of a token]...]}."""
        mlps = self.remix_mlps()
        if on:
            for m in mlps:
                m.recorded = []
            return None
        out = {m.layer: torch.cat(m.recorded).tolist() if m.recorded else [] for m in mlps}
        for m in mlps:
            m.recorded = None
        return out
