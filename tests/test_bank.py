"""The stacked bank op: equal to a per-token loop over the selected LoRAs, and to itself when sharded for TP."""

from __future__ import annotations

import pytest
import torch

from remix_serve import routing
from remix_serve.vllm_plugin import bank

N, K, R, D, OUT, T = 4, 2, 3, 12, 10, 9


@pytest.fixture
def parts():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(N, R, D, generator=g),  # lora_A
        torch.randn(N, OUT, R, generator=g),  # lora_B
        torch.randn(T, D, generator=g),  # x
        torch.randn(T, N, generator=g),  # router logits
    )


def per_token_loop(lora_A, lora_B, x, ids, w, omega):
    out = torch.zeros(x.shape[0], lora_B.shape[1])
    for t in range(x.shape[0]):
        for i in ids[t].tolist():
            out[t] += omega * w[t, i] * (lora_B[i] @ (lora_A[i] @ x[t]))
    return out


@pytest.mark.parametrize("weighting", ["constant", "softmax"])
def test_bank_delta_equals_per_token_loop(parts, weighting):
    lora_A, lora_B, x, logits = parts
    ids = routing.topk_ids(logits, K)
    w = routing.selection_weights(logits, ids, weighting)
    a_all, b_all = bank.stack_bank(lora_A, lora_B, omega=0.7)
    got = bank.bank_delta(x, a_all, b_all, w, R)
    torch.testing.assert_close(got, per_token_loop(lora_A, lora_B, x, ids, w, 0.7), rtol=1e-5, atol=1e-5)


def test_shared_input_banks_stack_into_one_shrink(parts):
    lora_A, lora_B, x, logits = parts
    w = routing.selection_mask(routing.topk_ids(logits, K), N)
    a1, _ = bank.stack_bank(lora_A, lora_B, 1.0)
    a2, _ = bank.stack_bank(lora_A.flip(0), lora_B, 1.0)
    h = bank.bank_shrink(x, torch.cat([a1, a2]), w, R)
    torch.testing.assert_close(h[:, : N * R], bank.bank_shrink(x, a1, w, R))
    torch.testing.assert_close(h[:, N * R :], bank.bank_shrink(x, a2, w, R))


@pytest.mark.parametrize("world", [2, 5])
def test_column_parallel_shards_concatenate_to_the_full_delta(parts, world):
    lora_A, lora_B, x, logits = parts
    w = routing.selection_mask(routing.topk_ids(logits, K), N)
    a_all, b_all = bank.stack_bank(lora_A, lora_B, 0.5)
    full = bank.bank_delta(x, a_all, b_all, w, R)
    shards = [bank.bank_delta(x, *bank.shard_bank(a_all, b_all, "column", rk, world), w, R) for rk in range(world)]
    torch.testing.assert_close(torch.cat(shards, dim=1), full)


@pytest.mark.parametrize("world", [2, 3])
def test_row_parallel_partial_deltas_sum_to_the_full_delta(parts, world):
    """down_proj: each rank sees a slice of the input; the partial deltas add up (vLLM's all-reduce)."""
    lora_A, lora_B, x, logits = parts
    w = routing.selection_mask(routing.topk_ids(logits, K), N)
    a_all, b_all = bank.stack_bank(lora_A, lora_B, 0.5)
    full = bank.bank_delta(x, a_all, b_all, w, R)
    cols = D // world
    partial = [
        bank.bank_delta(x[:, rk * cols : (rk + 1) * cols], *bank.shard_bank(a_all, b_all, "row", rk, world), w, R)
        for rk in range(world)
    ]
    torch.testing.assert_close(torch.stack(partial).sum(0), full, rtol=1e-5, atol=1e-5)
