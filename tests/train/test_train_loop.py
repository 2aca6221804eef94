"""The trainer on the tiny base: held-out loss falls, softmax collapses while ReMix does not, reload, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from remix_serve import checkpoint as ck
from remix_serve import reference
from remix_serve.train import TrainArgs, train
from remix_serve.train.data import collate, load_jsonl
from remix_serve.train.loss import sequence_nll
from tests.helpers.train_task import write_task


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_task(tmp_path_factory.mktemp("task"))


def _args(tiny_base: Path, task: tuple[Path, Path], out: Path, **kw) -> TrainArgs:
    defaults = dict(
        base=str(tiny_base), data=str(task[0]), eval_data=str(task[1]), out=str(out), loras=4, top_k=2, rank=4,
        samples=4, max_steps=60, batch_size=8, lr=3e-3, router_lr=1e-2, threads=1, progress=False, log_every=0,
    )  # fmt: skip
    return TrainArgs(**{**defaults, **kw})


@pytest.fixture(scope="module")
def trained(tiny_base: Path, task, tmp_path_factory) -> dict[str, ck.RemixConfig]:
    """The same training (data, steps, learning rates, seed) for ReMix and both baselines."""
    out = tmp_path_factory.mktemp("runs")
    return {r: train(_args(tiny_base, task, out / r, router=r)).config for r in ("remix", "softmax", "lora")}


@pytest.mark.parametrize("router", ["remix", "softmax", "lora"])
def test_training_lowers_heldout_loss(trained, router: str):
    t = trained[router].training
    assert t["step"] == 60 and t["stopped_by"] is None
    assert t["eval_loss"] < 0.5 * t["eval_loss_initial"], (t["eval_loss_initial"], t["eval_loss"])


def test_baseline_configs(trained):
    assert (trained["lora"].num_loras, trained["lora"].top_k) == (1, 1)
    assert trained["softmax"].weighting == "softmax" and trained["remix"].weighting == "constant"
    assert trained["remix"].training["samples"] == 4 and trained["softmax"].training["samples"] == 1


def test_softmax_routing_collapses_while_remix_keeps_k_loras_and_spreads_traffic(trained):
    """Paper Theorem 1 / Fig. 3, small: softmax weight ESS falls well below k; ReMix's is k by construction."""
    k = trained["remix"].top_k
    soft, remix = trained["softmax"].training, trained["remix"].training
    assert soft["routing_weight_ess_initial"] > 0.9 * k  # it started near k ...
    assert soft["routing_weight_ess"] < 0.75 * k  # ... and collapsed during training
    assert remix["routing_weight_ess"] == k == remix["routing_weight_ess_initial"]
    remix_usage = list(remix["usage_ess"].values())
    assert sum(remix_usage) / len(remix_usage) > k, f"ReMix traffic not spread over the bank: {remix['usage_ess']}"
    print(f"usage ESS per layer: remix {remix['usage_ess']}, softmax {soft['usage_ess']}")


def test_checkpoint_reloads_and_reproduces_logged_eval_loss(tiny_base: Path, task, tmp_path: Path):
    out = train(_args(tiny_base, task, tmp_path / "ck", max_steps=20, dtype="bfloat16")).path
    loaded = ck.load_checkpoint(out)  # a valid remix/v1 folder
    assert loaded.config.dtype == "bfloat16" and (out / "README.md").is_file() and (out / "routing.png").is_file()
    model, tokenizer = reference.load_model(out)
    examples = load_jsonl(task[1], tokenizer, 256)
    nll, count = 0.0, 0
    with torch.no_grad():  # an independent eval: full logits, deterministic top-k, token-weighted mean
        for i in range(0, len(examples), 16):
            batch = collate(examples[i : i + 16], tokenizer.pad_token_id)
            per_seq = sequence_nll(model(input_ids=batch["input_ids"]).logits, batch["labels"])
            n_tok = (batch["labels"][:, 1:] != -100).sum(-1)
            nll += float((per_seq.double() * n_tok).sum())
            count += int(n_tok.sum())
    assert nll / count == pytest.approx(loaded.config.training["eval_loss"], rel=1e-4)


def test_resume_continues_from_the_checkpoint(tiny_base: Path, task, tmp_path: Path):
    first = train(_args(tiny_base, task, tmp_path / "a", max_steps=10))
    before = ck.load_checkpoint(first.path)
    second = train(_args(tiny_base, task, tmp_path / "b", max_steps=25, resume=str(first.path)))
    t = second.config.training
    assert second.steps == 25 and t["step"] == 25 and t["resumed_from"] == str(first.path)
    assert t["eval_loss_initial"] == pytest.approx(before.config.training["eval_loss"], rel=1e-5)  # same weights
    assert t["eval_loss"] < t["eval_loss_initial"]
    assert [h["step"] for h in t["history"] if "eval_loss" in h][0] == 0  # history carried over from the first run
    after = ck.load_checkpoint(second.path)
    assert any(not torch.equal(after.tensors[n], before.tensors[n]) for n in before.tensors)


def test_micro_batching_gives_the_same_training_as_one_forward(tiny_base: Path, task, tmp_path: Path):
    """Deterministic routing (softmax baseline), so the two runs differ only in how the batch is split."""
    whole = train(_args(tiny_base, task, tmp_path / "whole", router="softmax", max_steps=3))
    split = train(_args(tiny_base, task, tmp_path / "split", router="softmax", max_steps=3, micro_batch=3))
    a, b = ck.load_checkpoint(whole.path).tensors, ck.load_checkpoint(split.path).tensors
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(a[n], torch.zeros_like(a[n])) for n in a if n.endswith("lora_B"))  # it trained


def test_out_folder_that_is_not_a_checkpoint_is_never_replaced(tiny_base: Path, task, tmp_path: Path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a remix checkpoint"):
        train(_args(tiny_base, task, precious, max_steps=1))
    assert (precious / "notes.txt").read_text() == "keep me"
