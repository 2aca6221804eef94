"""remix_serve.exact_match: per-skill scoring, the model-card section, bad input, and the CLI on a real engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from remix_serve import exact_match as em
from tests.helpers import ROOT


def _row(question: str, answer: str, skill: str | None = None) -> dict:
    row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    return row | ({"skill": skill} if skill else {})


def test_score_counts_stripped_exact_answers_per_skill():
    rows = [_row("1+1?", "2", "math"), _row("2+2?", "4", "math"), _row("cap?", "Paris", "facts"), _row("x", "y")]
    out = em.score(rows, [" 2\n", "5", "paris", "y"])
    assert out["accuracy"] == {"math": 0.5, "facts": 0.0, "all": 1.0}  # case counts; surrounding space does not
    assert out["counts"] == {"math": 2, "facts": 1, "all": 1} and out["examples"] == 4
    assert out["accuracy_mean"] == pytest.approx(0.5)
    assert out["samples"]["math"][1] == {"prompt": "2+2?", "answer": "5", "want": "4"}
    with pytest.raises(ValueError):
        em.score(rows, ["2"])  # one answer per row


def test_table_has_a_row_per_skill_a_column_per_result_and_the_mean():
    a = em.score([_row("q", "a", "s1"), _row("q", "b", "s2")], ["a", "x"])
    b = em.score([_row("q", "a", "s1"), _row("q", "b", "s2")], ["a", "b"])
    lines = em.table({"base": a, "new": b}).splitlines()
    assert lines[0] == "| skill (examples) | base | new |"
    assert lines[2] == "| s1 (1) | 1.000 | 1.000 |" and lines[3] == "| s2 (1) | 0.000 | 1.000 |"
    assert lines[4] == "| **mean** | **0.500** | **1.000** |"


def test_card_section_is_appended_once_then_replaced_in_place(tmp_path: Path):
    card = tmp_path / "README.md"
    card.write_text("# Card\n\nintro\n")
    em.write_card_section(card, "## Held-out\n\nfirst")
    em.write_card_section(card, "## Held-out\n\nsecond")
    text = card.read_text()
    assert text.startswith("# Card\n\nintro\n\n" + em.CARD_BEGIN) and text.count(em.CARD_BEGIN) == 1
    assert "second" in text and "first" not in text and text.rstrip().endswith(em.CARD_END)
    card.write_text(text + "\n## After\n")  # a section below the block stays where it is
    em.write_card_section(card, "third")
    assert card.read_text().endswith(em.CARD_END + "\n\n## After\n") and not list(tmp_path.glob("*.tmp"))


def test_bad_rows_name_the_file_and_line(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_row("q", "a")) + "\n" + json.dumps({"messages": [{"role": "user", "content": "q"}]}))
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a chat example"):
        em.load_rows(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        em.load_rows(empty)


def test_earlier_results_must_be_parsable_present_and_on_the_same_data(tmp_path: Path):
    rows = [_row("q1", "a", "s1"), _row("q2", "b", "s2")]
    earlier = tmp_path / "old.json"
    earlier.write_text(json.dumps({"v1": em.score(rows, ["a", "x"])}))
    assert em.parse_earlier(f"old={earlier}:v1") == ("old", earlier, "v1")
    assert em.load_earlier(earlier, "v1", rows)["accuracy"] == {"s1": 1.0, "s2": 0.0}
    for bad in ("old", f"old={earlier}", f"={earlier}:v1", f"old={earlier}:"):
        with pytest.raises(Exception, match="expected LABEL=JSON:KEY"):
            em.parse_earlier(bad)
    with pytest.raises(ValueError, match=r"no result 'v2' there; it has \['v1'\]"):
        em.load_earlier(earlier, "v2", rows)
    with pytest.raises(ValueError, match=r"scored \{'s1': 1, 's2': 1\} examples per skill, this data has"):
        em.load_earlier(earlier, "v1", [*rows, _row("q3", "c", "s2")])
    earlier.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a --json file of exact_match"):
        em.load_earlier(earlier, "v1", rows)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "remix_serve.exact_match", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_cli_rejects_bad_arguments_before_starting_an_engine(tmp_path: Path, tiny_ckpt: Path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(_row("q", "a")) + "\n")
    out = _cli("--data", str(data), "--adapter", str(tmp_path))
    assert out.returncode == 2 and "holds no remix_config.json" in out.stderr
    out = _cli("--data", str(data), "--adapter", f"x={tiny_ckpt}", "--adapter", f"x={tiny_ckpt}")
    assert out.returncode == 2 and "labels must differ" in out.stderr
    out = _cli("--data", str(data), "--adapter", "base", "--card", str(tmp_path / "missing.md"))
    assert out.returncode == 2 and "missing.md: no such file" in out.stderr
    out = _cli("--data", str(tmp_path / "nope.jsonl"), "--adapter", "base")
    assert out.returncode == 2 and "nope.jsonl" in out.stderr
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"v1": em.score([_row("q", "a"), _row("r", "b")], ["a", "b"])}))
    out = _cli("--data", str(data), "--adapter", "base", "--earlier", f"v1={old}:v1")
    assert out.returncode == 2 and "this data has {'all': 1}" in out.stderr
    out = _cli("--data", str(data), "--adapter", "base", "--earlier", f"base={old}:v1")
    assert out.returncode == 2 and "labels must differ" in out.stderr


@pytest.mark.engine
def test_cli_scores_base_and_checkpoint_through_the_engine_and_writes_the_card(
    tmp_path: Path, tiny_base: Path, tiny_ckpt: Path
):
    data = tmp_path / "test.jsonl"
    rows = [_row(f"say {i}", "unlikely answer", "echo" if i % 2 else "other") for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    card = tmp_path / "README.md"
    card.write_text("# tiny\n")
    old = tmp_path / "old.json"  # an earlier run's --json, shown as a column without generating again
    old.write_text(json.dumps({"tiny": em.score(rows, ["unlikely answer"] + [""] * 5)}))
    out = _cli(
        "--data", str(data), "--base", str(tiny_base), "--adapter", "base", "--adapter", f"tiny={tiny_ckpt}",
        "--earlier", f"tiny v1={old}:tiny", "--max-tokens", "3", "--max-model-len", "128",
        "--json", str(tmp_path / "new" / "r.json"), "--card", str(card),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    results = json.loads((tmp_path / "new" / "r.json").read_text())  # its folder made before the engines ran
    assert list(results) == ["base", "tiny"]
    assert results["base"]["checkpoint"] is None and results["tiny"]["checkpoint"] == str(tiny_ckpt)
    for r in results.values():
        assert r["counts"] == {"other": 3, "echo": 3} and r["accuracy_mean"] == 0.0  # no random model says that
    text = card.read_text()
    assert "| skill (examples) | base | tiny v1 | tiny |" in text and "| other (3) | 0.000 | 0.333 | 0.000 |" in text
    assert "Command: `python -m remix_serve.exact_match --data" in text and text.startswith("# tiny\n")
