"""Training data: label masking for both line formats, and one clear error per kind of bad line, with its number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from remix_serve.train.cli import main
from remix_serve.train.data import IGNORE, DataError, collate, load_jsonl

GOOD = {"prompt": "rev abc=", "completion": "cba"}


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path):
    return AutoTokenizer.from_pretrained(tiny_base)


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _supervised_text(tokenizer, ex) -> str:
    return tokenizer.decode([t for t in ex.labels if t != IGNORE])


def test_prompt_completion_supervises_completion_and_eos_only(tokenizer, tmp_path: Path):
    (ex,) = load_jsonl(_write(tmp_path, [json.dumps(GOOD)]), tokenizer, 64)
    assert _supervised_text(tokenizer, ex) == "cba" + tokenizer.eos_token
    assert tokenizer.decode(ex.input_ids).endswith("rev abc=cba" + tokenizer.eos_token)


def test_messages_supervise_assistant_turns_only(tokenizer, tmp_path: Path):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    (ex,) = load_jsonl(_write(tmp_path, [json.dumps({"messages": messages})]), tokenizer, 128)
    assert _supervised_text(tokenizer, ex) == "hello\nciao\n"  # the tiny template ends each turn with "\n"
    assert len(ex.input_ids) == len(ex.labels)


def test_blank_lines_are_skipped_and_line_numbers_kept(tokenizer, tmp_path: Path):
    examples = load_jsonl(_write(tmp_path, [json.dumps(GOOD), "", json.dumps(GOOD)]), tokenizer, 64)
    assert [e.line for e in examples] == [1, 3]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "x", "completion": ', "not valid JSON"),
        ('{"prompt": "x"}', "missing field 'completion'"),
        ('{"prompt": "x", "completion": 3}', "'completion' must be a string"),
        (json.dumps({"prompt": "x" * 80, "completion": "y"}), "longer than --max-len 64"),
        (json.dumps({"messages": [{"role": "user", "content": "no answer"}]}), "no supervised tokens"),
        ('["a list"]', "expected a JSON object"),
    ],
    ids=["malformed-json", "missing-field", "wrong-type", "too-long", "no-supervised-tokens", "not-an-object"],
)
def test_bad_line_is_reported_with_its_line_number(tokenizer, tmp_path: Path, bad_line: str, message: str):
    path = _write(tmp_path, [json.dumps(GOOD), json.dumps(GOOD), bad_line])
    with pytest.raises(DataError) as err:
        load_jsonl(path, tokenizer, 64)
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith(f"{path}:3: ") and message in err.value.problems[0]


def test_every_bad_line_is_reported_at_once(tokenizer, tmp_path: Path):
    path = _write(tmp_path, ["{", json.dumps(GOOD), '{"completion": "y"}', "nope"])
    with pytest.raises(DataError) as err:
        load_jsonl(path, tokenizer, 64)
    assert [p.split(": ")[0] for p in err.value.problems] == [f"{path}:1", f"{path}:3", f"{path}:4"]


def test_cli_reports_data_errors_and_exits_2(tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    path = _write(tmp_path, [json.dumps(GOOD), '{"prompt": 1}'])
    rc = main(["--base", str(tiny_base), "--data", str(path), "--out", str(tmp_path / "out"), "--threads", "1"])
    assert rc == 2
    assert f"{path}:2: missing field 'completion'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_collate_pads_right_and_masks_padding(tokenizer, tmp_path: Path):
    short, long = {"prompt": "a", "completion": "b"}, {"prompt": "abcdef", "completion": "ghi"}
    examples = load_jsonl(_write(tmp_path, [json.dumps(short), json.dumps(long)]), tokenizer, 64)
    batch = collate(examples, pad_id=tokenizer.pad_token_id)
    n0 = len(examples[0].input_ids)
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (batch["input_ids"].shape[1] - n0)
    assert (batch["labels"][0, n0:] == IGNORE).all()
