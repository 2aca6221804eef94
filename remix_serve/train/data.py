"""Training data for remix-train: JSONL -> token ids + labels (loss on completion / assistant tokens only).

Each line is `{"prompt": str, "completion": str}` or `{"messages": [{"role", "content"}, ...]}` (rendered with the
tokenizer's chat template; every assistant turn is supervised). Every bad line is reported, with its line number,
in one `DataError`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100  # label of a token that carries no loss (prompt, user turns, padding)
MAX_REPORTED = 20  # problems listed in one DataError before "... and N more"


class DataError(ValueError):
    """Bad training data. `problems` holds one `file:line: what` entry per defect."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:MAX_REPORTED]
        more = len(problems) - len(shown)
        super().__init__("\n".join(shown + ([f"... and {more} more"] if more else [])))


@dataclass
class Example:
    """One tokenised example: `input_ids` and `labels` of equal length (`labels` is IGNORE off the completion)."""

    input_ids: list[int]
    labels: list[int]
    line: int


def _prompt_completion(row: dict, tokenizer) -> tuple[list[int], list[int]]:
    prompt = tokenizer(row["prompt"], add_special_tokens=True).input_ids
    completion = tokenizer(row["completion"], add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        completion = completion + [tokenizer.eos_token_id]  # learn to stop
    return prompt + completion, [IGNORE] * len(prompt) + completion


def _messages(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Render with the chat template; label the tokens that fall inside an assistant turn's rendered text.

    A turn's span is the text between the rendering of the conversation before it (with the generation prompt)
    and the rendering that includes it, so the turn's end-of-turn marker is learned too.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError("the chat template does not render turns as prefixes; cannot find the assistant text")
        spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tok if any(lo <= start < hi for lo, hi in spans) else IGNORE
        for tok, (start, _) in zip(enc.input_ids, enc.offset_mapping, strict=True)
    ]
    return enc.input_ids, labels


def _check_row(row: object) -> str | None:
    """What is wrong with a parsed line, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, found {type(row).__name__}"
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f"messages[{j}] must be an object with string 'role' and 'content'"
        return None
    missing = [key for key in ("prompt", "completion") if key not in row]
    if missing:
        names = ", ".join(repr(k) for k in missing)
        return f"missing field {names} (expected 'prompt' and 'completion', or 'messages')"
    for key in ("prompt", "completion"):
        if not isinstance(row[key], str):
            return f"{key!r} must be a string, found {type(row[key]).__name__}"
    return None


def load_jsonl(path: str | os.PathLike, tokenizer, max_len: int) -> list[Example]:
    """Read and tokenise a JSONL file. Raises DataError listing every bad line (`file:line: problem`).

    Blank lines are skipped. A line is bad when it is not valid JSON, lacks a field, has a field of the wrong type,
    is longer than `max_len` tokens, or has no supervised token (nothing to learn from).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError([f"{path}: no such file"])
    examples, problems = [], []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        problem = _check_row(row)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        try:
            if "messages" in row:
                ids, labels = _messages(row["messages"], tokenizer)
            else:
                ids, labels = _prompt_completion(row, tokenizer)
        except Exception as e:  # a template error is data-dependent: report it against the line
            problems.append(f"{where}: could not render the example ({e})")
            continue
        if len(ids) > max_len:
            problems.append(f"{where}: {len(ids)} tokens, longer than --max-len {max_len}")
        elif not any(label != IGNORE for label in labels[1:]):  # position 0 is never predicted
            problems.append(f"{where}: no supervised tokens (empty completion or no assistant turn)")
        else:
            examples.append(Example(ids, labels, lineno))
    if problems:
        raise DataError(problems)
    if not examples:
        raise DataError([f"{path}: no examples"])
    return examples


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples: input_ids, attention_mask, labels, each `[B, T]`."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
