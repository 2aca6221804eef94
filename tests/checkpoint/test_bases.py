"""Base resolution: local folders, clear errors, and the bundled SmolLM2-135M (integration)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from remix_serve import bases


def test_local_folder_resolves_and_fingerprints(tiny_base: Path):
    assert bases.resolve_base(str(tiny_base)) == tiny_base.resolve()
    fp = bases.base_fingerprint(str(tiny_base))
    assert (fp.hidden_size, fp.num_hidden_layers, fp.intermediate_size, fp.vocab_size) == (128, 2, 256, 320)


def test_unknown_name_lists_bundled_bases():
    with pytest.raises(bases.BaseModelError, match=r"neither a bundled base \(smollm2-135m\)"):
        bases.resolve_base("llama-9000")


def test_folder_without_config_is_rejected(tmp_path: Path):
    with pytest.raises(bases.BaseModelError, match="has no config.json"):
        bases.resolve_base(str(tmp_path))


def test_bundled_fingerprint_needs_no_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REMIX_HOME", str(tmp_path))
    assert bases.base_fingerprint("smollm2-135m").hidden_size == 576
    assert not any(tmp_path.iterdir())


@pytest.mark.integration
def test_bundled_base_loads_tokenizes_and_answers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = bases.resolve_base("smollm2-135m")
    cfg = json.loads((path / "config.json").read_text())
    assert bases.fingerprint_of(cfg) == bases.BUNDLED["smollm2-135m"].fingerprint
    assert "quantization_config" not in cfg
    tok = AutoTokenizer.from_pretrained(path)
    text = "ReMix routes every token to k LoRAs."
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.integration
def test_bundled_conversion_is_safe_when_two_processes_race(tmp_path: Path):
    code = "from remix_serve import bases; print(bases.resolve_base('smollm2-135m'))"
    env = {**os.environ, "REMIX_HOME": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert paths == {str(tmp_path / "bases" / "smollm2-135m")}
    assert sorted(p.name for p in (tmp_path / "bases").iterdir() if not p.name.startswith(".")) == ["smollm2-135m"]
    assert not [p for p in (tmp_path / "bases").iterdir() if ".tmp-" in p.name], "temporary folder left behind"
