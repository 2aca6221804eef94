"""`remix-train --preset`: the demo preset is exactly the command examples/demo-adapter's model card records."""

from __future__ import annotations

import dataclasses
import json
import shlex

import pytest

from remix_serve.checkpoint import load_config
from remix_serve.train.args import PRESETS, TrainArgs
from remix_serve.train.cli import build_parser, parse_args
from tests.helpers import ROOT

DEMO = ROOT / "examples" / "demo-adapter"


def _recorded_argv() -> list[str]:
    command = json.loads((DEMO / "remix_config.json").read_text())["training"]["command"]
    argv = shlex.split(command)
    assert argv[0] == "remix-train"
    return argv[1:]


def test_demo_preset_equals_the_recorded_command_field_by_field():
    recorded = parse_args(_recorded_argv())
    preset = parse_args(["--preset", "demo", "--out", recorded.out])
    for f in dataclasses.fields(TrainArgs):
        if f.name != "command":  # the command line itself differs, by design
            assert getattr(preset, f.name) == getattr(recorded, f.name), f.name


def test_demo_preset_matches_the_recorded_config_and_hyperparameters():
    config = load_config(DEMO)
    t = config.training
    args = parse_args(["--preset", "demo", "--out", "unused"])
    assert (args.base, args.data, args.eval_data) == (config.base_model, t["data"], t["eval_data"])
    assert (args.router, args.loras, args.top_k) == (t["router"], config.num_loras, config.top_k)
    assert args.rank == config.rank
    assert (args.alpha, args.omega_rule, args.dtype) == (config.alpha, config.omega_rule, config.dtype)
    assert (args.target_modules, args.layers) == (config.target_modules, config.layers)
    for key in ("samples", "batch_size", "grad_accum", "lr", "max_len", "seed", "max_steps"):
        assert getattr(args, key) == t[key], key
    assert t["router_lr"] == args.lr and args.router_lr is None  # the router lr defaulted to --lr


def test_explicit_flags_override_the_preset():
    args = parse_args(["--preset", "demo", "--max-steps", "5", "--out", "o", "--layers", "0-1", "--base", "b"])
    assert (args.max_steps, args.layers, args.base, args.out) == (5, [0, 1], "b", "o")
    assert (args.top_k, args.dtype, args.eval_every) == (4, "bfloat16", 150)  # the rest still from the preset
    assert args.command == "remix-train --preset demo --max-steps 5 --out o --layers 0-1 --base b"


def test_preset_values_are_copied_not_shared():
    args = parse_args(["--preset", "demo", "--out", "o"])
    args.layers.append(99)
    args.target_modules.append("gate_proj")
    assert 99 not in PRESETS["demo"]["layers"] and "gate_proj" not in PRESETS["demo"]["target_modules"]


def test_unknown_preset_errors_listing_the_known_ones(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--preset", "nope", "--out", "o"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and all(name in err for name in PRESETS)


def test_help_shows_the_presets_and_their_flags():
    text = " ".join(build_parser().format_help().split())  # the help wraps lines
    for name in PRESETS:
        assert f"{name}: --base " in text
    assert "--max-steps 600" in text and "--layers 18-29" in text


def test_data_is_still_required_without_a_preset(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        parse_args(["--base", "smollm2-135m", "--out", "o"])
    assert "--data is required" in capsys.readouterr().err
