"""The stacked bank math: equal to a per-token loop over the selected LoRAs, also when sharded for TP.

The plugin loads B of gate/up through ColumnParallelLinear (rows split across ranks) and A of down through
RowParallelLinear (columns split, partial sums added before vLLM's all-reduce); these tests split the stacked bank
the same way, for more ranks than a 2-core host can run, and compare with the unsharded result. A real two-rank
engine is tested in tests/plugin/test_plugin.py.
"""

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


def delta(x, a_all, b_all, w):
    """The plugin's computation: shrink GEMM, mask, expand GEMM."""
    return bank.mask_blocks(x @ a_all.t(), w, R) @ b_all.t()


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
    expected = per_token_loop(lora_A, lora_B, x, ids, w, 0.7)
    torch.testing.assert_close(delta(x, a_all, b_all, w), expected, rtol=1e-5, atol=1e-5)


def test_shared_input_banks_stack_into_one_shrink(parts):
    lora_A, lora_B, x, logits = parts
    w = routing.selection_mask(routing.topk_ids(logits, K), N)
    a1, _ = bank.stack_bank(lora_A, lora_B, 1.0)
    a2, _ = bank.stack_bank(lora_A.flip(0), lora_B, 1.0)
    h = bank.mask_blocks(x @ torch.cat([a1, a2]).t(), w, R)
    torch.testing.assert_close(h[:, : N * R], bank.mask_blocks(x @ a1.t(), w, R))
    torch.testing.assert_close(h[:, N * R :], bank.mask_blocks(x @ a2.t(), w, R))


@pytest.mark.parametrize("world", [2, 5])
def test_column_parallel_shards_concatenate_to_the_full_delta(parts, world):
    lora_A, lora_B, x, logits = parts
    w = routing.selection_mask(routing.topk_ids(logits, K), N)
    a_all, b_all = bank.stack_bank(lora_A, lora_B, 0.5)
    rows = OUT // world
    shards = [delta(x, a_all, b_all[rk * rows : (rk + 1) * rows], w) for rk in range(world)]
    torch.testing.assert_close(torch.cat(shards, dim=1), delta(x, a_all, b_all, w))


@pytest.mark.parametrize("world", [2, 3])
def test_row_parallel_partial_deltas_sum_to_the_full_delta(parts, world):
    """down_proj: each rank sees a slice of the input; the partial deltas add up (vLLM's all-reduce)."""
    lora_A, lora_B, x, logits = parts
    w = routing.selection_mask(routing.topk_ids(logits, K), N)
    a_all, b_all = bank.stack_bank(lora_A, lora_B, 0.5)
    cols = D // world
    partial = [
        delta(x[:, rk * cols : (rk + 1) * cols], a_all[:, rk * cols : (rk + 1) * cols], b_all, w) for rk in range(world)
    ]
    torch.testing.assert_close(torch.stack(partial).sum(0), delta(x, a_all, b_all, w), rtol=1e-5, atol=1e-5)
