"""remix-train's loop: base and config (fresh or --resume) -> wrap (reference.py) -> data -> steps -> write.

Every step runs in the same order: learning rate, forward and backward over its micro-batches, clip, optimizer step,
log, evaluate (every `eval_every` steps), stop check. SIGINT/SIGTERM ends the run after the step, which is written.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from remix_serve import bases
from remix_serve.checkpoint import CONFIG_FILE, Checkpoint, RemixConfig, load_checkpoint
from remix_serve.reference import apply_remix, load_remix_tensors, remix_mlps, save_model
from remix_serve.train import report
from remix_serve.train.args import RouterKind, TrainArgs, build_config
from remix_serve.train.data import Example, collate, load_jsonl
from remix_serve.train.evaluate import EvalResult, evaluate, usage_stats
from remix_serve.train.loss import batch_loss
from remix_serve.train.trace import RoutingTrace


@dataclass
class TrainResult:
    path: Path
    config: RemixConfig
    steps: int
    stopped_by: str | None  # "SIGINT" / "SIGTERM" when a signal ended the run early
    # With TrainArgs.trace_routing: {"steps": [{"step", "s", "router_ess", "weight_ess", "usage_ess"}] from each
    # step's training forwards, "evals": [{"step", "s", "eval_loss", "weight_ess", "usage_ess", "router_ess"}] at
    # each eval}, where "s" is the seconds the step or evaluation took; else {}.
    trace: dict = field(default_factory=dict)


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


@dataclass
class _Start:
    """What the arguments resolve to: a fresh config, or (`--resume`) the old checkpoint's config, router and step."""

    config: RemixConfig  # config.base_model: a bundled name or an absolute path
    base_path: Path  # the base's Hugging Face folder
    router: RouterKind
    samples: int  # M routed passes per example (1 unless remix)
    step: int  # optimizer steps already taken
    resumed: Checkpoint | None


def _check_out(out: Path) -> None:
    """save_checkpoint replaces whatever is at `out`: allow only an empty folder or an earlier checkpoint."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / CONFIG_FILE).is_file():
        raise ValueError(f"--out {out} exists and is not a remix checkpoint folder; refusing to replace it")


def _resolve_start(args: TrainArgs) -> _Start:
    """Base and config, fresh from `args` or from `args.resume`; raises ValueError on a bad --samples."""
    step, resumed, router = 0, None, args.router
    if args.resume:
        resumed = load_checkpoint(args.resume)
        config = resumed.config
        step = int(config.training.get("step", 0))
        router = config.training.get("router", "softmax" if config.weighting == "softmax" else "remix")
        base_path = bases.resolve_base(config.base_model, relative_to=resumed.path)
        if config.base_model not in bases.BUNDLED:  # a relative base path is relative to the old checkpoint
            config = config.model_copy(update={"base_model": str(base_path)})
    else:
        base_model = args.base if args.base in bases.BUNDLED else str(Path(args.base).resolve())
        base_path = bases.resolve_base(base_model)
        config = build_config(args, base_model, base_path)
    samples = args.samples if router == "remix" else 1
    if router == "remix" and samples < 2:
        raise ValueError(f"--samples must be >= 2 for --router remix (RLOO needs M >= 2), got {samples}")
    return _Start(config, base_path, router, samples, step, resumed)


@dataclass
class _Data:
    """Tokenized training and eval examples, and the pad id that collates them."""

    pad_id: int
    train: list[Example]
    eval: list[Example] | None

    @property
    def report(self) -> list[Example]:
        """Examples the final usage statistics are measured on: eval data, else the first 64 training examples."""
        return self.eval or self.train[:64]


def _load_data(args: TrainArgs, base_path: Path) -> _Data:
    """Tokenize the data first, so that a bad line fails before the model loads."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eval_examples = load_jsonl(args.eval_data, tokenizer, args.max_len) if args.eval_data else None
    return _Data(pad_id, load_jsonl(args.data, tokenizer, args.max_len), eval_examples)


