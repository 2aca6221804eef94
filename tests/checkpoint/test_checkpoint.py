"""Checkpoint format v1: round trip, atomic writes, and one clear error per kind of defect."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from remix_serve import checkpoint as ck
from tests.helpers.variants import DEFAULT


@pytest.fixture
def ckpt_copy(tiny_ckpt: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dest)
    return dest


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / ck.CONFIG_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / ck.CONFIG_FILE).write_text(json.dumps(cfg))


def _edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / ck.ADAPTER_FILE)
    edit(tensors)
    save_file(tensors, folder / ck.ADAPTER_FILE)


def test_round_trip_preserves_config_and_tensors(tiny_ckpt: Path, tmp_path: Path):
    loaded = ck.load_checkpoint(tiny_ckpt)
    again = ck.save_checkpoint(tmp_path / "copy", loaded.config, loaded.tensors)
    reloaded = ck.load_checkpoint(again)
    assert reloaded.config == loaded.config
    assert loaded.tensors.keys() == reloaded.tensors.keys()
    for name, t in loaded.tensors.items():
        assert torch.equal(t, reloaded.tensors[name]), name


def test_tensor_names_follow_design():
    assert ck.tensor_name(3, "up_proj", "lora_A") == "layers.3.mlp.up_proj.lora_A"
    assert ck.router_name(0) == "layers.0.router.weight"


# (description, how to break the checkpoint, text the error must contain)
DEFECTS: list[tuple[str, Callable[[Path], None], str]] = [
    ("missing config", lambda f: (f / ck.CONFIG_FILE).unlink(), "remix_config.json: missing"),
    ("malformed json", lambda f: (f / ck.CONFIG_FILE).write_text("{not json"), "not valid JSON"),
    ("unknown format", lambda f: _edit_config(f, format="remix/v9"), "format is 'remix/v9'"),
    ("k > n", lambda f: _edit_config(f, top_k=5), "top_k=5 is larger than num_loras=4"),
    ("k < 1", lambda f: _edit_config(f, top_k=0), "top_k: Input should be greater than or equal to 1, got 0"),
    (
        "unknown target",
        lambda f: _edit_config(f, target_modules=["gate_proj", "up_proj", "o_proj"]),
        "target_modules.2: Input should be 'gate_proj', 'up_proj' or 'down_proj', got 'o_proj'",
    ),
    ("rank not an integer", lambda f: _edit_config(f, rank="eight"), "rank: Input should be a valid integer"),
    ("unknown key", lambda f: _edit_config(f, experts=3), "experts: unknown key"),
    ("omega mismatch", lambda f: _edit_config(f, omega=3.0), "omega=3.0 does not match"),
    ("layer outside base", lambda f: _edit_config(f, layers=[0, 7]), "layers [7] are outside the base's 2"),
    ("missing adapter file", lambda f: (f / ck.ADAPTER_FILE).unlink(), "adapter.safetensors: missing"),
    ("garbage adapter file", lambda f: (f / ck.ADAPTER_FILE).write_bytes(b"\x00" * 64), "not a readable"),
    (
        "missing tensor",
        lambda f: _edit_tensors(f, lambda t: t.pop("layers.1.mlp.down_proj.lora_B")),
        "layers.1.mlp.down_proj.lora_B is missing (expected shape [4, 128, 4])",
    ),
    (
        "extra tensor",
        lambda f: _edit_tensors(f, lambda t: t.__setitem__("layers.0.mlp.q_proj.lora_A", torch.zeros(1))),
        "unexpected tensor layers.0.mlp.q_proj.lora_A",
    ),
    (
        "wrong shape",
        lambda f: _edit_tensors(f, lambda t: t.__setitem__("layers.0.mlp.up_proj.lora_B", torch.zeros(4, 128, 8))),
        "layers.0.mlp.up_proj.lora_B is [4, 128, 8]",
    ),
    (
        "wrong dtype",
        lambda f: _edit_tensors(
            f, lambda t: t.__setitem__("layers.0.router.weight", t["layers.0.router.weight"].half())
        ),
        "layers.0.router.weight has dtype torch.float16; remix_config.json says float32",
    ),
    (
        "nan",
        lambda f: _edit_tensors(f, lambda t: t["layers.1.mlp.gate_proj.lora_A"].view(-1).__setitem__(5, float("nan"))),
        "layers.1.mlp.gate_proj.lora_A contains NaN or Inf",
    ),
    (
        "inf",
        lambda f: _edit_tensors(f, lambda t: t["layers.0.router.weight"].view(-1).__setitem__(0, float("inf"))),
        "layers.0.router.weight contains NaN or Inf",
    ),
    (
        "fingerprint differs",
        lambda f: _edit_config(
            f,
            base_fingerprint={
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "intermediate_size": 128,
                "vocab_size": 999,
            },
        ),
        "base_fingerprint.vocab_size is 999, but base",
    ),
    (
        "base path missing",
        lambda f: _edit_config(f, base_model="/nonexistent/base"),
        "nor an existing folder",
    ),
    ("unknown bundled name", lambda f: _edit_config(f, base_model="smollm9"), "bundled base (smollm2-135m)"),
]


@pytest.mark.parametrize(("what", "breakage", "message"), DEFECTS, ids=[d[0] for d in DEFECTS])
def test_each_defect_raises_its_own_clear_error(ckpt_copy: Path, what, breakage, message):
    breakage(ckpt_copy)
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_checkpoint(ckpt_copy)
    assert message in str(err.value), f"{what}: got\n{err.value}"


def test_all_problems_are_reported_together(ckpt_copy: Path):
    def breakage(t: dict[str, torch.Tensor]) -> None:
        t.pop("layers.0.router.weight")
        t["layers.1.mlp.up_proj.lora_A"] = torch.zeros(4, 2, 64)

    _edit_tensors(ckpt_copy, breakage)
    _edit_config(ckpt_copy, base_model="/nonexistent/base")
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_checkpoint(ckpt_copy)
    assert len(err.value.problems) == 3, err.value.problems


def test_relative_base_path_resolves_against_checkpoint(tiny_base: Path, tmp_path: Path):
    shutil.copytree(tiny_base, tmp_path / "base")
    folder = DEFAULT.build(tmp_path / "ckpt", tmp_path / "base")
    _edit_config(folder, base_model="../base")
    assert ck.load_checkpoint(folder).config.base_model == "../base"


def test_save_rejects_bad_tensors_and_writes_nothing(tiny_ckpt: Path, tmp_path: Path):
    loaded = ck.load_checkpoint(tiny_ckpt)
    bad = dict(loaded.tensors)
    bad.pop("layers.0.router.weight")
    with pytest.raises(ck.CheckpointError, match="layers.0.router.weight is missing"):
        ck.save_checkpoint(tmp_path / "out", loaded.config, bad)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_existing_checkpoint_untouched(tiny_ckpt: Path, tmp_path: Path):
    loaded = ck.load_checkpoint(tiny_ckpt)
    dest = ck.save_checkpoint(tmp_path / "out", loaded.config, loaded.tensors)
    before = (dest / ck.ADAPTER_FILE).read_bytes()
    with pytest.raises(TypeError):  # an extra file of an unsupported type fails half-way through the write
        ck.save_checkpoint(dest, loaded.config, loaded.tensors, extra_files={"README.md": 42})  # type: ignore[dict-item]
    assert (dest / ck.ADAPTER_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "a temporary folder was left behind"


def test_save_replaces_existing_checkpoint(tiny_ckpt: Path, tmp_path: Path):
    loaded = ck.load_checkpoint(tiny_ckpt)
    dest = ck.save_checkpoint(tmp_path / "out", loaded.config, loaded.tensors)
    zeroed = {k: torch.zeros_like(v) for k, v in loaded.tensors.items()}
    ck.save_checkpoint(dest, loaded.config, zeroed, extra_files={"README.md": "# card\n"})
    again = ck.load_checkpoint(dest)
    assert all(t.abs().sum() == 0 for t in again.tensors.values())
    assert (dest / "README.md").read_text() == "# card\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_file_or_missing_path_is_not_a_checkpoint(tiny_ckpt: Path, tmp_path: Path):
    with pytest.raises(ck.CheckpointError, match="is a file, not a checkpoint folder"):
        ck.load_checkpoint(tiny_ckpt / ck.ADAPTER_FILE)
    with pytest.raises(ck.CheckpointError, match="checkpoint folder does not exist"):
        ck.load_checkpoint(tmp_path / "nowhere")
