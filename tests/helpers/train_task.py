"""A tiny synthetic task for training tests: three string skills on the byte-level tiny tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

SKILLS = {"rev": lambda s: s[::-1], "up": str.upper, "dup": lambda s: s + s}


def example(rng: random.Random) -> dict:
    word = "".join(rng.choice("abcdef") for _ in range(rng.randint(3, 5)))
    skill = rng.choice(sorted(SKILLS))
    return {"prompt": f"{skill} {word}=", "completion": SKILLS[skill](word)}


def write_task(folder: Path, n_train: int = 240, n_eval: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl and eval.jsonl (different draws) under `folder`; returns their paths."""
    rng = random.Random(seed)
    paths = []
    for name, n in (("train.jsonl", n_train), ("eval.jsonl", n_eval)):
        path = folder / name
        path.write_text("".join(json.dumps(example(rng)) + "\n" for _ in range(n)))
        paths.append(path)
    return paths[0], paths[1]
