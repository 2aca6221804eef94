"""The typed spec of `hf_overrides["remix"]`: what remix-serve writes is what the model and the endpoint read."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from remix_serve.server.cli import build_parser
from remix_serve.vllm_plugin import hf_overrides
from remix_serve.vllm_plugin.spec import RemixOverrides


def test_what_hf_overrides_writes_the_model_and_the_endpoint_read():
    written = hf_overrides("/ckpts/a", ["LlamaForCausalLM"])
    assert written == {"architectures": ["RemixLlamaForCausalLM"], "remix": {"checkpoint": "/ckpts/a"}}
    assert RemixOverrides.from_hf_config(SimpleNamespace(remix=written["remix"])).checkpoint == "/ckpts/a"
    assert RemixOverrides.from_server_args(json.dumps(written)).checkpoint == "/ckpts/a"  # --hf-overrides '{...}'
    assert RemixOverrides.from_server_args(written).checkpoint == "/ckpts/a"


@pytest.mark.parametrize(
    ("remix", "expected"),
    [
        (None, "remix: Input should be a valid dictionary"),
        ({}, "exactly one of 'checkpoint' and 'pool' must be given"),
        ({"checkpoint": ""}, "checkpoint: String should have at least 1 character"),
        ({"checkpoint": "/a", "pool": 3}, "pool: Input should be a valid dictionary or instance of PoolSettings"),
        ({"checkpoint": "/a", "other": 1}, "other: Extra inputs are not permitted"),
        ({"checkpoint": "/a", "bank_path": "dense"}, "bank_path: Input should be 'auto', 'fused' or 'gather'"),
        (
            {
                "pool": {"pages": {"gate_up": 1, "down": 1}, "r_page": 8, "n_max": 8, "k_max": 2, "r_max": 8},
                "bank_path": "fused",
            },
            "bank_path='fused' applies to one checkpoint, not to a pool",
        ),
    ],
)
def test_a_bad_spec_names_the_problem_and_the_value(remix, expected):
    with pytest.raises(ValueError, match="hf_config.remix must be") as err:
        RemixOverrides.from_hf_config(SimpleNamespace(remix=remix))
    assert expected in str(err.value) and f"got {remix!r}" in str(err.value)


def test_a_server_without_a_remix_override_has_no_spec():
    assert RemixOverrides.from_server_args(None) is None
    assert RemixOverrides.from_server_args('{"architectures": ["LlamaForCausalLM"]}') is None


def test_remix_serve_adapter_help_comes_from_the_spec():
    help_text = next(a.help for a in build_parser()._actions if "--adapter" in a.option_strings)
    # The spec's first clause, then what remix-serve adds (repeating it for several checkpoints)
    assert help_text.startswith(RemixOverrides.model_fields["checkpoint"].description.split(";")[0])


@pytest.mark.parametrize(
    ("argv", "pool"),
    [
        (["--adapter", "./a"], False),  # one checkpoint: its bank gathered (or fused: --bank-path)
        (["--adapter", "./a", "--bank-path", "fused"], False),
        (["--adapter", "./a", "--pool-size", "1"], True),
        (["--adapter", "./a", "--max-loras", "1"], True),
        (["--adapter", "./a", "--adapter", "b=./b"], True),
        (["--adapter-dir", "./ckpts"], True),
    ],
)
def test_one_adapter_is_the_single_checkpoint_server_unless_a_pool_flag_is_given(argv, pool):
    from remix_serve.server.cli import is_pool_mode

    args, _ = build_parser().parse_known_args(argv)
    assert is_pool_mode(args) is pool


def test_bank_path_reaches_the_spec_and_is_refused_in_pool_mode(tmp_path, capsys):
    from remix_serve.server import cli

    written = hf_overrides("/ckpts/a", ["LlamaForCausalLM"], "gather")
    assert RemixOverrides.from_server_args(json.dumps(written)).bank_path == "gather"
    assert RemixOverrides.from_server_args(json.dumps(hf_overrides("/ckpts/a", ["LlamaForCausalLM"]))).bank_path is None
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--adapter", str(tmp_path / "a"), "--adapter", str(tmp_path / "b"), "--bank-path", "fused"])
    assert exit_.value.code == cli.EXIT_BAD_CHECKPOINT
    assert "--bank-path fused applies to one checkpoint" in capsys.readouterr().err


def test_auto_bank_path_fuses_a_small_bank_and_gathers_a_large_one():
    """SmolLM2-135M's shapes: n=8 r=8 on gate/up/down of all 30 layers adds 11.5% of the base's multiply-adds per
    token (fused: the faster decode, prefill 0.89x), n=8 r=16 23% (fused prefill 0.79x: gather); without the
    gather kernels, always fused."""
    from remix_serve.vllm_plugin.bank import FUSED_MAX_SHARE, auto_bank_path, dense_share

    hf = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, num_hidden_layers=30)  # fmt: skip

    def config(n: int, r: int, layers: int = 30, targets: tuple = ("gate_proj", "up_proj", "down_proj")):
        return SimpleNamespace(num_loras=n, rank=r, adapted_layers=list(range(layers)), target_modules=list(targets))

    per_layer = 576 * 64 * 2 * (9 + 3) + 3 * 576 * 1536
    assert dense_share(config(8, 8), hf) == pytest.approx(8 * 8 * 3 * (576 + 1536) / per_layer)
    assert dense_share(config(8, 8), hf) < FUSED_MAX_SHARE < dense_share(config(8, 16), hf)
    assert auto_bank_path(config(8, 8), hf, gather_kernels=True) == "fused"
    assert auto_bank_path(config(8, 16), hf, gather_kernels=True) == "gather"
    assert auto_bank_path(config(64, 16), hf, gather_kernels=False) == "fused"
    assert auto_bank_path(config(8, 16, layers=12, targets=("up_proj",)), hf, gather_kernels=True) == "fused"
