"""remix-train's arguments (`TrainArgs`), its named presets, and the checkpoint config they imply (`build_config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from remix_serve import bases, routing
from remix_serve.checkpoint import PROJECTIONS, RemixConfig

# Baselines are flag values, not separate trainers: "softmax" is MixLoRA-style (deterministic top-k with learned
# renormalised weights, end to end by backprop), "lora" is plain LoRA (n = k = 1, no router).
RouterKind = Literal["remix", "softmax", "lora"]


@dataclass
class TrainArgs:
    """Everything a training run needs; the defaults finish on a laptop CPU in minutes."""

    base: str  # bundled base name ("smollm2-135m") or a Hugging Face model folder
    data: str  # JSONL training data
    out: str  # checkpoint folder to write
    eval_data: str | None = None  # JSONL held-out data (periodic eval loss, usage heatmap)
    router: RouterKind = "remix"  # remix (RLOO) | softmax (MixLoRA-style baseline) | lora (n = k = 1)
    loras: int = 8  # n, LoRAs per adapted layer
    top_k: int = 2  # k, LoRAs selected per token
    rank: int = 8  # r
    samples: int = 4  # M, routed passes per example (remix only; >= 2)
    alpha: float = 16.0
    omega_rule: routing.OmegaRule = "lora"  # omega = alpha/(k r) ("lora") or alpha/sqrt(k r) ("rslora")
    target_modules: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    layers: list[int] | None = None  # adapted decoder layers; None = all
    lr: float = 1e-3  # LoRA learning rate (AdamW)
    router_lr: float | None = None  # router learning rate; None = lr
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs; with resume, the total including earlier steps
    batch_size: int = 4  # examples per micro-step (each runs M routed passes)
    grad_accum: int = 1  # micro-steps per optimizer step
    micro_batch: int = 0  # most sequences (examples x M) per forward; 0 = the whole batch in one forward
    max_len: int = 256  # longer examples are reported as data errors, never truncated
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # adapter dtype in the checkpoint
    warmup: int = 10  # linear warmup steps, then cosine decay to 10%
    max_grad_norm: float = 1.0
    eval_every: int = 0  # steps between eval losses; 0 = about 4 per run
    log_every: int = 10  # steps between printed log lines; 0 = none
    resume: str | None = None  # continue from this checkpoint (weights and step count; AdamW state restarts)
    threads: int | None = None  # torch threads; None = the CPUs this process may use
    progress: bool = True  # show a tqdm progress bar
    command: str | None = None  # command line recorded in the model card
    trace_routing: bool = False  # Python API only: TrainResult.trace gets routing ESS per step and per eval


# Named argument sets for `remix-train --preset NAME`: TrainArgs field values (paths relative to the repository
# root); flags given explicitly override them. "demo" is exactly the command that examples/demo-adapter's model card
# records (tests/train/test_train_preset.py checks it field by field), without --out.
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {  # the method study's best configuration (docs/results.md: ReMix k = 4, M = 4, lr 1e-2) on its data
        "base": "smollm2-135m",
        "data": "examples/data/study/train.jsonl",
        "eval_data": "examples/data/study/dev.jsonl",
        "loras": 8,
        "top_k": 4,
        "rank": 8,
        "samples": 4,
        "layers": list(range(18, 30)),
        "target_modules": ["up_proj", "down_proj"],
        "batch_size": 8,
        "max_steps": 600,
        "lr": 1e-2,
        "dtype": "bfloat16",
        "max_len": 128,
        "eval_every": 150,
        "log_every": 10,
        "threads": 1,
        "seed": 0,
    },
}


def build_config(args: TrainArgs, base_model: str, base_path: Path) -> RemixConfig:
    """The checkpoint config implied by the arguments (`--router lora` forces n = k = 1)."""
    n, k = (1, 1) if args.router == "lora" else (args.loras, args.top_k)
    weighting: routing.Weighting = "softmax" if args.router == "softmax" else "constant"
    return RemixConfig(
        base_model=base_model,
        base_fingerprint=bases.base_fingerprint(str(base_path)),
        num_loras=n,
        top_k=k,
        rank=args.rank,
        alpha=args.alpha,
        omega_rule=args.omega_rule,
        omega=routing.omega(args.alpha, k, args.rank, args.omega_rule, weighting),
        target_modules=list(args.target_modules),
        layers=sorted(args.layers) if args.layers is not None else None,
        weighting=weighting,
        dtype=args.dtype,
    )
