"""The training loss: per-example NLL of M routed passes, and the RLOO surrogate that trains the routers.

Shapes: B examples, M selections per example (docs/method.md, "Training"); the M passes of an example are rows
`b*M .. b*M+M-1` of one forward over B*M sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from remix_serve.reference import remix_mlps, routing_mode, sequence_log_q
from remix_serve.train.args import RouterKind
from remix_serve.train.data import IGNORE


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token NLL of each sequence's supervised tokens: logits `[S, T, V]`, labels `[S, T]` -> `[S]` float32.

    Position t predicts token t+1 (the HF causal-LM shift). Every sequence must have a supervised token.
    """
    target = labels[:, 1:]  # [S, T-1]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE, reduction="none")
    nll = nll.view_as(target)  # [S, T-1], 0 where ignored
    return nll.sum(-1) / (target != IGNORE).sum(-1)


def head_nll(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`sequence_nll` from the decoder's final hidden states `[S, T, D]`, running the LM head on supervised rows only.

    The head is the costliest matmul of a small model with a large vocabulary (SmolLM2: 576 x 49152), and most
    positions carry no loss, so only the rows that predict a label are projected. Same value as
    `sequence_nll(model(...).logits, labels)` up to float rounding. Returns `[S]` float32.
    """
    target = labels[:, 1:]  # [S, T-1]; position t predicts token t+1
    keep = target != IGNORE
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # [N, V], N = supervised tokens
    nll = F.cross_entropy(logits.float(), target[keep], reduction="none")  # [N]
    rows = keep.nonzero()[:, 0]  # [N] sequence of each supervised token
    per_seq = torch.zeros(target.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return per_seq / keep.sum(-1)


def model_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`head_nll` of a causal LM on a collated batch (input_ids, attention_mask, labels `[S, T]`) -> `[S]`."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    return head_nll(model, hidden, batch["labels"])


def repeated_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, M: int) -> torch.Tensor:
    """Final hidden states of every example repeated M times, `[B*M, T, D]` (rows b*M .. b*M+M-1 are example b).

    The decoder layers before the first adapted one are frozen and see no routing, so all M copies of an example
    compute the same thing there: those layers run once per example, and the rows are repeated just before the
    first adapted layer. This is the loop of transformers' `LlamaModel.forward` (transformers 5.19, pinned),
    split in two; other architectures (their masks differ) run the whole decoder on the repeated rows instead.
    """
    decoder = model.get_decoder()
    if type(decoder).__name__ != "LlamaModel":
        return decoder(
            input_ids=input_ids.repeat_interleave(M, 0), attention_mask=attention_mask.repeat_interleave(M, 0)
        )[0]
    from transformers.masking_utils import create_causal_mask

    first = min(remix_mlps(model))
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # [1, T]
    h = decoder.embed_tokens(input_ids)  # [B, T, D]
    rope = decoder.rotary_emb(h, position_ids=positions)
    for i, layer in enumerate(decoder.layers):
        if i == first:
            h, attention_mask = h.repeat_interleave(M, 0), attention_mask.repeat_interleave(M, 0)  # [B*M, T, ...]
        if i in (0, first):
            mask = create_causal_mask(decoder.config, h, attention_mask, None, position_ids=positions)
        h = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=positions)
    return decoder.norm(h)


def routed_losses(
    model: nn.Module, batch: dict[str, torch.Tensor], samples: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """M Gumbel-top-k routed passes of each example, as one forward over B*M sequences.

    Returns (losses `[B, M]`: per-pass mean token NLL L_bm, log_q `[B, M]`: log Q of each pass's selection,
    summed over adapted layers and non-padding tokens). Rows b*M .. b*M+M-1 of the forward are example b.
    """
    B, M = batch["input_ids"].shape[0], samples
    with routing_mode(model, "sample", generator):
        hidden = repeated_hidden(model, batch["input_ids"], batch["attention_mask"], M)  # [B*M, T, D]
        log_q = sequence_log_q(model, batch["attention_mask"].repeat_interleave(M, 0)).view(B, M)
    losses = head_nll(model, hidden, batch["labels"].repeat_interleave(M, 0)).view(B, M)
    return losses, log_q


def rloo_router_loss(losses: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """RLOO surrogate for the routers: `mean_b 1/(M-1) sum_m stopgrad(L_bm - Lbar_b) * log Q_bm`.

    Its gradient is the RLOO estimate of grad_P E[L] (docs/method.md). The leave-one-out baseline of pass m is the mean
    of the *other* M-1 passes; `L_m - mean_{j != m} L_j = M/(M-1) (L_m - Lbar)`, so averaging over m gives the
    1/(M-1) factor below. Centring on Lbar alone (the sample in its own baseline) would shrink the gradient by
    (M-1)/M: biased. The router input x is detached inside log Q (reference.RemixMLP.route), so this term
    reaches the routers P only, never the LoRAs or earlier layers.

    Args:
        losses: `[B, M]` per-pass mean token NLL L_bm (its graph is not used here).
        log_q: `[B, M]` Plackett-Luce log-probability of each pass's selection, summed over layers and tokens.

    Returns:
        scalar surrogate; its value is not a loss (its expectation is 0), only its gradient matters.
    """
    M = losses.shape[1]
    if M < 2:
        raise ValueError(f"RLOO needs M >= 2 selections per example, got M={M}")
    advantage = (losses - losses.mean(dim=1, keepdim=True)).detach()  # [B, M]
    return (advantage * log_q).sum(dim=1).mean() / (M - 1)


def batch_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    router: RouterKind,
    samples: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of one batch `[B, T]`: returns (objective to backprop, mean NLL, router term), scalars.

    remix: LoRAs get the pathwise gradient of mean_{b,m} L_bm through the sampled selections (the constant
    weights carry no gradient to the routers), routers the RLOO surrogate. softmax / lora: one deterministic
    top-k pass, plain backprop.
    """
    if router != "remix":
        nll = model_nll(model, batch).mean()
        return nll, nll, torch.zeros(())
    losses, log_q = routed_losses(model, batch, samples, generator)
    router_term = rloo_router_loss(losses, log_q)
    nll = losses.mean()
    return nll + router_term, nll, router_term
