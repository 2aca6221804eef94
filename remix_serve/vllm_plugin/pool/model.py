"""Multi-checkpoint ReMix models for vLLM: many checkpoints on one base, chosen per request, banks in a paged pool.

Each checkpoint is a vLLM LoRA adapter (`LoRARequest`, `--enable-lora --lora-target-modules remix_anchor`;
`vllm_hooks.py` loads ReMix folders as `RemixLoRAModel`s). vLLM puts the adapters of a step's requests into its
`max_loras` slots and tells each token's slot (`vllm_hooks.token_slots`); `AdapterPool` owns everything the model
keeps per checkpoint:

- the page stores, allocated once in `__init__` (vLLM's memory profiling counts them): per store (`gate_up`,
  `down`) `A [P, r_page, in]` and `B [P, r_page, out]` (omega folded in), indexed by `pages.PagePool`'s page ids;
- per layer and slot (row `max_loras` = base tokens): the router `[n_max, D]` (float32), a -inf bias past the
  checkpoint's n, its k, and a page table `[3, n_max, pages_per_lora]`;
- per-checkpoint routing counts.

When vLLM puts an adapter in a slot (`SlotEventsMixin.remix_on_slot`, outside any forward), the pool pins the
checkpoint (a checkpoint in a slot is never evicted), makes it resident (copying its pages in only when they were
evicted or never loaded: least recently used unpinned checkpoints go to host first) and writes the slot's rows.

Forward, per layer: the base MLP, plus for the tokens of ReMix checkpoints one router GEMM over every slot's router,
each token's own logits, top-k and weights (`routing.per_token_selection`), its picks turned into pages through
its slot's table, and one page-gather delta per projection (`delta.lora_add`) over all tokens of the mixed batch.
Base tokens and layers a checkpoint does not adapt read no page. Admission (`admit`, `admission.check_admission`)
keeps every checkpoint within `1/max_loras` of each store, so the checkpoints of any step always fit at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import CompilationMode, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.lora.lora_model import LoRAModel
from vllm.model_executor.models.llama import LlamaForCausalLM, LlamaMLP
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.utils import maybe_prefix
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors

from remix_serve.checkpoint import CONFIG_FILE, BaseFingerprint, Checkpoint, router_name, tensor_name
from remix_serve.vllm_plugin import cpu_kernels
from remix_serve.vllm_plugin.counters import count_picks, real_token_mask
from remix_serve.vllm_plugin.pool import delta, vllm_hooks
from remix_serve.vllm_plugin.pool.admission import SIZE_HINT, check_admission
from remix_serve.vllm_plugin.pool.pages import PROJECTIONS, STORE_OF, LoraLayout, PagePool, page_rows
from remix_serve.vllm_plugin.spec import PoolSettings, RemixOverrides


def served_fingerprint(vllm_config: VllmConfig) -> BaseFingerprint:
    hf = vllm_config.model_config.hf_config.get_text_config()
    return BaseFingerprint(**{key: getattr(hf, key) for key in BaseFingerprint.model_fields})


class AdapterPool(nn.Module):
    """The pool's device tensors, its page bookkeeping and the slot to checkpoint map (see the module docstring)."""

    def __init__(self, settings: PoolSettings, vllm_config: VllmConfig):
        super().__init__()
        hf = vllm_config.model_config.hf_config.get_text_config()
        lora_config = vllm_config.lora_config
        if lora_config is None:
            raise ValueError(
                "a multi-checkpoint ReMix model needs vLLM's LoRA machinery: start it with --enable-lora "
                f"--lora-target-modules {vllm_hooks.ANCHOR} --max-lora-rank 1 (remix-serve does)"
            )
        if get_tensor_model_parallel_world_size() > 1:
            raise ValueError("the multi-checkpoint pool serves with --tensor-parallel-size 1 only (for now)")
        self.settings, self.fingerprint = settings, served_fingerprint(vllm_config)
        self.model_name = vllm_config.model_config.model
        self.num_layers, self.slots = hf.num_hidden_layers, lora_config.max_loras
        self.D, self.I, dtype = hf.hidden_size, hf.intermediate_size, vllm_config.model_config.dtype
        r_page, n_max, S, L = settings.r_page, settings.n_max, self.slots, self.num_layers
        self.k_max = settings.k_max
        self.pages_per_lora = math.ceil(settings.r_max / r_page)
        sizes = {"gate_up": (self.D, self.I), "down": (self.I, self.D)}
        for store, (fan_in, fan_out) in sizes.items():
            P = settings.pages[store]
            self.register_buffer(f"A_{store}", torch.zeros(P, r_page, fan_in, dtype=dtype), persistent=False)
            self.register_buffer(f"B_{store}", torch.zeros(P, r_page, fan_out, dtype=dtype), persistent=False)
        # float32 explicitly: vLLM builds the model with the served dtype as torch's default (routing is float32)
        self.register_buffer("routers", torch.zeros(L, S + 1, n_max, self.D, dtype=torch.float32), persistent=False)
        self.register_buffer("bias", torch.zeros(L, S + 1, n_max, dtype=torch.float32), persistent=False)
        self.register_buffer("k", torch.zeros(L, S + 1, dtype=torch.int64), persistent=False)
        self.register_buffer("softmax", torch.zeros(S + 1, dtype=torch.bool), persistent=False)
        tables = torch.full((L, S + 1, len(PROJECTIONS), n_max, self.pages_per_lora), -1, dtype=torch.int64)
        self.register_buffer("tables", tables, persistent=False)
        self.register_buffer("activations", torch.zeros(S + 1, L, n_max, dtype=torch.int64), persistent=False)
        self.register_buffer("routed", torch.zeros(S + 1, L, dtype=torch.int64), persistent=False)
        self.pages = PagePool(settings.pages, r_page, SIZE_HINT)
        self.cpu_kernels = current_platform.is_cpu() and cpu_kernels.available()
        self.checkpoints: dict[str, Checkpoint] = {}  # known (resident or on host), by adapter name
        self.slot_names: list[str | None] = [None] * S
        self.totals: dict[str, dict[str, torch.Tensor]] = {}  # counts flushed from slots, by name
        # Per forward, in persistent buffers that a compiled graph reads (a new tensor per step would recompile it):
        # each token's slot (S = base) and whether it is a real token (1) or padding / a dummy run (0)
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.register_buffer("step_slots", torch.full((max_tokens,), S, dtype=torch.int64), persistent=False)
        self.register_buffer("real", torch.zeros(max_tokens, dtype=torch.int64), persistent=False)
        self.compiled = vllm_config.compilation_config.mode != CompilationMode.NONE
        self.num_tokens = 0
        self.present: set[int] = set()  # eager CPU: the slots this forward's tokens use (skip the rest)
        self.pending: list[tuple[int, torch.Tensor]] = []  # eager: (layer, ids [T, k_max]) to count at the end
        self.trace: list[dict[str, int]] | None = None  # set_trace
        self.step_pages: list[torch.Tensor] = []

    # --- admission and slots (outside any forward) ---

    def admit(self, ckpt: Checkpoint, name: str) -> None:
        """Check that `ckpt` can be served by this pool and base: CheckpointError / PoolError name every problem
        (the rule is `admission.check_admission`, shared with the API server's load checks)."""
        check_admission(ckpt.config, name, self.settings, self.slots, self.fingerprint,
                        where=f"{ckpt.path}/{CONFIG_FILE}", base=repr(self.model_name))  # fmt: skip

    @torch.inference_mode()
    def on_slot(self, slot: int, adapter: LoRAModel | None) -> None:
        """vLLM put `adapter` in `slot`: release the slot's previous checkpoint, then pin and map the new one."""
        self._release(slot)
        if not isinstance(adapter, vllm_hooks.RemixLoRAModel):  # vLLM's warm-up dummy: the slot reads no page
            return
        name, ckpt = adapter.name, adapter.checkpoint
        if name in self.checkpoints and self.checkpoints[name] is not ckpt:  # reloaded (load_inplace) or reused
            self.forget(name)
        if name not in self.checkpoints:
            self.admit(ckpt, name)
            self.pages.add(name, LoraLayout.of(ckpt.config))
            self.checkpoints[name] = ckpt
        res, fresh = self.pages.acquire(name, pin=True)
        if fresh:
            self._write_pages(res.pages, ckpt)
        self._write_slot(slot, res.pages, ckpt)
        self.slot_names[slot] = name

    @torch.inference_mode()
    def forget(self, name: str) -> bool:
        """Free a checkpoint's pages for real and forget it (after vLLM removed the adapter); False if unknown.

        Slots vLLM has vacated are released first (vLLM sends no event for that); PoolError if it is still in one.
        """
        self.reconcile()
        if name not in self.checkpoints:
            return False
        self.pages.unload(name)
        del self.checkpoints[name]
        return True

    def reconcile(self) -> None:
        """Release the slots whose adapter vLLM has removed or replaced without telling (no event exists for it)."""
        manager = getattr(self, "manager", None)
        if manager is None:
            return
        for slot, name in enumerate(self.slot_names):
            adapter = manager.get_adapter(manager.lora_index_to_id[slot]) if manager.lora_index_to_id[slot] else None
            if name is not None and (not isinstance(adapter, vllm_hooks.RemixLoRAModel) or adapter.name != name):
                self._release(slot)

    def _release(self, slot: int) -> None:
        name = self.slot_names[slot]
        self.tables[:, slot] = -1
        self.k[:, slot] = 0
        self.softmax[slot] = False
        if name is None:
            return
        self._flush_counts(slot, name)
        self.pages.unpin(name)
        self.slot_names[slot] = None

    @torch.no_grad()
    def _write_pages(self, pages: dict[tuple[int, str, int], list[int]], ckpt: Checkpoint) -> None:
        omega, rows = ckpt.config.omega, page_rows(ckpt.config.rank, self.settings.r_page)
        for (layer, proj, lora), ids in pages.items():
            store = STORE_OF[proj]
            A, B = getattr(self, f"A_{store}"), getattr(self, f"B_{store}")
            lora_A = ckpt.tensors[tensor_name(layer, proj, "lora_A")][lora]  # [r, in]
            lora_B = ckpt.tensors[tensor_name(layer, proj, "lora_B")][lora]  # [out, r]
            for page, (start, stop) in zip(ids, rows, strict=True):
                A[page].zero_()
                B[page].zero_()
                A[page, : stop - start] = lora_A[start:stop].to(A.dtype)
                B[page, : stop - start] = (lora_B[:, start:stop].float() * omega).t().to(B.dtype)

    @torch.no_grad()
    def _write_slot(self, slot: int, pages: dict[tuple[int, str, int], list[int]], ckpt: Checkpoint) -> None:
        cfg = ckpt.config
        self.softmax[slot] = cfg.weighting == "softmax"
        for layer in cfg.adapted_layers:
            self.routers[layer, slot].zero_()
            self.routers[layer, slot, : cfg.num_loras] = ckpt.tensors[router_name(layer)].float()
            self.bias[layer, slot] = float("-inf")
            self.bias[layer, slot, : cfg.num_loras] = 0.0
            self.k[layer, slot] = cfg.top_k
        for (layer, proj, lora), ids in pages.items():
            self.tables[layer, slot, PROJECTIONS.index(proj), lora, : len(ids)] = torch.tensor(ids)

    # --- forward ---

    def begin(self, slots: torch.Tensor) -> None:
        """Start a forward: `slots [T]` from vLLM (-1 = base) into the persistent buffers, tensor ops only (a full
        CUDA graph captures them). Only real tokens count (counters.real_token_mask)."""
        T = slots.shape[0]
        if self.step_slots.numel() < T:
            raise ValueError(f"a forward of {T} tokens exceeds max_num_batched_tokens={self.step_slots.numel()}")
        self.num_tokens = T
        self.step_slots[:T] = torch.where(slots < 0, self.slots, slots)
        mask = real_token_mask(T, slots.device)
        if mask is None:
            self.real[:T].zero_()
        else:
            self.real[:T].copy_(mask)
        self.pending, self.step_pages = [], []
        # Eager on the CPU the slots are host tensors: skip the bank in layers no token's checkpoint adapts.
        eager_cpu = slots.device.type == "cpu" and not self.compiled
        self.present = (
            set(self.step_slots[:T].unique().tolist()) - {self.slots} if eager_cpu else set(range(self.slots))
        )

    def layer_active(self, layer: int, proj: str) -> bool:
        """Whether a token of this forward may need `proj`'s bank in `layer`. Compiled, always (evaluated once, at
        trace time; the page tables then skip what is not needed)."""
        if torch.compiler.is_compiling():
            return True
        return any(
            (name := self.slot_names[s]) is not None
            and layer in self.checkpoints[name].config.adapted_layers
            and proj in self.checkpoints[name].config.target_modules
            for s in self.present
        )

    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's pages `[T, 3, K]` (K = k_max * pages_per_lora, -1 = none) and their weights `[T, K]`.

        One fused op on the CPU (`cpu_kernels.pool_route`), else its PyTorch reference (`delta.route_reference`);
        compiled, the op's custom-op form and one counting op per layer (`counters.count_pool_routes`)."""
        T = x.shape[0]
        pages, coef, ids = delta.route(x, self.routers[layer], self.bias[layer], self.k[layer], self.softmax,
                                       self.step_slots[:T], self.tables[layer], self.k_max,
                                       self.cpu_kernels)  # fmt: skip
        if torch.compiler.is_compiling():
            torch.ops.remix.count_pool_routes(self.activations, self.routed, layer, self.step_slots, ids, self.real)
            return pages, coef
        self.pending.append((layer, ids))
        if self.trace is not None:
            self.step_pages.append(pages)
        return pages, coef

    def add_delta(
        self, out: torch.Tensor, offset: int, x: torch.Tensor, store: str, pages: torch.Tensor, coef: torch.Tensor
    ) -> None:
        """Add the delta of `store`'s pages into columns `[offset, offset + N)` of `out`, in place."""
        A, B = getattr(self, f"A_{store}"), getattr(self, f"B_{store}")
        delta.add(out, offset, x, A, B, pages, coef, self.pages_per_lora, self.cpu_kernels)

    def set_trace(self, on: bool) -> list[dict[str, int]] | None:
        """Start (on) or stop tracing; stopping returns, per forward with ReMix tokens, its tokens and the distinct
        pages of each store that its tokens selected, over every layer: what a step must read beyond the base
        weights (bench/serve_multi.py prints it beside each decode figure). A host sync per forward: off by default,
        and eager engines only (a compiled graph does not run the Python that keeps the pages).
        """
        if self.compiled:
            raise RuntimeError("remix_pool_trace needs an eager engine (enforce_eager=True)")
        out, self.trace = self.trace, ([] if on else None)
        return None if on else out

    def _trace_step(self) -> None:
        gate_up = [p[:, :2] for p in self.step_pages]
        down = [p[:, 2] for p in self.step_pages]
        distinct = {
            store: int(torch.cat([t.reshape(-1) for t in parts]).unique().ge(0).sum()) if parts else 0
            for store, parts in (("gate_up", gate_up), ("down", down))
        }
        self.trace.append({"tokens": self.num_tokens, **distinct})

    def end(self) -> None:
        """Eager: count this forward's picks (real tokens, used picks) of every layer in one scatter-add."""
        if self.trace is not None and self.step_pages:
            self._trace_step()
        if self.pending:
            layers = torch.tensor([layer for layer, _ in self.pending], device=self.real.device)
            count_picks(
                self.activations,
                self.routed,
                layers,
                self.step_slots,
                torch.stack([i for _, i in self.pending]),
                self.real,
            )
        self.pending, self.step_pages = [], []

    # --- counts, read by the worker extension ---

    def _flush_counts(self, slot: int, name: str) -> None:
        # Runs inside a step (vLLM activates adapters under inference mode) or from an RPC (add_lora, remove via
        # forget), always under inference mode (the callers' decorator): `totals` are inference tensors, and an
        # in-place add to them outside inference mode would raise.
        zeros = {
            "activations": torch.zeros_like(self.activations[0].cpu()),
            "routed": torch.zeros_like(self.routed[0].cpu()),
        }
        totals = self.totals.setdefault(name, zeros)
        totals["activations"] += self.activations[slot].cpu()
        totals["routed"] += self.routed[slot].cpu()
        self.activations[slot].zero_()
        self.routed[slot].zero_()

    def counts(self) -> dict[str, dict[str, list]]:
        """{checkpoint name: {"layers", "activations" [[n] per adapted layer], "routed" [per layer]}}, cumulative."""
        acts = {name: t["activations"].clone() for name, t in self.totals.items()}
        routed = {name: t["routed"].clone() for name, t in self.totals.items()}
        for slot, name in enumerate(self.slot_names):
            if name is not None:
                acts[name] = acts.get(name, torch.zeros_like(self.activations[0].cpu())) + self.activations[slot].cpu()
                routed[name] = routed.get(name, torch.zeros_like(self.routed[0].cpu())) + self.routed[slot].cpu()
        out = {}
        for name in acts:
            ckpt = self.checkpoints.get(name)
            if ckpt is None:
                continue
            layers, n = list(ckpt.config.adapted_layers), ckpt.config.num_loras
            out[name] = {
                "layers": layers,
                "activations": [acts[name][layer, :n].tolist() for layer in layers],
                "routed": [int(routed[name][layer]) for layer in layers],
            }
        return out

    @torch.inference_mode()
    def reset_counts(self) -> None:
        self.totals.clear()
        self.activations.zero_()
        self.routed.zero_()

    def stats(self) -> dict:
        """The page pool's counters and gauges, and which checkpoint is in which slot."""
        s = self.pages.stats()
        return {**s.__dict__, "slots": list(self.slot_names), "r_page": self.settings.r_page}


