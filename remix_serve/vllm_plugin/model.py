"""ReMix models for vLLM: per-token top-k routing over batched LoRA banks on every adapted MLP.

Built on vllm/model_executor/models/{llama,mistral,qwen2}.py (vLLM 0.32.0): `RemixMLP` extends `LlamaMLP` (whose
parameters Mistral's and Qwen2's MLPs share), and `RemixModelMixin` turns each base CausalLM into its ReMix
variant. The checkpoint is named in `hf_config.remix["checkpoint"]` (set through `hf_overrides`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from functools import cache

import torch
from torch import nn
from vllm.config import CompilationMode, VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.models.llama import LlamaForCausalLM, LlamaMLP
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.utils import maybe_prefix
from vllm.platforms import current_platform
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
from remix_serve.vllm_plugin import bank, counters, cpu_kernels
from remix_serve.vllm_plugin.pool import delta
from remix_serve.vllm_plugin.pool.pages import PROJECTIONS
from remix_serve.vllm_plugin.spec import RemixOverrides

log = logging.getLogger(__name__)


@cache
def _checkpoint(path: str) -> Checkpoint:
    # One read (and full validation) per process: every decoder layer asks for the same checkpoint.
    return load_checkpoint(path)


def remix_checkpoint(vllm_config: VllmConfig) -> Checkpoint:
    """The validated checkpoint named by `hf_config.remix["checkpoint"]` (CheckpointError if it is bad)."""
    return _checkpoint(RemixOverrides.from_hf_config(vllm_config.model_config.hf_config).checkpoint)


def resolve_bank_path(requested: str | None, ckpt: Checkpoint, hf_config: object) -> str:
    """`fused` or `gather` for `hf_config.remix["bank_path"]`; `auto` (or none) is `bank.auto_bank_path`, with the
    gather kernels counted as running where the CPU kernels do. On a GPU auto stays fused: the gather path's Triton
    kernel has not been measured on one yet."""
    if requested in ("fused", "gather"):
        return requested
    kernels = current_platform.is_cpu() and cpu_kernels.available()
    return bank.auto_bank_path(ckpt.config, hf_config, gather_kernels=kernels)


class RemixMLP(LlamaMLP):
    """LlamaMLP plus a float32 router and a LoRA bank per adapted projection, applied one of two ways (`bank_path`).

    Gather (`bank_path="gather"`): the base projections stay vLLM's own layers and each token's k selected LoRAs are
    added to their outputs with the multi-checkpoint pool's ops (`pool.delta.route` and `pool.delta.add`: one
    routing op per layer, one gather delta per projection): the checkpoint's bank is a one-slot pool whose pages are
    its LoRAs (`[n, r, in]` A and `[n, r, out]` omega * B per projection, this rank's shard under tensor
    parallelism). Work per token is k*r whatever n, so prefill keeps near the base's rate. With tensor parallelism
    the down delta is added to the partial sums before the all-reduce (the shrink over this rank's input shard is
    a partial sum; the delta is linear in it).

    Fused (`bank_path="fused"`), described below: the bank's expand is part of the base GEMMs.

    The shrink GEMMs are vLLM linear layers: `gate_up_A` (the A banks of the adapted gate/up projections stacked,
    replicated: [m*n*r, D]) and `down_A` (row-parallel like down_proj: [n*r, I]). The expand GEMM has no layer of
    its own: B (omega folded in) is appended to the base weight along its input dimension and the masked shrink
    output to the input, so `[x | h] @ [W | B]^T = x W^T + h B^T` is one GEMM per base projection:
    `gate_up_fused` (gate_up_proj's column-parallel shard, [gate; up] rows, plus a block-diagonal B: each
    adapted projection's B in its own rows and its bank's columns, zeros elsewhere) and `down_fused` (down_proj's
    row shard plus the whole B; masking is linear, so B may act on the shrink's partial sums before the
    all-reduce). On CPU this saves three small GEMMs and two strided adds per layer, which cost far more than their
    arithmetic. One gate_up GEMM with zero blocks takes about the GEMM time of two without them
    (bench/micro/cpu_gate_up.py) and needs one shrink op, not two. On GPU it saves kernel launches. `load_bank` builds
    the fused weights from the base shards that vLLM's own loader filled, then drops the unfused base layers.

    On CPU, decode-sized batches build both fused inputs with `cpu_kernels`: the shrink of each token's k selected
    LoRAs only, and for down, SiLU-and-mul in the same op (bench/micro/cpu_down_input.py).
    """

    def __init__(self, *, vllm_config: VllmConfig, ckpt: Checkpoint, layer: int, prefix: str, bank_path: str):
        cfg = vllm_config.model_config.hf_config
        if vllm_config.quant_config is not None:
            raise ValueError(
                "ReMix serves unquantized base models only: the fused bank path appends to the base MLP weights, "
                f"and the gather path has not been tested on quantized ones (got quantization "
                f"{vllm_config.model_config.quantization!r})"
            )
        self.tp_size, self.tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        bias, rc = getattr(cfg, "mlp_bias", False), ckpt.config
        # down_proj reduces its own partial sums; an adapted one is replaced by down_fused, reduced in forward.
        super().__init__(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         hidden_act=cfg.hidden_act, bias=bias, prefix=prefix)  # fmt: skip
        self.layer, self.num_loras, self.top_k, self.rank = layer, rc.num_loras, rc.top_k, rc.rank
        self.weighting: routing.Weighting = rc.weighting
        self.gate_up_targets = [p for p in ("gate_proj", "up_proj") if p in rc.target_modules]
        self.adapt_down = "down_proj" in rc.target_modules
        n, dtype = rc.num_loras, vllm_config.model_config.dtype
        D, inter, nr = cfg.hidden_size, cfg.intermediate_size, rc.num_loras * rc.rank

        # vLLM's benchmarking mode (--load-format dummy) fills every parameter with random values and never calls
        # load_weights: the fused layers are then allocated as they are, bank included, and the unfused base
        # layers dropped here; the checkpoint gives the shapes only.
        self.dummy = vllm_config.load_config.load_format == "dummy"
        self.bank_path = bank_path
        self.counters: counters.RoutingCounters | None = None  # shared with the model; set by the model
        self.slot = 0  # this layer's row in the counters
        if bank_path == "gather":
            self._init_gather(vllm_config, n, D, inter // self.tp_size, dtype)
            return

        def fused(make: type, in_features: int, out_features: int, name: str) -> nn.Module:
            # Built on the meta device: load_bank gives it real weights, so nothing is allocated twice.
            with torch.device("meta") if not self.dummy else contextlib.nullcontext():
                return make(in_features, out_features, bias=bias, params_dtype=dtype, prefix=f"{prefix}.{name}")

        # Routing is computed in float32 (docs/method.md, "The layer"); the router is tiny, a plain parameter is enough.
        self.router = nn.Parameter(torch.empty(n, D, dtype=torch.float32), requires_grad=False)
        if self.gate_up_targets:
            m = len(self.gate_up_targets)
            self.gate_up_A = ReplicatedLinear(D, m * nr, bias=False, params_dtype=dtype, prefix=f"{prefix}.gate_up_A")
            self.gate_up_fused = fused(ColumnParallelLinear, D + m * nr, 2 * inter, "gate_up_fused")
        if self.adapt_down:
            self.down_A = RowParallelLinear(inter, nr, bias=False, params_dtype=dtype, reduce_results=False,
                                            input_is_parallel=True, prefix=f"{prefix}.down_A")  # fmt: skip
            self.down_fused = fused(ReplicatedLinear, inter // self.tp_size + nr, D, "down_fused")
        if self.dummy:
            if self.gate_up_targets:
                del self.gate_up_proj
            if self.adapt_down:
                del self.down_proj
        # One fused op each for routing and for building a fused GEMM's input, where the CPU kernels build
        # (they read unpacked copies of the shrink banks that load_bank makes: not in dummy mode).
        self.cpu_kernels = current_platform.is_cpu() and cpu_kernels.available() and not self.dummy
        self.masked_concat = cpu_kernels.masked_concat if self.cpu_kernels else bank.masked_concat
        # Unpacked copies of the shrink banks for cpu_kernels.shrink_concat (vLLM repacks the layers' own weights)
        self.gate_up_bank: torch.Tensor | None = None
        self.down_bank: torch.Tensor | None = None

    def _init_gather(self, vllm_config: VllmConfig, n: int, D: int, inter_local: int, dtype: torch.dtype) -> None:
        """The gather path's tensors: the router, the page stores and a one-slot routing table (`pool.delta.route`'s
        arguments with every token in slot 0), all allocated here so that vLLM's memory profiling counts them."""
        self.router = nn.Parameter(torch.empty(n, D, dtype=torch.float32), requires_grad=False)
        r = self.rank
        self.gather_kernels = current_platform.is_cpu() and cpu_kernels.available()
        if self.adapt_down and self.tp_size > 1:
            self.down_proj.reduce_results = False  # the delta joins the partial sums; forward reduces
        m = len(self.gate_up_targets)
        buffers = {
            "A_gate_up": torch.zeros(m * n, r, D, dtype=dtype),  # gate pages first, then up's
            "B_gate_up": torch.zeros(m * n, r, inter_local, dtype=dtype),
            "A_down": torch.zeros(n if self.adapt_down else 0, r, inter_local, dtype=dtype),
            "B_down": torch.zeros(n if self.adapt_down else 0, r, D, dtype=dtype),
            "route_bias": torch.zeros(1, n, dtype=torch.float32),
            "route_k": torch.full((1,), self.top_k, dtype=torch.int64),
            "route_softmax": torch.full((1,), self.weighting == "softmax", dtype=torch.bool),
            "route_tables": torch.full((1, len(PROJECTIONS), n, 1), -1, dtype=torch.int64),
            "route_slots": torch.zeros(vllm_config.scheduler_config.max_num_batched_tokens, dtype=torch.int64),
        }
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor, persistent=False)
        lora = torch.arange(n)
        for block, proj in enumerate(self.gate_up_targets):
            self.route_tables[0, PROJECTIONS.index(proj), :, 0] = lora + block * n
        if self.adapt_down:
            self.route_tables[0, PROJECTIONS.index("down_proj"), :, 0] = lora

    @torch.no_grad()
    def _load_gather(self, tensors: dict[str, torch.Tensor], omega: float) -> list[str]:
        """The gather path's load: router, and each LoRA's A rows and omega * B columns (transposed) as its pages,
        this rank's shard of them (gate/up: B's output rows; down: A's input columns)."""
        self.router.copy_(tensors[router_name(self.layer)])
        n = self.num_loras
        rows = self.B_gate_up.shape[2] if self.gate_up_targets else self.A_down.shape[2]  # I / tp
        shard = slice(self.tp_rank * rows, (self.tp_rank + 1) * rows)

        def pair(proj: str) -> tuple[torch.Tensor, torch.Tensor]:  # [n, r, in], [n, r, out] in float32
            a = tensors[tensor_name(self.layer, proj, "lora_A")].float()
            b = tensors[tensor_name(self.layer, proj, "lora_B")].float() * omega
            return a, b.transpose(1, 2)

        for block, proj in enumerate(self.gate_up_targets):
            a, b = pair(proj)
            self.A_gate_up[block * n : (block + 1) * n] = a.to(self.A_gate_up.dtype)
            self.B_gate_up[block * n : (block + 1) * n] = b[:, :, shard].to(self.B_gate_up.dtype)
        if self.adapt_down:
            a, b = pair("down_proj")
            self.A_down.copy_(a[:, :, shard].to(self.A_down.dtype))
            self.B_down.copy_(b.to(self.B_down.dtype))
        return ["router"]

    def _forward_gather(self, x: torch.Tensor) -> torch.Tensor:
        T, on = x.shape[0], self.gather_kernels
        pages, coef, ids = delta.route(x, self.router[None], self.route_bias, self.route_k, self.route_softmax,
                                       self.route_slots[:T], self.route_tables, self.top_k, on)  # fmt: skip
        if self.counters is not None:
            self.counters.add(self.slot, ids)
        gate_up, _ = self.gate_up_proj(x)  # [T, 2 * I/tp]
        for proj in self.gate_up_targets:
            half = PROJECTIONS.index(proj)
            offset = half * (gate_up.shape[1] // 2)
            delta.add(gate_up, offset, x, self.A_gate_up, self.B_gate_up, pages[:, half], coef, 1, on)
        act = self.act_fn(gate_up)
        out, _ = self.down_proj(act)  # [T, D], partial when tp > 1 and down is adapted
        if not self.adapt_down:
            return out
        delta.add(out, 0, act, self.A_down, self.B_down, pages[:, PROJECTIONS.index("down_proj")], coef, 1, on)
        return tensor_model_parallel_all_reduce(out) if self.tp_size > 1 else out

    @torch.no_grad()
    def load_bank(self, tensors: dict[str, torch.Tensor], omega: float) -> list[str]:
        """Load router and shrink banks, fuse each expand bank into its base projection, drop the unfused layers.

        Runs after vLLM's loader has filled the base weights. Returns the names of the parameters it filled,
        relative to this module. The gather path keeps the base layers and fills its page stores instead.
        """
        if self.bank_path == "gather":
            return self._load_gather(tensors, omega)
        self.router.copy_(tensors[router_name(self.layer)])
        filled = ["router"]

        def stacked(proj: str) -> tuple[torch.Tensor, torch.Tensor]:
            return bank.stack_bank(
                tensors[tensor_name(self.layer, proj, "lora_A")].float(),
                tensors[tensor_name(self.layer, proj, "lora_B")].float(),
                omega,
            )

        def load(name: str, full: torch.Tensor) -> torch.Tensor | None:  # through vLLM's (sharding) weight loader
            param = getattr(self, name).weight
            param.weight_loader(param, full.to(param.dtype))
            filled.append(f"{name}.weight")
            # This rank's shard, before vLLM packs the layer's weight for its GEMM kernel
            return param.detach().clone() if self.cpu_kernels else None

        def fuse(name: str, weight: torch.Tensor, b_all: torch.Tensor | None, bias: torch.Tensor | None) -> None:
            layer = getattr(self, name)
            if b_all is not None:
                weight = torch.cat([weight, b_all.to(device=weight.device, dtype=weight.dtype)], dim=1)
            layer.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
            filled.append(f"{name}.weight")
            if bias is not None:
                layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
                filled.append(f"{name}.bias")

        if self.gate_up_targets:
            weight = self.gate_up_proj.weight  # this rank's [gate rows; up rows], [2 * I/tp, D]
            rows, nr = weight.shape[0] // 2, self.num_loras * self.rank
            a_parts, b_all = [], torch.zeros(2 * rows, len(self.gate_up_targets) * nr)
            for block, proj in enumerate(self.gate_up_targets):
                a, b = stacked(proj)
                a_parts.append(a)
                half = ("gate_proj", "up_proj").index(proj)  # column-parallel, like W: this rank's rows of B
                b_all[half * rows : (half + 1) * rows, block * nr : (block + 1) * nr] = b[
                    self.tp_rank * rows : (self.tp_rank + 1) * rows
                ]
            self.gate_up_bank = load("gate_up_A", torch.cat(a_parts))
            fuse("gate_up_fused", weight, b_all, self.gate_up_proj.bias)
            del self.gate_up_proj
        if self.adapt_down:
            a, b = stacked("down_proj")
            self.down_bank = load("down_A", a)
            bias = self.down_proj.bias
            if bias is not None and self.tp_rank > 0:  # like RowParallelLinear: the bias is added once
                bias = torch.zeros_like(bias)
            fuse("down_fused", self.down_proj.weight, b, bias)
            del self.down_proj
        return filled

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[T, n]` selection weights in x's dtype (the 0/1 mask for ReMix) and the `[T, k]` selected ids."""
        if self.cpu_kernels and self.weighting == "constant":
            if torch.compiler.is_compiling():  # evaluated once, at trace time
                return cpu_kernels.route_op(x, self.router, self.top_k)
            return cpu_kernels.route(x, self.router, self.top_k)
        logits = routing.router_logits(x, self.router)  # [T, n] float32
        ids = routing.topk_ids(logits, self.top_k)
        return routing.selection_weights(logits, ids, self.weighting, dtype=x.dtype), ids

    def fused_input(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, down: bool) -> torch.Tensor:
        """The input of gate_up_fused (`[x | masked h]` from x `[T, D]`) or of down_fused (from gate_up `[T, 2I]`).

        On CPU, decode-sized batches compute the shrink of each token's k selected LoRAs only, for down with
        SiLU-and-mul in the same op; compiled, one custom op makes that choice per batch (`bank_input_op`).
        """
        bank_A = self.down_bank if down else self.gate_up_bank
        if self.cpu_kernels and torch.compiler.is_compiling():
            return cpu_kernels.bank_input_op(x, bank_A, ids, weights, self.rank, down)
        if self.cpu_kernels and x.shape[0] <= cpu_kernels.GATHER_MAX_TOKENS:
            if down:
                return cpu_kernels.silu_mul_shrink_concat(x, bank_A, ids, weights, self.rank)
            return cpu_kernels.shrink_concat(x, bank_A, ids, weights, self.rank)
        if down:
            x = self.act_fn(x)
        shrink = self.down_A if down else self.gate_up_A
        return self.masked_concat(x, shrink(x)[0], weights, self.rank)  # [T, D + m*n*r] or [T, I/tp + n*r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D], vLLM's flat token batch
        if self.bank_path == "gather":
            return self._forward_gather(x)
        weights, ids = self.route(x)
        if self.counters is not None:
            self.counters.add(self.slot, ids)
        if self.gate_up_targets:
            gate_up, _ = self.gate_up_fused(self.fused_input(x, ids, weights, down=False))  # [T, 2 * I/tp]
        else:
            gate_up, _ = self.gate_up_proj(x)
        if not self.adapt_down:
            return self.down_proj(self.act_fn(gate_up))[0]  # reduces its own partial sums
        # The shrink is a partial sum when tp > 1; masking is linear, so B may act on it before the all-reduce.
        out, _ = self.down_fused(self.fused_input(gate_up, ids, weights, down=True))  # [T, D], partial when tp > 1
        return tensor_model_parallel_all_reduce(out) if self.tp_size > 1 else out


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
        requested = RemixOverrides.from_hf_config(vllm_config.model_config.hf_config).bank_path
        self.remix_bank_path = resolve_bank_path(requested, ckpt, hf)
        log.info("remix-serve: %s bank path for %s (requested: %s)", self.remix_bank_path, ckpt.path,
                 requested or "auto")  # fmt: skip
        layers_prefix = f"{maybe_prefix(prefix, 'model')}.layers"
        for layer in ckpt.config.adapted_layers:
            decoder = self.model.layers[layer]
            if hasattr(decoder, "mlp"):  # pipeline parallelism leaves other ranks' layers as placeholders
                decoder.mlp = RemixMLP(
                    vllm_config=vllm_config,
                    ckpt=ckpt,
                    layer=layer,
                    prefix=f"{layers_prefix}.{layer}.mlp",
                    bank_path=self.remix_bank_path,
                )
        mlps = sorted(self.remix_mlps(), key=lambda m: m.layer)
        device = mlps[0].router.device if mlps else torch.device("cpu")
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.counters = counters.RoutingCounters([m.layer for m in mlps], ckpt.config.num_loras, max_tokens, device)
        self.compiled = vllm_config.compilation_config.mode != CompilationMode.NONE
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
        # Outside the compiled decoder; inside a full CUDA graph this is captured as tensor ops (counters.py).
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
        if self.compiled:
            raise RuntimeError(
                "remix_record needs an eager engine (enforce_eager=True): a compiled graph does not run the "
                "Python that records each layer's selection"
            )
        return self.counters.record(on)


class RemixLlamaForCausalLM(RemixModelMixin, LlamaForCausalLM):
    """Llama (SmolLM2, Llama 2/3) with ReMix banks; base weights load through vLLM's own loader."""


class RemixMistralForCausalLM(RemixModelMixin, MistralForCausalLM):
    """Mistral with ReMix banks."""


class RemixQwen2ForCausalLM(RemixModelMixin, Qwen2ForCausalLM):
    """Qwen2 with ReMix banks."""
