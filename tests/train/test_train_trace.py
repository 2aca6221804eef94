"""TrainArgs.trace_routing: per-step router and weight ESS from the training forwards, and ESS at each eval."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from remix_serve import routing
from remix_serve.checkpoint import PROJECTIONS, RemixConfig
from remix_serve.reference import apply_remix, remix_mlps
from remix_serve.train import TrainArgs, train
from remix_serve.train.trace import RoutingTrace
from tests.helpers.train_task import write_task


def test_trace_averages_ess_of_q_over_real_tokens_only(tiny_base: Path):
    from transformers import AutoModelForCausalLM

    from remix_serve import bases

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    config = RemixConfig(
        base_model=str(tiny_base), base_fingerprint=bases.base_fingerprint(str(tiny_base)), num_loras=4, top_k=2,
        rank=2, alpha=4.0, omega_rule="lora", omega=2.0, target_modules=list(PROJECTIONS), layers=[1],
        weighting="softmax", dtype="float32",
    )  # fmt: skip
    apply_remix(model, config)
    mlp = remix_mlps(model)[1]
    seen = {}
    mlp.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach()))
    trace = RoutingTrace(model)
    ids = torch.randint(3, 300, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    with torch.no_grad(), trace.batch(mask):
        model(input_ids=ids, attention_mask=mask)
    got = trace.pop()
    x = seen["x"][mask.bool()]  # [7, D]
    q = torch.softmax(routing.router_logits(x, mlp.router), dim=-1)
    w = mlp.last_weights[mask.bool()]
    assert got["router_ess"]["1"] == pytest.approx(float(routing.ess(q).mean()), abs=1e-4)
    assert got["weight_ess"]["1"] == pytest.approx(float(routing.ess(w).mean()), abs=1e-4)
    assert 1.0 <= got["weight_ess"]["1"] <= 2.0 and 1.0 <= got["router_ess"]["1"] <= 4.0
    counts = (w > 0).sum(0).double()
    assert got["usage_ess"]["1"] == pytest.approx(float(counts.sum() ** 2 / (counts**2).sum()), abs=1e-4)
    assert trace.pop() == {"router_ess": {}, "weight_ess": {}, "usage_ess": {}}  # pop resets
    trace.close()


@pytest.mark.parametrize("router", ["remix", "softmax"])
def test_train_returns_a_trace_of_every_step_and_eval(tiny_base: Path, tmp_path: Path, router: str):
    data, held = write_task(tmp_path, n_train=48, n_eval=16)
    args = TrainArgs(
        base=str(tiny_base), data=str(data), eval_data=str(held), out=str(tmp_path / "ck"), router=router, loras=4,
        top_k=2, rank=2, samples=2, max_steps=4, batch_size=4, eval_every=2, threads=1, progress=False, log_every=0,
        trace_routing=True,
    )  # fmt: skip
    result = train(args)
    steps, evals = result.trace["steps"], result.trace["evals"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert [e["step"] for e in evals] == [0, 2, 4]  # initial, periodic, final
    layers = [str(i) for i in range(2)]
    for s in steps:
        assert sorted(s["router_ess"]) == layers and all(1.0 <= v <= 4.0 for v in s["router_ess"].values())
        assert sorted(s["usage_ess"]) == layers and s["s"] > 0
        if router == "remix":
            assert all(v == pytest.approx(2.0) for v in s["weight_ess"].values())  # constant weights: k
    assert evals[-1]["eval_loss"] == pytest.approx(result.config.training["eval_loss"], abs=1e-4)
    assert sorted(evals[-1]["usage_ess"]) == layers
    assert result.config.training["router_ess"] == evals[-1]["router_ess"]


def test_no_trace_unless_asked(tiny_base: Path, tmp_path: Path):
    data, _ = write_task(tmp_path, n_train=8, n_eval=4)
    args = TrainArgs(base=str(tiny_base), data=str(data), out=str(tmp_path / "ck"), router="lora", rank=2,
                     max_steps=1, batch_size=4, threads=1, progress=False, log_every=0)  # fmt: skip
    assert train(args).trace == {}
