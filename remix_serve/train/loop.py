"""The remix-train recipe: base (bases.py) -> wrap (reference.py) -> data -> loop -> write (checkpoint.py).

The loop does the same things in the same order each step: set the learning rate, forward and backward over the
batch (micro-batches accumulate), clip, optimizer step, log, evaluate (every `eval_every` steps), check for a stop
signal. SIGINT or SIGTERM finishes the current step, then the last finished step is written as an ordinary
checkpoint (atomically, by `save_checkpoint`).

Baselines are flag values, not separate trainers: `router="softmax"` (MixLoRA-style: deterministic top-k with
learned renormalised weights, end to end by backprop) and `router="lora"` (n = k = 1, no router).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from remix_serve import bases
from remix_serve.checkpoint import CONFIG_FILE, RemixConfig, load_checkpoint
from remix_serve.reference import apply_remix, load_remix_tensors, remix_mlps, save_model
from remix_serve.train import report
from remix_serve.train.args import TrainArgs, build_config
from remix_serve.train.data import collate, load_jsonl
from remix_serve.train.evaluate import evaluate, usage_stats
from remix_serve.train.loss import batch_loss


@dataclass
class TrainResult:
    path: Path
    config: RemixConfig
    steps: int
    stopped_by: str | None  # "SIGINT" / "SIGTERM" when a signal ended the run early


def batch_order(n_examples: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless example-index batches: a fresh seeded permutation per epoch; the last batch may be short."""
    epoch = 0
    while True:
        perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        for i in range(0, n_examples, batch_size):
            yield perm[i : i + batch_size]
        epoch += 1


def lr_factor(step: int, total: int, warmup: int) -> float:
    """1) linear warmup over `warmup` steps; 2) cosine decay to 10% at `total`; 3) 10% past it."""
    if step < warmup:
        return (step + 1) / warmup
    if step >= total:
        return 0.1
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