class PoolMLP(LlamaMLP):
    """LlamaMLP whose gate/up and down outputs get the pool's per-token delta (same parameter names as the base)."""

    def __init__(self, *, vllm_config: VllmConfig, layer: int, pool: AdapterPool, prefix: str):
        cfg = vllm_config.model_config.hf_config
        super().__init__(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         hidden_act=cfg.hidden_act, bias=getattr(cfg, "mlp_bias", False), prefix=prefix)  # fmt: skip
        self.layer = layer
        self.__dict__["pool"] = pool  # shared, owned by the model: not a submodule of every layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool, layer = self.pool, self.layer
        gate_up, _ = self.gate_up_proj(x)  # [T, 2I]
        active = {proj: pool.layer_active(layer, proj) for proj in PROJECTIONS}
        if any(active.values()):
            pages, coef = pool.route(layer, x)
            for half, proj in enumerate(("gate_proj", "up_proj")):
                if active[proj]:
                    pool.add_delta(gate_up, half * gate_up.shape[1] // 2, x, "gate_up", pages[:, half], coef)
        act = self.act_fn(gate_up)
        out, _ = self.down_proj(act)
        if active["down_proj"]:
            pool.add_delta(out, 0, act, "down", pages[:, 2], coef)
        return out


class PoolModelMixin(vllm_hooks.SlotEventsMixin):
    """Turns a vLLM CausalLM into its multi-checkpoint variant (mixed in before the base class)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        settings = RemixOverrides.from_hf_config(vllm_config.model_config.hf_config).pool
        if settings is None:
            raise ValueError("a RemixPool architecture needs hf_overrides {'remix': {'pool': {...}}}")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.remix_pool = AdapterPool(settings, vllm_config)
        vllm_hooks.add_anchor(self)
        layers_prefix = f"{maybe_prefix(prefix, 'model')}.layers"
        for layer, decoder in enumerate(self.model.layers):
            if hasattr(decoder, "mlp"):  # pipeline parallelism leaves other ranks' layers as placeholders
                decoder.mlp = PoolMLP(
                    vllm_config=vllm_config, layer=layer, pool=self.remix_pool, prefix=f"{layers_prefix}.{layer}.mlp"
                )

    def remix_on_slot(self, slot: int, adapter: LoRAModel | None) -> None:
        self.remix_pool.manager = self.lora_manager
        self.remix_pool.on_slot(slot, adapter)

    def remix_admit(self, ckpt: Checkpoint, name: str) -> None:
        self.remix_pool.admit(ckpt, name)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        num_tokens = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
        self.remix_pool.begin(vllm_hooks.token_slots(self.lora_manager, num_tokens))
        out = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        self.remix_pool.end()
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        return loaded | {name for name, _ in self.named_parameters() if name.startswith(vllm_hooks.ANCHOR)}

    # --- read by the worker extension (worker.py) ---

    def remix_counts(self) -> dict:
        return {"checkpoints": self.remix_pool.counts()}

    def remix_reset_counts(self) -> None:
        self.remix_pool.reset_counts()

    def remix_pool_stats(self) -> dict:
        return self.remix_pool.stats()

    def remix_pool_forget(self, name: str) -> bool:
        return self.remix_pool.forget(name)

    def remix_pool_trace(self, on: bool) -> list[dict[str, int]] | None:
        return self.remix_pool.set_trace(on)


class RemixPoolLlamaForCausalLM(PoolModelMixin, LlamaForCausalLM):
    """Llama (SmolLM2, Llama 2/3) serving many ReMix checkpoints from a paged pool."""


class RemixPoolMistralForCausalLM(PoolModelMixin, MistralForCausalLM):
    """Mistral serving many ReMix checkpoints."""


class RemixPoolQwen2ForCausalLM(PoolModelMixin, Qwen2ForCausalLM):
    """Qwen2 serving many ReMix checkpoints."""
