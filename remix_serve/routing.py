"""The ReMix routing math, the one place it lives.

Training (`train/`), the HF reference model (`reference.py`) and the vLLM plugin (`vllm_plugin/`) all call these
functions; none re-implements them. Pure functions over tensors: no I/O, no module state, torch only.

Notation (docs/method.md): T tokens (any leading dims are allowed where a docstring says `[..., n]`),
D the router input width, n LoRAs in a bank, k LoRAs selected per token, r the LoRA rank.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

OmegaRule = Literal["lora", "rslora"]
Weighting = Literal["constant", "softmax"]


def router_logits(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """Router logits `P x`, always in float32 (docs/method.md: q = softmax(P x) is computed in float32).

    Args:
        x: router input (the MLP input), `[..., D]`, any float dtype.
        router_weight: `P`, `[n, D]`.

    Returns:
        logits `[..., n]`, float32.
    """
    return x.float() @ router_weight.float().t()  # [..., n]


def topk_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic top-k: the k largest logits per token, ordered by logit, ties to the lowest index.

    The tie rule matters: the reference model and the vLLM plugin must pick the same LoRAs for the same
    logits, and `torch.topk` makes no promise about ties. A stable descending sort keeps equal logits in
    index order, so the lowest index always wins. Static shapes and no host sync, so it is CUDA-graph safe.

    Args:
        logits: `[..., n]` router logits (or probabilities: softmax is monotone).
        k: number of LoRAs to select, 1 <= k <= n.

    Returns:
        ids `[..., k]`, int64.
    """
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices  # [..., n]
    return order[..., :k]


