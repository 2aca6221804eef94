"""The RLOO router estimator against the exact gradient of the expected loss, by enumerating every selection.

Problem: the tiny base, one adapted layer, n = 4, k = 2, two 3-token examples. With one adapted layer the router
input does not depend on the selection, so E[L_b] = sum_S Q_b(S) L_b(S) over the 6^3 joint per-token sets S.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from remix_serve import bases, reference, routing, tiny
from remix_serve.train.data import IGNORE
from remix_serve.train.loss import batch_loss, rloo_router_loss, routed_losses, sequence_nll

N, K, LAYER, DRAWS = 4, 2, 1, 32768  # DRAWS: routed sequences per example (DRAWS / M estimates)
TOKENS = torch.tensor([[5, 77, 140], [201, 9, 33]])  # [B=2, T=3]
REL_BOUND = 0.1  # the correct estimator must land within 10% of the exact gradient (norm of the difference)


@pytest.fixture(scope="module")
def model(tiny_base: Path):
    return build_model(tiny_base)


def build_model(tiny_base: Path):
    """The tiny base with one adapted layer, a random bank (B != 0) and a router with moderate preferences."""
    torch.manual_seed(0)
    fp = bases.base_fingerprint(str(tiny_base))
    config = tiny.tiny_config(str(tiny_base), fp, num_loras=N, top_k=K, layers=[LAYER])
    m = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    reference.apply_remix(m, config, tiny.random_adapter(config, seed=3, scale=0.5))
    mlp = reference.remix_mlps(m)[LAYER]
    # A router whose logits are about N(0, 1.5^2) on these tokens: clear preferences, but every set has mass.
    seen = []
    hook = mlp.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    with torch.no_grad():
        m(input_ids=TOKENS)
        hook.remove()
        scale = seen[0].norm(dim=-1).mean()
        mlp.router.copy_(torch.randn(mlp.router.shape, generator=torch.Generator().manual_seed(5)) * 1.5 / scale)
    for p in [mlp.router, *mlp.lora_A.values(), *mlp.lora_B.values()]:
        p.requires_grad_(True)
    return m


def _batch(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    labels = tokens.clone()
    labels[:, 0] = IGNORE
    return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": labels}


def exact_router_grad(model) -> torch.Tensor:
    """grad_P of mean_b sum_S Q_b(S) L_b(S), enumerating all C(4,2)^3 = 216 per-token sets per example."""
    mlp = reference.remix_mlps(model)[LAYER]
    sets = list(itertools.combinations(range(N), K))  # 6 unordered sets per token
    joint = list(itertools.product(range(len(sets)), repeat=TOKENS.shape[1]))  # 216 joint choices
    B, T = TOKENS.shape
    grads = torch.zeros_like(mlp.router)
    for b in range(B):
        rows = _batch(TOKENS[b : b + 1].repeat(len(joint), 1))
        ids = torch.tensor([[sets[s] for s in choice] for choice in joint])  # [S, T, k]
        captured: dict[str, torch.Tensor] = {}

        def forced(x: torch.Tensor, ids: torch.Tensor = ids, captured: dict = captured) -> torch.Tensor:
            captured.setdefault("x", x.detach())
            return routing.selection_weights(routing.router_logits(x, mlp.router), ids, "constant")

        mlp.route = forced  # force selection S on each row (an instance attribute shadows the method)
        try:
            with torch.no_grad():
                losses = sequence_nll(model(input_ids=rows["input_ids"]).logits, rows["labels"])  # [S]
        finally:
            del mlp.route
        logits = routing.router_logits(captured["x"][0], mlp.router)  # [T, n]; x independent of S here
        # log Q(set) = log(PL(i, j) + PL(j, i)): both draw orders give the same set.
        set_ids = torch.tensor(sets)  # [6, k]
        pl = torch.stack(
            [
                routing.plackett_luce_log_prob(logits[:, None, :].expand(T, len(sets), N), set_ids.expand(T, -1, -1)),
                routing.plackett_luce_log_prob(
                    logits[:, None, :].expand(T, len(sets), N), set_ids.flip(-1).expand(T, -1, -1)
                ),
            ]  # fmt: skip
        ).logsumexp(0)  # [T, 6]
        assert torch.allclose(pl.exp().sum(-1), torch.ones(T), atol=1e-5), "set probabilities must sum to 1"
        choice = torch.tensor(joint)  # [S, T]
        log_q = pl.gather(1, choice.t()).t().sum(-1)  # [S]
        expected = (log_q.exp() * losses).sum() / B
        grads += torch.autograd.grad(expected, mlp.router)[0]
    return grads


def wrong_router_loss(losses: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Deliberately biased: the sample sits in its own baseline and there is no M/(M-1) correction."""
    advantage = (losses - losses.mean(dim=1, keepdim=True)).detach()
    return (advantage * log_q).sum(dim=1).mean() / losses.shape[1]


