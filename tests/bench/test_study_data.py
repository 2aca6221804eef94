"""examples/make_data.py --study: the method study's data set, deterministic, disjoint splits, exact answers."""

from __future__ import annotations

import re

import pytest

from tests.helpers import ROOT, load_script


@pytest.fixture(scope="module")
def make_data():
    return load_script("examples/make_data.py")


@pytest.fixture(scope="module")
def study(make_data):
    return make_data.generate_study(2400, 120, 300, seed=0)


def _prompt(row: dict) -> str:
    return row["messages"][0]["content"]


def test_sizes_balance_and_determinism(make_data, study):
    assert {k: len(v) for k, v in study.items()} == {"train": 2400, "dev": 120, "test": 300}
    for rows in study.values():
        counts = {s: sum(r["skill"] == s for r in rows) for s in make_data.STUDY_SKILLS}
        assert len(set(counts.values())) == 1, counts
    assert make_data.generate_study(2400, 120, 300, seed=0) == study
    assert make_data.generate_study(2400, 120, 300, seed=1)["test"] != study["test"]


def test_held_out_prompts_never_occur_in_training_and_are_unique(study):
    train = {_prompt(r) for r in study["train"]}
    dev, test = [_prompt(r) for r in study["dev"]], [_prompt(r) for r in study["test"]]
    assert not train & set(dev) and not train & set(test) and not set(dev) & set(test)
    assert len(set(dev)) == len(dev) and len(set(test)) == len(test)


def test_answers_are_exact(make_data, study):
    for row in study["train"] + study["test"]:
        prompt, answer = _prompt(row), row["messages"][1]["content"]
        if row["skill"] == "arithmetic":
            a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", prompt).groups()
            assert answer == f"{a} {op} {b} = {eval(f'{a} {op} {b}')}."
        elif row["skill"] == "reverse":
            assert answer == re.search(r"'(\w+)'", prompt).group(1)[::-1]
        elif row["skill"] == "upper":
            assert answer == re.search(r"'(.+)'", prompt).group(1).upper()
        elif row["skill"] == "code":
            assert answer.startswith("```python\ndef ") and answer.endswith("\n```")


def test_default_output_is_still_the_demo_data(make_data):
    """examples/data/{train,eval}.jsonl (the small quick-start set; the first demo adapter's data) is what the
    default run writes, exactly."""
    train, evals = make_data.generate()
    lines = (ROOT / "examples" / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert [make_data.json.dumps(r, ensure_ascii=False) for r in train] == lines
    assert len(evals) == len((ROOT / "examples" / "data" / "eval.jsonl").read_text().splitlines())


def test_committed_study_set_is_what_make_data_writes(make_data):
    """examples/data/study (the held-out set the demo adapter's card is scored on) is `make_data.py --study`'s
    default output, the same files the method study generates into its cache."""
    for split, rows in make_data.generate_study().items():
        lines = (ROOT / "examples" / "data" / "study" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [make_data.json.dumps(r, ensure_ascii=False) for r in rows] == lines, split
