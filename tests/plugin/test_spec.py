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
        (["--adapter", "./a"], False),  # today's server: the bank fused into the base
        (["--adapter", "./a", "--pool-size", "1"], True),  # one large checkpoint through the pool (docs/performance)
        (["--adapter", "./a", "--max-loras", "1"], True),
        (["--adapter", "./a", "--adapter", "b=./b"], True),
        (["--adapter-dir", "./ckpts"], True),
    ],
)
def test_one_adapter_is_the_fused_server_unless_a_pool_flag_is_given(argv, pool):
    from remix_serve.server.cli import is_pool_mode

    args, _ = build_parser().parse_known_args(argv)
    assert is_pool_mode(args) is pool
