"""The routing core: top-k ties, Gumbel-top-k vs Plackett-Luce, ESS, omega."""

import itertools
import math

import pytest
import torch

from remix_serve import routing


def test_topk_ties_pick_lowest_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    assert routing.topk_ids(logits, 2).tolist() == [[1, 2], [0, 1]]
    assert routing.topk_ids(logits, 4).tolist() == [[1, 2, 3, 0], [0, 1, 2, 3]]


def test_topk_orders_by_logit_and_keeps_leading_dims():
    logits = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    ids = routing.topk_ids(logits, 3)
    assert ids.shape == (3, 5, 3)
    assert torch.equal(logits.gather(-1, ids), logits.topk(3, dim=-1).values)


def test_router_logits_are_float32():
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    p = torch.randn(3, 6, dtype=torch.bfloat16)
    out = routing.router_logits(x, p)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.float() @ p.float().t())


def _all_selections(n: int, k: int) -> torch.Tensor:
    return torch.tensor(list(itertools.permutations(range(n), k)))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_plackett_luce_probabilities_of_all_ordered_selections_sum_to_one(k):
    logits = torch.tensor([0.3, -1.2, 2.0, 0.5])
    sel = _all_selections(4, k)
    logp = routing.plackett_luce_log_prob(logits.expand(len(sel), 4), sel)
    assert math.isclose(logp.exp().sum().item(), 1.0, rel_tol=1e-5)


def test_gumbel_topk_frequencies_match_plackett_luce():
    """n=4, k=2: the 12 ordered selections' empirical frequencies over 200k draws (fixed seed) are within
    0.004 absolute (about 4 standard errors at p=0.25) of the exact Plackett-Luce probabilities."""
    logits = torch.tensor([1.0, 0.2, -0.5, 0.8])
    draws = 200_000
    ids = routing.gumbel_topk_ids(logits.expand(draws, 4), 2, torch.Generator().manual_seed(1234))
    sel = _all_selections(4, 2)
    codes = ids[:, 0] * 4 + ids[:, 1]
    freq = torch.bincount(codes, minlength=16).double() / draws
    exact = routing.plackett_luce_log_prob(logits.expand(len(sel), 4), sel).exp().double()
    assert torch.all(ids[:, 0] != ids[:, 1]), "Gumbel-top-k drew a LoRA twice"
    for (i, j), p in zip(sel.tolist(), exact.tolist(), strict=True):
        assert abs(freq[i * 4 + j].item() - p) < 0.004, (i, j, freq[i * 4 + j].item(), p)


def test_plackett_luce_gradient_flows_to_logits():
    logits = torch.randn(5, 4, requires_grad=True)
    ids = routing.gumbel_topk_ids(logits.detach(), 2)
    routing.plackett_luce_log_prob(logits, ids).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_selection_weights_constant_and_softmax():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    ids = routing.topk_ids(logits, 2)  # [0, 2]
    assert routing.selection_weights(logits, ids, "constant").tolist() == [[1.0, 0.0, 1.0, 0.0]]
    w = routing.selection_weights(logits, ids, "softmax")
    q = torch.softmax(logits, -1)[0]
    expected = [q[0] / (q[0] + q[2]), 0.0, q[2] / (q[0] + q[2]), 0.0]
    torch.testing.assert_close(w[0], torch.tensor(expected))


def test_ess_extremes_and_counts():
    assert routing.ess(torch.tensor([5.0, 0.0, 0.0, 0.0])).item() == 1.0
    assert routing.ess(torch.tensor([3.0, 3.0, 3.0, 3.0])).item() == pytest.approx(4.0)
    assert routing.ess(torch.tensor([1.0, 1.0, 0.0, 0.0])).item() == pytest.approx(2.0)
    assert routing.ess(torch.zeros(4)).item() == 0.0


def test_omega_rules():
    assert routing.omega(16, 2, 8, "lora") == 1.0
    assert routing.omega(16, 2, 8, "rslora") == 4.0
    assert routing.omega(16, 2, 8, "lora", weighting="softmax") == 2.0
    with pytest.raises(ValueError, match="omega_rule"):
        routing.omega(16, 2, 8, "bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k >= 1"):
        routing.omega(16, 0, 8, "lora")