class StopSignals:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks after each step; a second one aborts at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            raise KeyboardInterrupt  # second signal: give up (save_checkpoint removes its temp folder)
        self.received = signal.Signals(signum).name
        print(f"\n{self.received}: finishing the current step, then writing the checkpoint", file=sys.stderr)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _cast_adapter(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the adapter in the checkpoint dtype, so the final eval computes what a loaded checkpoint computes."""
    for m in remix_mlps(model).values():
        for p in m.parameters(recurse=False):
            p.data = p.data.to(dtype)
        for p in [*m.lora_A.values(), *m.lora_B.values()]:
            p.data = p.data.to(dtype)


def train(args: TrainArgs) -> TrainResult:
    """Train a ReMix (or baseline) adapter and write it, with a model card and routing.png, to `args.out`."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.time()
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / CONFIG_FILE).is_file():
        # save_checkpoint replaces whatever is at `out`: only ever an earlier checkpoint.
        raise ValueError(f"--out {out} exists and is not a remix checkpoint folder; refusing to replace it")
    if not report.have_matplotlib():
        print("remix-train: matplotlib is not installed; the checkpoint will have no routing.png", file=sys.stderr)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    torch.manual_seed(args.seed)

    # Base, config (fresh or from --resume), wrap.
    start_step, resumed, router = 0, None, args.router
    if args.resume:
        resumed = load_checkpoint(args.resume)
        config = resumed.config
        prev = config.training
        start_step = int(prev.get("step", 0))
        router = prev.get("router", "softmax" if config.weighting == "softmax" else "remix")
        base_path = bases.resolve_base(config.base_model, relative_to=resumed.path)
        if config.base_model not in bases.BUNDLED:  # a relative base path is relative to the old checkpoint
            config = config.model_copy(update={"base_model": str(base_path)})
        base_model = config.base_model
    else:
        base_model = args.base if args.base in bases.BUNDLED else str(Path(args.base).resolve())
        base_path = bases.resolve_base(base_model)
        config = build_config(args, base_model, base_path)
    samples = args.samples if router == "remix" else 1
    if router == "remix" and samples < 2:
        raise ValueError(f"--samples must be >= 2 for --router remix (RLOO needs M >= 2), got {samples}")
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # Data first: a bad line fails before the model loads.
    train_examples = load_jsonl(args.data, tokenizer, args.max_len)
    eval_examples = load_jsonl(args.eval_data, tokenizer, args.max_len) if args.eval_data else None
    report_examples = eval_examples or train_examples[:64]

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    apply_remix(model, config.model_copy(update={"dtype": "float32"}))  # train in float32, save in config.dtype
    if resumed is not None:
        load_remix_tensors(model, resumed.tensors)
    model.train()

    # Optimizer: LoRA banks and routers at their own learning rates; the lora baseline has no router to train.
    mlps = list(remix_mlps(model).values())
    lora_params = [p for m in mlps for p in [*m.lora_A.values(), *m.lora_B.values()]]
    router_params = [m.router for m in mlps] if router != "lora" else []
    if router == "lora":
        for m in mlps:
            m.router.requires_grad_(False)
    router_lr = args.router_lr if args.router_lr is not None else args.lr
    groups = [{"params": lora_params, "lr": args.lr, "base_lr": args.lr}]
    if router_params:
        groups.append({"params": router_params, "lr": router_lr, "base_lr": router_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    trainable = lora_params + router_params

    batches_per_epoch = math.ceil(len(train_examples) / args.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / args.grad_accum)
    total = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    eval_every = args.eval_every or max(1, total // 4)
    order = batch_order(len(train_examples), args.batch_size, args.seed)
    for _ in range(start_step * args.grad_accum):  # --resume: skip the batches already trained on
        next(order)
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + start_step)
    rows_per_forward = max(1, args.micro_batch // samples) if args.micro_batch else args.batch_size

    history: list[dict] = list(resumed.config.training.get("history", [])) if resumed else []
    step, recent, tokens_seen = start_step, [], 0
    with StopSignals() as stop:
        initial_eval = evaluate(model, eval_examples, pad_id) if eval_examples else None
        if initial_eval:
            history.append({"step": start_step, "eval_loss": round(initial_eval.loss, 5)})
        bar = tqdm(total=total, initial=start_step, disable=not args.progress, dynamic_ncols=True, file=sys.stderr)
        while step < total and stop.received is None:
            t0 = time.time()
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, total, args.warmup)
            nll_acc, router_acc, step_tokens = 0.0, 0.0, 0
            for _ in range(args.grad_accum):
                idx = next(order)
                for j in range(0, len(idx), rows_per_forward):  # micro-batches split by example: RLOO stays exact
                    chunk = [train_examples[i] for i in idx[j : j + rows_per_forward]]
                    batch = collate(chunk, pad_id)
                    loss, nll, router_term = batch_loss(model, batch, router, samples, generator)
                    scale = len(chunk) / len(idx) / args.grad_accum
                    (loss * scale).backward()
                    nll_acc += float(nll.detach()) * scale  # sync point: one .item()-style read per micro-batch
                    router_acc += float(router_term.detach()) * scale
                    step_tokens += int(batch["attention_mask"].sum())
            torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += step_tokens
            recent = (recent + [nll_acc])[-20:]
            tok_s = step_tokens / max(time.time() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{nll_acc:.4f}", router=f"{router_acc:+.4f}", tok_s=f"{tok_s:.0f}")
            if args.log_every and (step % args.log_every == 0 or step == total):
                line = f"step {step}/{total} loss {nll_acc:.4f} router {router_acc:+.4f} tok/s {tok_s:.0f}"
                tqdm.write(line, file=sys.stdout)
                history.append({"step": step, "train_loss": round(nll_acc, 5)})
            if eval_examples and step % eval_every == 0 and step < total and stop.received is None:
                ev = evaluate(model, eval_examples, pad_id)
                tqdm.write(f"step {step}/{total} eval_loss {ev.loss:.4f}", file=sys.stdout)
                history.append({"step": step, "eval_loss": round(ev.loss, 5)})
        bar.close()

        # Write the last finished step. Signals stay caught until the folder is in place.
        _cast_adapter(model, config.torch_dtype)
        final = evaluate(model, report_examples, pad_id)
        if eval_examples:
            history.append({"step": step, "eval_loss": round(final.loss, 5)})
            print(f"step {step}/{total} eval_loss {final.loss:.6f}", flush=True)
        config.training = {
            "command": args.command,
            "router": router,
            "data": str(args.data),
            "examples": len(train_examples),
            "eval_data": str(args.eval_data) if args.eval_data else None,
            "eval_examples": len(eval_examples) if eval_examples else 0,
            "step": step,
            "max_steps": total,
            "samples": samples,
            "batch_size": args.batch_size,
            "grad_accum": args.grad_accum,
            "lr": args.lr,
            "router_lr": router_lr if router_params else None,
            "max_len": args.max_len,
            "seed": args.seed,
            "train_loss": round(sum(recent) / len(recent), 5) if recent else None,  # mean of the last 20 steps
            "eval_loss": final.loss if eval_examples else None,
            "eval_loss_initial": initial_eval.loss if initial_eval else None,
            **usage_stats(final, initial_eval),
            "tokens_this_run": tokens_seen,
            "wall_s_this_run": round(time.time() - t_start, 1),
            "resumed_from": str(args.resume) if args.resume else None,
            "stopped_by": stop.received,
            "history": history,
        }
        save_model(model, args.out, config, extra_files=report.report_files(config, base_model, final, args))
    return TrainResult(path=Path(args.out), config=config, steps=step, stopped_by=stop.received)
