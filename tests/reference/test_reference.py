"""The HF reference model: base equivalence, the docs/method.md formula, modes, recording, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from remix_serve import checkpoint as ck
from remix_serve import reference
from tests.helpers.variants import VARIANTS, Variant, variant


def _base(tiny_base: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()


def _input(n_tokens: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (2, n_tokens), generator=torch.Generator().manual_seed(seed))


def test_zero_lora_b_reproduces_base_logits_exactly(tiny_base: Path, tiny_ckpt: Path):
    loaded = ck.load_checkpoint(tiny_ckpt)
    tensors = {k: (torch.zeros_like(v) if k.endswith("lora_B") else v) for k, v in loaded.tensors.items()}
    x = _input()
    with torch.no_grad():
        expected = _base(tiny_base)(x).logits
        got = reference.apply_remix(_base(tiny_base), loaded.config, tensors)(x).logits
    assert torch.equal(got, expected)


def test_fresh_bank_is_a_no_op(tiny_base: Path, tiny_ckpt: Path):
    config = ck.load_config(tiny_ckpt)
    x = _input()
    with torch.no_grad():
        assert torch.equal(reference.apply_remix(_base(tiny_base), config)(x).logits, _base(tiny_base)(x).logits)


def test_one_token_mlp_output_matches_method_formula(tiny_base: Path, tmp_path: Path):
    """y = W z + omega * sum_{i in I} w_i B_i A_i z on every adapted projection, I = top-k of P x, by hand, for
    every variant of tests/helpers/variants.py (w_i = 1 for constant weighting, q_i renormalised over I for softmax).
    The `default` variant with seed 1 is `tiny_ckpt`; a new row of the table is checked here at once."""
    for case in VARIANTS:
        _check_method_formula(tiny_base, case.build(tmp_path / case.name, tiny_base, seed=1), case)


def _check_method_formula(tiny_base: Path, folder: Path, case: Variant) -> None:
    loaded = ck.load_checkpoint(folder)
    cfg = loaded.config
    t = {name: v.double() for name, v in loaded.tensors.items()}
    # float64 on both sides, so the comparison checks the formula, not float32 rounding
    model = reference.apply_remix(_base(tiny_base), cfg, loaded.tensors).double()
    layer = case.adapted_layers()[-1]
    mlp = reference.remix_mlps(model)[layer]
    base = mlp.base_mlp
    x = torch.randn(128, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    P = t[f"layers.{layer}.router.weight"]
    scores = [float(P[i] @ x) for i in range(cfg.num_loras)]
    chosen = sorted(range(cfg.num_loras), key=lambda i: (-scores[i], i))[: cfg.top_k]
    if cfg.weighting == "softmax":  # q = softmax(P x) in float32 (docs/method.md), renormalised over I, in float32 too
        q = torch.softmax(P.float() @ x.float(), dim=0)[chosen]
        weights = dict(zip(chosen, (q / q.sum()).double().tolist(), strict=True))
    else:
        weights = dict.fromkeys(chosen, 1.0)

    def proj(name: str, z: torch.Tensor) -> torch.Tensor:
        y = getattr(base, name).weight @ z
        if name not in cfg.target_modules:
            return y
        for i in chosen:
            A, B = t[f"layers.{layer}.mlp.{name}.lora_A"][i], t[f"layers.{layer}.mlp.{name}.lora_B"][i]
            y = y + cfg.omega * weights[i] * (B @ (A @ z))
        return y

    h = torch.nn.functional.silu(proj("gate_proj", x)) * proj("up_proj", x)
    expected = proj("down_proj", h)
    with torch.no_grad():
        got = mlp(x[None, None, :])[0, 0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"variant {case.name}: {m}")


def test_checkpoint_round_trip_gives_identical_logits(tiny_ckpt: Path, tmp_path: Path):
    model, _ = reference.load_model(tiny_ckpt)
    x = _input()
    with torch.no_grad():
        before = model(x).logits
    reference.save_model(model, tmp_path / "again", ck.load_config(tiny_ckpt))
    again, _ = reference.load_model(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(x).logits, before)


def test_routing_changes_the_output(tiny_base: Path, tiny_ckpt: Path):
    model, _ = reference.load_model(tiny_ckpt)
    x = _input()
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, _base(tiny_base)(x).logits)


def test_record_routing_gives_k_distinct_loras_per_token(tiny_ckpt: Path):
    model, _ = reference.load_model(tiny_ckpt)
    x = _input(n_tokens=7)
    with torch.no_grad(), reference.record_routing(model) as records:
        model(x)
    assert sorted(records) == [0, 1]
    ids = records[0][0]
    assert ids.shape == (2, 7, 2)
    assert torch.all(ids[..., 0] != ids[..., 1])


def test_sampled_mode_gives_log_q_whose_gradient_reaches_only_the_router(tiny_ckpt: Path):
    model, _ = reference.load_model(tiny_ckpt)
    for p in model.parameters():
        p.requires_grad_(False)
    mlps = reference.remix_mlps(model)
    for m in mlps.values():
        for p in m.parameters(recurse=False):
            p.requires_grad_(True)
        for p in [*m.lora_A.values(), *m.lora_B.values()]:
            p.requires_grad_(True)
    x = _input()
    with reference.routing_mode(model, "sample", torch.Generator().manual_seed(0)):
        model(x)
    log_q = reference.sequence_log_q(model, torch.ones_like(x))
    assert log_q.shape == (2,) and torch.all(log_q < 0)
    log_q.sum().backward()
    for m in mlps.values():
        assert m.router.grad is not None and m.router.grad.abs().sum() > 0
        assert all(p.grad is None for p in m.lora_A.values()), "log Q leaked into the LoRA bank"
    assert all(m.selection == "topk" for m in mlps.values()), "routing_mode did not restore top-k"


def test_sampled_selections_vary_and_topk_is_deterministic(tiny_ckpt: Path):
    model, _ = reference.load_model(tiny_ckpt)
    x = _input()
    with torch.no_grad():
        a, b = model(x).logits, model(x).logits
        assert torch.equal(a, b)
        with reference.routing_mode(model, "sample", torch.Generator().manual_seed(0)):
            s1 = model(x).logits
            s2 = model(x).logits
    assert not torch.equal(s1, s2)


def test_softmax_weighting_uses_renormalised_router_weights(tiny_base: Path, tmp_path: Path):
    folder = variant("softmax").build(tmp_path / "sm", tiny_base, seed=2)
    model, _ = reference.load_model(folder)
    x = _input()
    with torch.no_grad():
        model(x)
    w = reference.remix_mlps(model)[0].last_weights
    assert w.shape == (2, 12, 4)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 12))
    assert ((w > 0).sum(-1) == 2).all()
    assert not torch.all((w == 0) | (w == 1)), "softmax weights should not be constant"


def test_subset_of_layers_and_projections(tiny_base: Path, tmp_path: Path):
    folder = variant("up-layer1").build(tmp_path / "sub", tiny_base)
    model, _ = reference.load_model(folder)
    assert list(reference.remix_mlps(model)) == [1]
    assert list(reference.remix_mlps(model)[1].lora_A) == ["up_proj"]


class _NotALlama(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)


def test_unknown_architecture_names_what_it_found():
    with pytest.raises(ValueError, match="found children: lin"):
        reference.decoder_layers(_NotALlama())
