"""Per-LoRA activation counters kept in the worker: which tokens count, and how they are added up.

Everything a step does to the counters is a tensor op on buffers allocated once, so they count correctly eager,
traced once by torch.compile (whose graph never runs a layer's Python again) and replayed from a CUDA graph
(which runs no Python at all). `begin` writes this forward's real-token mask into a persistent buffer from vLLM's
persistent padding mask. Compiled, each layer's `add` is one custom op that adds its selections, weighted by that
mask, into the int64 totals; eager, `add` only keeps the layer's ids and `end` counts every layer at once with
one scatter-add, since each PyTorch op costs 10-20 us on a small CPU after a layer's GEMMs.
"""

from __future__ import annotations

import torch
from vllm.forward_context import get_forward_context, is_forward_context_available


def real_token_mask(num_tokens: int, device: torch.device) -> torch.Tensor | None:
    """`[T]` bool mask of the real scheduled tokens of this forward, or None when nothing should count.

    vLLM runs dummy forwards before the first request (memory profiling, compile warm-up, CUDA-graph capture)
    and pads batches up to captured sizes. Dummy runs carry no attention metadata, except graph captures,
    which mark every row as padding; real steps mark padding rows in `is_padding`. Counting only non-padding
    rows of forwards that have attention metadata therefore counts exactly the scheduled tokens. `is_padding`
    is a persistent buffer of the model runner (V1 and V2) that it refills before every step, so a CUDA graph
    captured with the op that reads it reads the replayed step's mask.
    """
    if not is_forward_context_available():
        return None
    ctx = get_forward_context()
    if not ctx.attn_metadata:
        return None
    if ctx.is_padding is None:  # on the device: a host-to-device copy cannot be captured in a CUDA graph
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
    return ~ctx.is_padding[:num_tokens]


@torch.library.custom_op("remix::count_routes", mutates_args=("activations",))
def count_routes(activations: torch.Tensor, slot: int, ids: torch.Tensor, real: torch.Tensor) -> None:
    """`activations[slot, i] += ` the real tokens among `ids [T, k]` that picked LoRA i (`real [>=T]`, int64 0/1).

    A custom op so that torch.compile keeps it as one opaque node that mutates the persistent totals (rather
    than functionalizing a buffer update), and CUDA graphs capture its kernel.
    """
    T, k = ids.shape
    activations[slot].index_add_(0, ids.reshape(-1), real[:T, None].expand(T, k).reshape(-1))


@count_routes.register_fake
def _(activations: torch.Tensor, slot: int, ids: torch.Tensor, real: torch.Tensor) -> None:
    return None


def count_picks(
    activations: torch.Tensor,
    routed: torch.Tensor,
    layers: torch.Tensor,
    slots: torch.Tensor,
    ids: torch.Tensor,
    real: torch.Tensor,
) -> None:
    """The multi-checkpoint pool's counts: per (slot, layer), the real tokens that picked each LoRA and that were
    routed. Static shapes (unused picks and padding add 0), so it also runs inside a compiled graph.

    Args:
        activations: `[S, L, n_max]` int64 totals; routed: `[S, L]` int64 totals.
        layers: `[Lp]` int64, the layer of each row of `ids`.
        slots: `[>=T]` int64 each token's slot; real: `[>=T]` int64, 1 for a real token.
        ids: `[Lp, T, k_max]` int64 picks, -1 past a token's k.
    """
    Lp, T, k_max = ids.shape
    L, n_max = activations.shape[1], activations.shape[2]
    used = (ids >= 0) & real[:T].bool()[None, :, None]  # [Lp, T, k_max]
    cell = slots[:T][None, :] * L + layers[:, None]  # [Lp, T]: the (slot, layer) row of each token
    flat = cell[:, :, None] * n_max + ids.clamp(min=0)
    activations.view(-1).index_add_(0, flat.reshape(-1), used.reshape(-1).to(activations.dtype))
    routed.view(-1).index_add_(0, cell.reshape(-1), used.any(dim=2).reshape(-1).to(routed.dtype))