def gumbel_topk_ids(logits: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw k distinct LoRAs per token from q = softmax(logits) without replacement, in draw order.

    Gumbel-top-k: the top-k of `log q + G` (G i.i.d. standard Gumbel) is distributed as k sequential draws
    without replacement from q (Plackett-Luce), so one `topk` replaces a loop over k.

    Args:
        logits: `[..., n]` router logits.
        k: selection size.
        generator: optional RNG for reproducible draws.

    Returns:
        ids `[..., k]`, int64, ordered by draw (first draw first).
    """
    log_q = F.log_softmax(logits.float(), dim=-1)  # [..., n]
    u = torch.rand(log_q.shape, generator=generator, device=log_q.device, dtype=log_q.dtype)
    # Clamp away from 0 and 1 so that -log(-log(u)) stays finite.
    u = u.clamp(torch.finfo(u.dtype).tiny, 1.0 - torch.finfo(u.dtype).eps)
    gumbel = -torch.log(-torch.log(u))
    return torch.topk(log_q + gumbel, k, dim=-1, sorted=True).indices  # [..., k]


def plackett_luce_log_prob(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of an ordered selection drawn without replacement from q = softmax(logits).

    `log Q = sum_j [ log q_{i_j} - log(1 - sum_{j'<j} q_{i_j'}) ]` (docs/method.md, "Training", step 2), per token.

    Args:
        logits: `[..., n]` router logits (float32 is used inside).
        ids: `[..., k]` the ordered selection.

    Returns:
        `[...]` float32 log-probabilities, differentiable with respect to `logits`.
    """
    log_q = F.log_softmax(logits.float(), dim=-1)  # [..., n]
    log_q_sel = log_q.gather(-1, ids)  # [..., k]
    q_sel = log_q_sel.exp()
    taken_before = torch.cumsum(q_sel, dim=-1) - q_sel  # [..., k] mass removed before draw j
    # 1 - taken_before > 0 whenever ids are distinct; the clamp only guards rounding at q ~ 1.
    remaining = (1.0 - taken_before).clamp_min(torch.finfo(q_sel.dtype).tiny)
    return (log_q_sel - torch.log(remaining)).sum(dim=-1)


def selection_mask(ids: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-hot mask of a selection: `[..., k]` ids -> `[..., n]` with 1 on selected LoRAs, 0 elsewhere."""
    mask = torch.zeros(*ids.shape[:-1], n, dtype=dtype, device=ids.device)
    return mask.scatter_(-1, ids, 1.0)


def selection_weights(
    logits: torch.Tensor, ids: torch.Tensor, weighting: Weighting, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-LoRA mixing weights of a selection, dense over the bank: `[..., n]`.

    `constant` (ReMix): 1 on every selected LoRA (omega is applied separately, folded into B when serving).
    `softmax` (MixLoRA-style baseline): `q_i / sum_{j in I} q_j` on selected LoRAs, differentiable with
    respect to `logits`. Unselected LoRAs get 0 in both cases.
    """
    n = logits.shape[-1]
    if weighting == "constant":
        return selection_mask(ids, n, dtype)
    if weighting == "softmax":
        q = torch.softmax(logits.float(), dim=-1)  # [..., n]
        q_sel = q.gather(-1, ids)  # [..., k]
        w_sel = q_sel / q_sel.sum(dim=-1, keepdim=True)
        dense = torch.zeros_like(q)
        return dense.scatter(-1, ids, w_sel).to(dtype)
    raise ValueError(f"unknown weighting {weighting!r}; expected 'constant' or 'softmax'")


def per_token_selection(
    logits: torch.Tensor, k: torch.Tensor, softmax: torch.Tensor, k_max: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k and selection weights when every token brings its own bank (the multi-checkpoint pool).

    Each token's logits cover its checkpoint's n LoRAs, padded to `n_max` with -inf; its k and weighting come with
    it. The picks and weights equal `topk_ids` and `selection_weights` on the unpadded logits (the padding sorts
    last and has zero softmax mass), so every served checkpoint routes exactly as it does alone.

    Args:
        logits: `[T, n_max]` float32, -inf past each token's n.
        k: `[T]` int64, each token's k (0 = no LoRA, e.g. a base-model token).
        softmax: `[T]` bool, True where the token's checkpoint uses `softmax` weighting, else `constant`.
        k_max: picks computed per token, at least max(k).

    Returns:
        ids `[T, k_max]` int64 (picks past a token's k are meaningless) and weights `[T, k_max]` float32: 1 or the
        renormalised softmax weight on the first k picks, 0 past them.
    """
    ids = topk_ids(logits, k_max)  # [T, k_max]
    used = torch.arange(k_max, device=logits.device)[None, :] < k[:, None]  # [T, k_max]
    q_sel = torch.softmax(logits, dim=-1).gather(-1, ids) * used
    soft = q_sel / q_sel.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(q_sel.dtype).tiny)
    return ids, torch.where(softmax[:, None], soft, used.float())


def ess(p: torch.Tensor) -> torch.Tensor:
    """Effective support size `(sum p)^2 / sum p^2` over the last dim: 1 = all mass on one entry, n = even.

    Accepts unnormalised non-negative weights (usage counts); an all-zero row gives 0.
    """
    p = p.double()
    total_sq = p.sum(dim=-1) ** 2
    sum_sq = (p * p).sum(dim=-1)
    return torch.where(sum_sq > 0, total_sq / sum_sq.clamp_min(1e-300), torch.zeros_like(sum_sq))


def omega(alpha: float, k: int, r: int, rule: OmegaRule, weighting: Weighting = "constant") -> float:
    """The constant weight of every selected LoRA: `alpha/(k r)` ("lora") or `alpha/sqrt(k r)` ("rslora").

    For `softmax` checkpoints the learned weights already sum to 1 over the k picks, so the scale is that of
    one LoRA (k = 1 in the formula), as in MixLoRA. Raises ValueError on a non-positive k or r.
    """
    if k < 1 or r < 1:
        raise ValueError(f"omega needs k >= 1 and r >= 1, got k={k}, r={r}")
    k_eff = k if weighting == "constant" else 1
    if rule == "lora":
        return alpha / (k_eff * r)
    if rule == "rslora":
        return alpha / math.sqrt(k_eff * r)
    raise ValueError(f"unknown omega_rule {rule!r}; expected 'lora' or 'rslora'")
