"""The committed demo adapter: a valid checkpoint on the bundled base that reproduces the eval loss in its card."""

from __future__ import annotations

import pytest
import torch

from remix_serve import checkpoint as ck
from remix_serve import reference
from remix_serve.train.data import IGNORE, collate, load_jsonl
from remix_serve.train.loss import sequence_nll
from tests.helpers import ROOT

EXAMPLES = ROOT / "examples"


@pytest.mark.integration
def test_demo_adapter_loads_and_reproduces_its_logged_eval_loss():
    folder = EXAMPLES / "demo-adapter"
    loaded = ck.load_checkpoint(folder)
    cfg, t = loaded.config, loaded.config.training
    assert cfg.base_model == "smollm2-135m" and (cfg.num_loras, cfg.top_k, cfg.rank) == (8, 2, 8)
    assert (folder / ck.ADAPTER_FILE).stat().st_size < 10 * 2**20  # a few MB
    assert t["command"].startswith("remix-train ") and t["stopped_by"] is None
    assert t["eval_loss"] < t["eval_loss_initial"]
    model, tokenizer = reference.load_model(folder)
    examples = load_jsonl(EXAMPLES / "data" / "eval.jsonl", tokenizer, t["max_len"])
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            batch = collate(examples[i : i + 8], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            n_tok = (batch["labels"][:, 1:] != IGNORE).sum(-1)
            nll += float((sequence_nll(logits, batch["labels"]).double() * n_tok).sum())
            count += int(n_tok.sum())
    assert nll / count == pytest.approx(t["eval_loss"], rel=1e-3)