@torch.library.custom_op("remix::count_pool_routes", mutates_args=("activations", "routed"))
def count_pool_routes(
    activations: torch.Tensor,
    routed: torch.Tensor,
    layer: int,
    slots: torch.Tensor,
    ids: torch.Tensor,
    real: torch.Tensor,
) -> None:
    """`count_picks` for one layer, as one opaque node of a compiled graph that mutates the persistent totals."""
    count_picks(activations, routed, torch.full((1,), layer, device=ids.device), slots, ids[None], real)


@count_pool_routes.register_fake
def _(
    activations: torch.Tensor,
    routed: torch.Tensor,
    layer: int,
    slots: torch.Tensor,
    ids: torch.Tensor,
    real: torch.Tensor,
) -> None:
    return None


class RoutingCounters:
    """Cumulative routing counts of one model: `[L, n]` tokens per LoRA and the tokens that were routed.

    `begin(T)` and `end()` run once per forward outside the compiled decoder (in the CausalLM's forward);
    `add(slot, ids)` runs in each adapted layer, inside it. Counts are int64 throughout.
    """

    def __init__(self, layers: list[int], num_loras: int, max_tokens: int, device: torch.device):
        self.layers = layers
        self.activations = torch.zeros(len(layers), num_loras, dtype=torch.int64, device=device)
        self.routed = torch.zeros((), dtype=torch.int64, device=device)
        # 1 for the real tokens of the forward in progress, 0 for padding rows and dummy forwards
        self.real = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.pending: list[torch.Tensor] = []  # eager: ids [T, k] of each layer slot so far, this forward
        self.recorded: dict[int, list[torch.Tensor]] | None = None  # layer -> ids [T_real, k] per forward

    def begin(self, num_tokens: int) -> None:
        if num_tokens > self.real.numel():
            raise ValueError(f"a forward of {num_tokens} tokens exceeds max_num_batched_tokens={self.real.numel()}")
        real = self.real[:num_tokens]
        mask = real_token_mask(num_tokens, real.device)
        if mask is None:
            real.zero_()
        else:
            real.copy_(mask)
        self.routed.add_(real.sum())
        self.pending = []

    def add(self, slot: int, ids: torch.Tensor) -> None:
        """Count one layer's selection, `ids [T, k]`, for this forward's real tokens (slots come in order)."""
        if torch.compiler.is_compiling():  # evaluated at trace time: the graph keeps the op
            torch.ops.remix.count_routes(self.activations, slot, ids, self.real)
            return
        self.pending.append(ids)
        if self.recorded is not None:  # debugging aid: a host sync per layer, off by default
            self.recorded[self.layers[slot]].append(ids[self.real[: ids.shape[0]].bool()].cpu())

    def end(self) -> None:
        """Eager forwards: count the ids that `add` kept, every layer in one scatter-add."""
        if not self.pending:  # compiled (the layers counted), or a rank without adapted layers
            return
        ids = torch.stack(self.pending)  # [L, T, k]
        L, T, k = ids.shape
        real = self.real[:T, None].expand(T, k).reshape(1, T * k).expand(L, T * k)  # each pick of a real token: 1
        self.activations.scatter_add_(1, ids.view(L, T * k), real)
        self.pending = []

    def snapshot(self) -> dict[str, list]:
        """{"layers": [...], "activations": [[n] per layer], "routed": [tokens per layer]} as plain lists."""
        routed = int(self.routed.item())
        return {
            "layers": list(self.layers),
            "activations": self.activations.tolist(),
            "routed": [routed] * len(self.layers),
        }

    def reset(self) -> None:
        self.activations.zero_()
        self.routed.zero_()

    def record(self, on: bool) -> dict[int, list[list[int]]] | None:
        """Start (on=True) or stop recording the selected ids; stopping returns {layer: [[ids of a token], ...]}.

        Recording runs Python in each layer, so it needs an eager engine; the model refuses it when compiled.
        """
        if on:
            self.recorded = {layer: [] for layer in self.layers}
            return None
        out = {layer: torch.cat(ids).tolist() if ids else [] for layer, ids in (self.recorded or {}).items()}
        self.recorded = None
        return out
