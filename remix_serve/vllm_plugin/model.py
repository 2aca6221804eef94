"""ReMix models for vLLM: per-token top-k routing over batched LoRA banks on every adapted MLP.

Built on vllm/model_executor/models/{llama,mistral,qwen2}.py (vLLM 0.32.0): `RemixMLP` extends `LlamaMLP` (whose
parameters Mistral's and Qwen2's MLPs share), and `RemixModelMixin` turns each base CausalLM into its ReMix
variant. The checkpoint is named in `hf_config.remix["checkpoint"]` (set through `hf_overrides`).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.models.llama import LlamaForCausalLM, LlamaMLP
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from remix_serve import routing
from remix_serve.checkpoint import (
    CONFIG_FILE,
    BaseFingerprint,
    Checkpoint,
    CheckpointError,
    fingerprint_problems,
    load_checkpoint,
    router_name,
    tensor_name,
)
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


def _b_name(proj: str) -> str:
    """RemixMLP attribute of a gate/up projection's B bank: gate_proj -> gate_B."""
    return proj.removesuffix("_proj") + "_B"


class RemixMLP(LlamaMLP):
    """LlamaMLP plus a float32 router and a stacked LoRA bank per adapted projection.

    The bank matrices are vLLM linear layers, so they get the platform's GEMM (oneDNN with prepacked weights on
    CPU, cuBLAS on CUDA) and vLLM's tensor-parallel sharding at load: `gate_up_A` (replicated, the A banks of the
    adapted gate/up projections stacked: [m*n*r, D]), `gate_B` / `up_B` (column-parallel like gate_up_proj:
    [I, n*r]), `down_A` (row-parallel like down_proj: [n*r, I]) and `down_B` (replicated: [D, n*r]). omega is
    folded into every B at load.
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
        n, dtype = rc.num_loras, vllm_config.model_config.dtype
        D, inter, nr = cfg.hidden_size, cfg.intermediate_size, rc.num_loras * rc.rank

        # Routing is computed in float32 (METHOD.md); the router is tiny, a plain parameter is enough.
        self.router = nn.Parameter(torch.empty(n, D, dtype=torch.float32), requires_grad=False)
        if self.gate_up_targets:
            m = len(self.gate_up_targets)
            self.gate_up_A = ReplicatedLinear(D, m * nr, bias=False, params_dtype=dtype, prefix=f"{prefix}.gate_up_A")
            for proj in self.gate_up_targets:
                name = _b_name(proj)
                setattr(self, name, ColumnParallelLinear(nr, inter, bias=False, params_dtype=dtype,
                                                         prefix=f"{prefix}.{name}"))  # fmt: skip
        # (B layer, is it up_proj's) per adapted gate/up projection, in gate_up_A's block order; read by forward
        self.gate_up_expand = [(getattr(self, _b_name(p)), p == "up_proj") for p in self.gate_up_targets]
        if self.adapt_down:
            self.down_A = RowParallelLinear(inter, nr, bias=False, params_dtype=dtype, reduce_results=False,
                                            input_is_parallel=True, prefix=f"{prefix}.down_A")  # fmt: skip
            self.down_B = ReplicatedLinear(nr, D, bias=False, params_dtype=dtype, prefix=f"{prefix}.down_B")
        self.counters: counters.RoutingCounters | None = None  # shared with the model; set by the model
        self.slot = 0  # this layer's row in the counters

    @torch.no_grad()
    def load_bank(self, tensors: dict[str, torch.Tensor], omega: float) -> list[str]:
        """Stack this layer's bank, fold omega into B, and load it through vLLM's (sharding) weight loaders.

        Returns the names of the parameters it filled, relative to this module.
        """
        self.router.copy_(tensors[router_name(self.layer)])
        filled = ["router"]

        def load(module_name: str, full: torch.Tensor) -> None:
            param = getattr(self, module_name).weight
            param.weight_loader(param, full.to(param.dtype))
            filled.append(f"{module_name}.weight")

        def stacked(proj: str) -> tuple[torch.Tensor, torch.Tensor]:
            return bank.stack_bank(
                tensors[tensor_name(self.layer, proj, "lora_A")].float(),
                tensors[tensor_name(self.layer, proj, "lora_B")].float(),
                omega,
            )

        if self.gate_up_targets:
            a_parts = []
            for proj in self.gate_up_targets:
                a, b = stacked(proj)
                a_parts.append(a)
                load(_b_name(proj), b)
            load("gate_up_A", torch.cat(a_parts))
        if self.adapt_down:
            a, b = stacked("down_proj")
            load("down_A", a)
            load("down_B", b)
        return filled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D], vLLM's flat token batch
        logits = routing.router_logits(x, self.router)  # [T, n] float32
        ids = routing.topk_ids(logits, self.top_k)  # [T, k]
        mask = routing.selection_mask(ids, self.num_loras)  # [T, n] float32
        if self.counters is not None:
            self.counters.add(self.slot, mask, ids)
        weights = mask if self.weighting == "constant" else routing.selection_weights(logits, ids, self.weighting)
        weights = weights.to(x.dtype)

        gate_up, _ = self.gate_up_proj(x)  # [T, 2*I/tp]: gate half, then up half (packed_modules_mapping)
        if self.gate_up_targets:
            h_all, _ = self.gate_up_A(x)  # [T, m*n*r]
            h_all = bank.mask_blocks(h_all, weights, self.rank)
            half, nr = gate_up.shape[1] // 2, self.num_loras * self.rank
            for j, (expand, is_up) in enumerate(self.gate_up_expand):
                delta, _ = expand(h_all[:, j * nr : (j + 1) * nr])  # [T, I/tp]
                gate_up[:, is_up * half : (is_up + 1) * half] += delta
        act = self.act_fn(gate_up)  # [T, I/tp]
        out, _ = self.down_proj(act)  # [T, D], a partial sum when tp > 1
        if self.adapt_down:
            h, _ = self.down_A(act)  # [T, n*r], a partial sum when tp > 1 (masking is linear, so that is fine)
            delta, _ = self.down_B(bank.mask_blocks(h, weights, self.rank))
            out = out + delta
        if self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out


class RemixModelMixin:
    """Turns a vLLM CausalLM with a gate/up/down MLP into its ReMix variant (mixed in before the base class).

    After the base model is built, the MLP of every adapted layer is replaced by a RemixMLP (same parameter
    names, plus router and bank). Swapping after construction works for every supported base, including
    Qwen2ForCausalLM, which takes no `layer_type`; the replaced MLP is built once and dropped before any weight
    is loaded.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        ckpt = remix_checkpoint(vllm_config)  # validate before any weight is allocated
        # The served model may not be the checkpoint's own base (--model X with a checkpoint trained on Y).
        hf = vllm_config.model_config.hf_config.get_text_config()
        served = BaseFingerprint(**{key: getattr(hf, key) for key in BaseFingerprint.model_fields})
        problems = fingerprint_problems(
            ckpt.config, served, f"{ckpt.path}/{CONFIG_FILE}", f"the served model {vllm_config.model_config.model!r}"
        )
        if problems:
            raise CheckpointError(problems)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.remix_checkpoint = ckpt
        layers_prefix = f"{maybe_prefix(prefix, 'model')}.layers"
        for layer in ckpt.config.adapted_layers:
            decoder = self.model.layers[layer]
            if hasattr(decoder, "mlp"):  # pipeline parallelism leaves other ranks' layers as placeholders
                decoder.mlp = RemixMLP(
                    vllm_config=vllm_config, ckpt=ckpt, layer=layer, prefix=f"{layers_prefix}.{layer}.mlp"
                )
        mlps = sorted(self.remix_mlps(), key=lambda m: m.layer)
        device = mlps[0].router.device if mlps else torch.device("cpu")
        self.counters = counters.RoutingCounters([m.layer for m in mlps], ckpt.config.num_loras, device)
        for slot, mlp in enumerate(mlps):
            mlp.counters, mlp.slot = self.counters, slot

    def remix_mlps(self) -> list[RemixMLP]:
        return [m for m in self.modules() if isinstance(m, RemixMLP)]

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        num_tokens = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
        self.counters.begin(num_tokens)
        out = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        self.counters.end()
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        ckpt = self.remix_checkpoint
        names = {module: name for name, module in self.named_modules()}
        for mlp in self.remix_mlps():
            for param in mlp.load_bank(ckpt.tensors, ckpt.config.omega):
                loaded.add(f"{names[mlp]}.{param}")
        return loaded

    # --- read by the worker extension (worker.py) ---

    def remix_counts(self) -> dict[str, list]:
        return self.counters.snapshot()

    def remix_reset_counts(self) -> None:
        self.counters.reset()

    def remix_record(self, on: bool) -> dict[int, list[list[int]]] | None:
        return self.counters.record(on)


class RemixLlamaForCausalLM(RemixModelMixin, LlamaForCausalLM):
    """Llama (SmolLM2, Llama 2/3) with ReMix banks; base weights load through vLLM's own loader."""


class RemixMistralForCausalLM(RemixModelMixin, MistralForCausalLM):
    """Mistral with ReMix banks."""


class RemixQwen2ForCausalLM(RemixModelMixin, Qwen2ForCausalLM):
    """Qwen2 with ReMix banks."""
