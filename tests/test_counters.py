"""RoutingCounters' arithmetic without an engine (the engine-level invariant is tested in test_plugin.py)."""

from __future__ import annotations

import pytest
import torch

from remix_serve.vllm_plugin import counters


@pytest.fixture
def real_rows(monkeypatch: pytest.MonkeyPatch):
    """Stand in for vLLM's forward context: which rows of the next forward are real tokens."""
    rows: dict[str, torch.Tensor | None] = {"mask": None}
    monkeypatch.setattr(counters, "real_token_mask", lambda num_tokens: rows["mask"])
    return rows


def test_counts_real_tokens_per_layer_and_lora(real_rows):
    c = counters.RoutingCounters([3, 5], num_loras=4, device=torch.device("cpu"))
    real_rows["mask"] = torch.tensor([True, True, False])  # the last row is padding
    for _ in range(2):
        c.begin(3)
        c.add(0, torch.tensor([[0, 1], [1, 2], [3, 3]]))
        c.add(1, torch.tensor([[2, 3], [2, 0], [1, 1]]))
        c.end()
    assert c.snapshot() == {"layers": [3, 5], "activations": [[2, 4, 2, 0], [2, 0, 4, 2]], "routed": [4, 4]}


def test_dummy_forwards_count_nothing_and_reset_clears(real_rows):
    c = counters.RoutingCounters([0], num_loras=2, device=torch.device("cpu"))
    c.begin(2)  # no forward context / no attention metadata: a profiling or warm-up run
    c.add(0, torch.tensor([[0], [1]]))
    c.end()
    assert c.snapshot()["routed"] == [0]
    real_rows["mask"] = torch.tensor([True, True])
    c.begin(2)
    c.add(0, torch.tensor([[0], [0]]))
    c.end()
    assert c.snapshot()["activations"] == [[2, 0]]
    c.reset()
    assert c.snapshot() == {"layers": [0], "activations": [[0, 0]], "routed": [0]}


def test_a_rank_without_adapted_layers_counts_routed_tokens_only(real_rows):
    c = counters.RoutingCounters([], num_loras=2, device=torch.device("cpu"))
    real_rows["mask"] = torch.tensor([True, False, True])
    c.begin(3)
    c.end()
    assert c.snapshot() == {"layers": [], "activations": [], "routed": []}
    assert int(c.routed) == 2


def test_recording_keeps_the_ids_of_real_tokens(real_rows):
    c = counters.RoutingCounters([7], num_loras=3, device=torch.device("cpu"))
    real_rows["mask"] = torch.tensor([False, True])
    c.record(True)
    c.begin(2)
    c.add(0, torch.tensor([[2, 0], [1, 2]]))
    c.end()
    assert c.record(False) == {7: [[1, 2]]}
