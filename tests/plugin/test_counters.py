"""RoutingCounters' arithmetic without an engine (the engine-level invariant is tested in test_plugin.py)."""

from __future__ import annotations

import pytest
import torch

from remix_serve.vllm_plugin import counters


@pytest.fixture
def real_rows(monkeypatch: pytest.MonkeyPatch):
    """Stand in for vLLM's forward context: which rows of the next forward are real tokens."""
    rows: dict[str, torch.Tensor | None] = {"mask": None}
    monkeypatch.setattr(counters, "real_token_mask", lambda num_tokens, device: rows["mask"])
    return rows


def test_counts_real_tokens_per_layer_and_lora(real_rows):
    c = counters.RoutingCounters([3, 5], num_loras=4, max_tokens=8, device=torch.device("cpu"))
    real_rows["mask"] = torch.tensor([True, True, False])  # the last row is padding
    for _ in range(2):
        c.begin(3)
        c.add(0, torch.tensor([[0, 1], [1, 2], [3, 3]]))
        c.add(1, torch.tensor([[2, 3], [2, 0], [1, 1]]))
        c.end()
    assert c.snapshot() == {"layers": [3, 5], "activations": [[2, 4, 2, 0], [2, 0, 4, 2]], "routed": [4, 4]}


def test_dummy_forwards_count_nothing_and_reset_clears(real_rows):
    c = counters.RoutingCounters([0], num_loras=2, max_tokens=8, device=torch.device("cpu"))
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
    c = counters.RoutingCounters([], num_loras=2, max_tokens=8, device=torch.device("cpu"))
    real_rows["mask"] = torch.tensor([True, False, True])
    c.begin(3)
    c.end()
    assert c.snapshot() == {"layers": [], "activations": [], "routed": []}
    assert int(c.routed) == 2


def test_recording_keeps_the_ids_of_real_tokens(real_rows):
    c = counters.RoutingCounters([7], num_loras=3, max_tokens=8, device=torch.device("cpu"))
    real_rows["mask"] = torch.tensor([False, True])
    c.record(True)
    c.begin(2)
    c.add(0, torch.tensor([[2, 0], [1, 2]]))
    c.end()
    assert c.record(False) == {7: [[1, 2]]}


def test_a_graph_compiled_once_counts_every_call_and_never_a_padding_row(real_rows):
    """torch.compile runs a layer's Python only while tracing; the compiled graph must still count each call."""
    from torch._dynamo.testing import CompileCounterWithBackend

    c = counters.RoutingCounters([0, 4], num_loras=5, max_tokens=64, device=torch.device("cpu"))

    def decoder(ids0: torch.Tensor, ids1: torch.Tensor) -> torch.Tensor:  # two adapted layers
        c.add(0, ids0)
        c.add(1, ids1)
        return ids0 + 1

    counter = CompileCounterWithBackend("inductor")
    fn = torch.compile(decoder, backend=counter, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(0)
    expected, routed = torch.zeros(2, 5, dtype=torch.int64), 0
    for step, T in enumerate([3, 9, 2, 40, 9, 17, 2]):  # not 1: Dynamo specializes size 1
        ids = [torch.randint(0, 5, (T, 2), generator=g) for _ in range(2)]
        mask = torch.rand(T, generator=g) > 0.3
        real_rows["mask"] = None if step == 2 else mask  # step 2: a dummy forward, nothing counts
        c.begin(T)
        fn(*ids)
        c.end()
        if step != 2:
            routed += int(mask.sum())
            for layer in range(2):
                expected[layer] += torch.bincount(ids[layer][mask].reshape(-1), minlength=5)
    assert counter.frame_count == 1
    assert c.snapshot() == {"layers": [0, 4], "activations": expected.tolist(), "routed": [routed, routed]}