def _build_model(start: _Start) -> nn.Module:
    """The base wrapped with fresh (or resumed) banks, in float32 whatever `config.dtype` (the saved dtype) is."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(start.base_path, dtype=torch.float32)
    apply_remix(model, start.config.model_copy(update={"dtype": "float32"}))
    if start.resumed is not None:
        load_remix_tensors(model, start.resumed.tensors)
    model.train()
    return model


def _build_optimizer(model: nn.Module, router: RouterKind, args: TrainArgs) -> torch.optim.AdamW:
    """AdamW: LoRA banks, then routers, each group at its own learning rate; the lora baseline has no router."""
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
    return torch.optim.AdamW(groups, weight_decay=0.0)


def _total_steps(args: TrainArgs, n_examples: int) -> int:
    """`max_steps` if given, else the optimizer steps of `epochs` passes over the data."""
    if args.max_steps is not None:
        return args.max_steps
    batches_per_epoch = math.ceil(n_examples / args.batch_size)
    return args.epochs * math.ceil(batches_per_epoch / args.grad_accum)


def _step_batches(
    args: TrainArgs, data: _Data, samples: int, start_step: int
) -> Iterator[list[tuple[dict[str, torch.Tensor], float]]]:
    """Each optimizer step's micro-batches, collated, with their weights in the step's loss.

    A micro-batch holds whole examples (at most `micro_batch` sequences of M passes), so RLOO stays exact.
    """
    order = batch_order(len(data.train), args.batch_size, args.seed)
    for _ in range(start_step * args.grad_accum):  # --resume: skip the batches already trained on
        next(order)
    rows_per_forward = max(1, args.micro_batch // samples) if args.micro_batch else args.batch_size
    while True:
        micro_batches = []
        for _ in range(args.grad_accum):
            idx = next(order)
            for j in range(0, len(idx), rows_per_forward):
                chunk = [data.train[i] for i in idx[j : j + rows_per_forward]]
                micro_batches.append((collate(chunk, data.pad_id), len(chunk) / len(idx) / args.grad_accum))
        yield micro_batches


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[dict[str, torch.Tensor], float]],
    start: _Start,
    generator: torch.Generator,
    max_grad_norm: float,
    trace: RoutingTrace | None = None,
) -> tuple[float, float, int]:
    """Forward and backward over each micro-batch (gradients accumulate), clip, step.

    Returns the step's mean NLL, its router term and its tokens (padding included).
    """
    nll_sum, router_sum, tokens = 0.0, 0.0, 0
    for batch, scale in micro_batches:
        if trace is not None:
            with trace.batch(batch["attention_mask"]):
                loss, nll, router_term = batch_loss(model, batch, start.router, start.samples, generator)
        else:
            loss, nll, router_term = batch_loss(model, batch, start.router, start.samples, generator)
        (loss * scale).backward()
        nll_sum += float(nll.detach()) * scale  # sync point: one .item()-style read per micro-batch
        router_sum += float(router_term.detach()) * scale
        tokens += int(batch["attention_mask"].sum())
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return nll_sum, router_sum, tokens


@dataclass
class _Progress:
    """The loop's counters; the checkpoint's `training` record is written from them."""

    step: int
    total: int
    history: list[dict]  # {"step", "train_loss" or "eval_loss"}, continued across --resume
    t_start: float  # time.time() when train() began
    initial_eval: EvalResult | None = None
    recent: list[float] = field(default_factory=list)  # train losses of the last 20 steps
    tokens: int = 0  # tokens trained on in this run
    trace: dict | None = None  # TrainResult.trace, when tracing


def _write_checkpoint(
    model: nn.Module,
    args: TrainArgs,
    start: _Start,
    data: _Data,
    optimizer: torch.optim.Optimizer,
    run: _Progress,
    stopped_by: str | None,
) -> RemixConfig:
    """Cast the adapter to the checkpoint dtype, evaluate it, and write it with its training record and report."""
    config = start.config
    _cast_adapter(model, config.torch_dtype)
    t0 = time.time()
    final = evaluate(model, data.report, data.pad_id)
    if data.eval:
        run.history.append({"step": run.step, "eval_loss": round(final.loss, 5)})
        _trace_eval(run, final, time.time() - t0)
        print(f"step {run.step}/{run.total} eval_loss {final.loss:.6f}", flush=True)
    groups = optimizer.param_groups
    config.training = {
        "command": args.command,
        "router": start.router,
        "data": str(args.data),
        "examples": len(data.train),
        "eval_data": str(args.eval_data) if args.eval_data else None,
        "eval_examples": len(data.eval) if data.eval else 0,
        "step": run.step,
        "max_steps": run.total,
        "samples": start.samples,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "lr": args.lr,
        "router_lr": groups[1]["base_lr"] if len(groups) > 1 else None,
        "max_len": args.max_len,
        "seed": args.seed,
        "train_loss": round(sum(run.recent) / len(run.recent), 5) if run.recent else None,  # last 20 steps
        "eval_loss": final.loss if data.eval else None,
        "eval_loss_initial": run.initial_eval.loss if run.initial_eval else None,
        **usage_stats(final, run.initial_eval),
        "tokens_this_run": run.tokens,
        "wall_s_this_run": round(time.time() - run.t_start, 1),
        "resumed_from": str(args.resume) if args.resume else None,
        "stopped_by": stopped_by,
        "history": run.history,
    }
    save_model(model, args.out, config, extra_files=report.report_files(config, config.base_model, final, args))
    return config


def _trace_eval(run: _Progress, ev: EvalResult, seconds: float) -> None:
    if run.trace is not None:
        run.trace["evals"].append({
            "step": run.step,
            "s": round(seconds, 3),
            "eval_loss": round(ev.loss, 5),
            "weight_ess": round(ev.weight_ess, 4),
            "usage_ess": {str(k): round(v, 4) for k, v in ev.usage_ess.items()},
            "router_ess": {str(k): v for k, v in ev.router_ess.items()},
        })  # fmt: skip


def train(args: TrainArgs) -> TrainResult:
    """Train a ReMix (or baseline) adapter and write it, with a model card and routing.png, to `args.out`."""
    from tqdm import tqdm

    t_start = time.time()
    _check_out(Path(args.out))
    if not report.have_matplotlib():
        print("remix-train: matplotlib is not installed; the checkpoint will have no routing.png", file=sys.stderr)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    torch.manual_seed(args.seed)

    start = _resolve_start(args)  # base and config (fresh or --resume)
    data = _load_data(args, start.base_path)
    model = _build_model(start)
    optimizer = _build_optimizer(model, start.router, args)
    total = _total_steps(args, len(data.train))
    eval_every = args.eval_every or max(1, total // 4)
    batches = _step_batches(args, data, start.samples, start.step)
    rng = torch.Generator().manual_seed(args.seed * 1_000_003 + start.step)  # Gumbel noise of the routed passes
    run = _Progress(start.step, total, list(start.config.training.get("history", [])), t_start)
    tracer = RoutingTrace(model) if args.trace_routing else None
    run.trace = {"steps": [], "evals": []} if tracer else None

    with StopSignals() as stop:
        t0 = time.time()
        run.initial_eval = evaluate(model, data.eval, data.pad_id) if data.eval else None
        if run.initial_eval:
            run.history.append({"step": run.step, "eval_loss": round(run.initial_eval.loss, 5)})
            _trace_eval(run, run.initial_eval, time.time() - t0)
        bar = tqdm(total=total, initial=run.step, disable=not args.progress, dynamic_ncols=True, file=sys.stderr)
        while run.step < total and stop.received is None:
            t0 = time.time()
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(run.step, total, args.warmup)
            if tracer:
                tracer.pop()  # drop what the hooks saw outside training steps (the eval forwards)
            nll, router_term, tokens = _train_step(
                model, optimizer, next(batches), start, rng, args.max_grad_norm, tracer
            )
            run.step, run.tokens, run.recent = run.step + 1, run.tokens + tokens, (run.recent + [nll])[-20:]
            if tracer:
                run.trace["steps"].append({"step": run.step, "s": round(time.time() - t0, 3), **tracer.pop()})
            tok_s = tokens / max(time.time() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{nll:.4f}", router=f"{router_term:+.4f}", tok_s=f"{tok_s:.0f}")
            if args.log_every and (run.step % args.log_every == 0 or run.step == total):
                line = f"step {run.step}/{total} loss {nll:.4f} router {router_term:+.4f} tok/s {tok_s:.0f}"
                tqdm.write(line, file=sys.stdout)
                run.history.append({"step": run.step, "train_loss": round(nll, 5)})
            if data.eval and run.step % eval_every == 0 and run.step < total and stop.received is None:
                t_eval = time.time()
                ev = evaluate(model, data.eval, data.pad_id)
                tqdm.write(f"step {run.step}/{total} eval_loss {ev.loss:.4f}", file=sys.stdout)
                run.history.append({"step": run.step, "eval_loss": round(ev.loss, 5)})
                _trace_eval(run, ev, time.time() - t_eval)
        bar.close()
        if tracer:
            tracer.close()
        # Write the last finished step. Signals stay caught until the folder is in place.
        config = _write_checkpoint(model, args, start, data, optimizer, run, stop.received)
    return TrainResult(
        path=Path(args.out), config=config, steps=run.step, stopped_by=stop.received, trace=run.trace or {}
    )