def _rel_err(est: torch.Tensor, exact: torch.Tensor) -> float:
    return float((est - exact).norm() / exact.norm())


@pytest.mark.parametrize("samples", [2, 4])
def test_rloo_matches_exact_gradient_and_the_biased_variant_does_not(model, samples: int):
    router = reference.remix_mlps(model)[LAYER].router
    exact = exact_router_grad(model)
    assert exact.norm() > 1e-3
    # DRAWS independent copies of each example = DRAWS independent RLOO estimates, averaged over b by the loss.
    batch = _batch(TOKENS.repeat(DRAWS // samples, 1))
    gen = torch.Generator().manual_seed(samples)
    losses, log_q = routed_losses(model, batch, samples, gen)
    good = torch.autograd.grad(rloo_router_loss(losses, log_q), router, retain_graph=True)[0]
    bad = torch.autograd.grad(wrong_router_loss(losses, log_q), router)[0]
    assert _rel_err(good, exact) < REL_BOUND, f"RLOO off by {_rel_err(good, exact):.3f}"
    assert _rel_err(bad, exact) > REL_BOUND, f"biased variant passed ({_rel_err(bad, exact):.3f})"


def test_training_objective_gives_the_router_exactly_the_rloo_gradient(model):
    """batch_loss = mean NLL + RLOO term: with constant weights the NLL part adds nothing to the router."""
    router = reference.remix_mlps(model)[LAYER].router
    batch = _batch(TOKENS)
    objective, _, _ = batch_loss(model, batch, "remix", 4, torch.Generator().manual_seed(0))
    total = torch.autograd.grad(objective, router)[0]
    losses, log_q = routed_losses(model, batch, 4, torch.Generator().manual_seed(0))
    rloo_only = torch.autograd.grad(rloo_router_loss(losses, log_q), router)[0]
    torch.testing.assert_close(total, rloo_only)


def test_router_term_reaches_only_the_router(model):
    mlp = reference.remix_mlps(model)[LAYER]
    losses, log_q = routed_losses(model, _batch(TOKENS), 4, torch.Generator().manual_seed(1))
    params = [mlp.router, *mlp.lora_A.values(), *mlp.lora_B.values()]
    grads = torch.autograd.grad(rloo_router_loss(losses, log_q), params, allow_unused=True)
    assert grads[0].abs().sum() > 0
    assert all(g is None or not g.any() for g in grads[1:]), "the RLOO term leaked into the LoRA bank"


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="M >= 2"):
        rloo_router_loss(torch.zeros(3, 1), torch.zeros(3, 1))


def test_batched_passes_match_a_plain_forward_of_repeated_rows(model):
    """routed_losses shares the frozen layers before the first adapted one across the M copies; with the same
    Gumbel draws it must give what a plain forward over B*M repeated rows gives (right padding included)."""
    ids = torch.tensor([[5, 77, 140, 9, 2, 2], [201, 9, 33, 41, 17, 60]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :2] = IGNORE
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    M = 3
    losses, log_q = routed_losses(model, batch, M, torch.Generator().manual_seed(7))
    rows = {k: v.repeat_interleave(M, 0) for k, v in batch.items()}
    with torch.no_grad(), reference.routing_mode(model, "sample", torch.Generator().manual_seed(7)):
        logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
        plain_log_q = reference.sequence_log_q(model, rows["attention_mask"]).view(2, M)
    torch.testing.assert_close(losses.detach(), sequence_nll(logits, rows["labels"]).view(2, M), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_q.detach(), plain_log_q)
