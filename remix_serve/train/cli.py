"""`remix-train`: command-line front end of `remix_serve.train.loop.train`.

    remix-train --base smollm2-135m --data train.jsonl --eval-data eval.jsonl --out ./ckpt \\
        --loras 8 --top-k 2 --rank 8 --samples 4
    remix-train --preset demo --out ./ckpt     # examples/demo-adapter's arguments (see --preset)

Exit status: 0 when done; 128 + signal number (130 SIGINT, 143 SIGTERM) when a signal stopped training early,
after the last finished step was written; 2 on bad arguments or data.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import signal
import sys
import textwrap

from remix_serve.checkpoint import PROJECTIONS, CheckpointError
from remix_serve.train.args import PRESETS, TrainArgs
from remix_serve.train.data import DataError


def parse_layers(text: str) -> list[int] | None:
    """'all' -> None; '20-29' -> [20..29]; '0,2,4' -> [0, 2, 4]; ranges and lists combine ('0-3,8')."""
    if text == "all":
        return None
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return sorted(set(out))


def parse_targets(text: str) -> list[str]:
    names = [t for t in text.split(",") if t]
    bad = [t for t in names if t not in PROJECTIONS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown projection(s) {bad}; known: {', '.join(PROJECTIONS)}")
    return names


def preset_flags(name: str) -> str:
    """A preset as the flags it stands for, for --help."""
    flags = []
    for key, value in PRESETS[name].items():
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        if key == "layers" and value and value == list(range(value[0], value[-1] + 1)):
            text = f"{value[0]}-{value[-1]}"
        flags.append(f"--{key.replace('_', '-')} {text}")
    return " ".join(flags)


def _preset_help() -> str:
    lines = ["named argument set; explicit flags override its values", "(paths are relative to the repository root):"]
    for name in sorted(PRESETS):
        lines += textwrap.wrap(f"{name}: {preset_flags(name)}", 80, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """remix-train's flags; with `preset`, that preset's values are the defaults."""
    d = TrainArgs(base="", data="", out="")  # defaults live in one place: the dataclass
    p = argparse.ArgumentParser(prog="remix-train", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help=_preset_help())
    p.add_argument("--base", help="bundled base name (smollm2-135m) or a Hugging Face model folder")
    p.add_argument("--data", help='JSONL: {"prompt","completion"} or {"messages": [...]} per line')
    p.add_argument("--eval-data", help="held-out JSONL (periodic eval loss, usage heatmap)")
    p.add_argument("--out", required=True, help="checkpoint folder to write (replaced atomically)")
    p.add_argument("--router", choices=["remix", "softmax", "lora"], default=d.router,
                   help="remix (RLOO), softmax (MixLoRA-style baseline) or lora (n = k = 1)")  # fmt: skip
    p.add_argument("--loras", type=int, default=d.loras, help="n: LoRAs per adapted layer")
    p.add_argument("--top-k", type=int, default=d.top_k, help="k: LoRAs per token")
    p.add_argument("--rank", type=int, default=d.rank, help="r: LoRA rank")
    p.add_argument("--samples", type=int, default=d.samples, help="M: routed passes per example (remix; >= 2)")
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--omega-rule", choices=["lora", "rslora"], default=d.omega_rule,
                   help="omega = alpha/(k r) (lora) or alpha/sqrt(k r) (rslora)")  # fmt: skip
    p.add_argument("--target-modules", type=parse_targets, default=d.target_modules,
                   help="comma list of gate_proj,up_proj,down_proj")  # fmt: skip
    p.add_argument("--layers", type=parse_layers, default=None, help="adapted layers: all, 20-29, 0,2,4")
    p.add_argument("--lr", type=float, default=d.lr, help="LoRA learning rate")
    p.add_argument("--router-lr", type=float, default=None, help="router learning rate (default: --lr)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per micro-step")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--micro-batch", type=int, default=d.micro_batch,
                   help="most sequences (examples x M) per forward; 0 = whole batch")  # fmt: skip
    p.add_argument("--max-len", type=int, default=d.max_len, help="longer examples are data errors")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=d.dtype, help="adapter dtype")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evals (0: ~4 per run)")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--resume", help="continue from this checkpoint (its config wins over the flags above)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPUs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if preset is not None:
        p.set_defaults(**copy.deepcopy(PRESETS[preset]))  # a copy: TrainArgs may hold on to the lists
    return p


def parse_args(argv: list[str]) -> TrainArgs:
    """TrainArgs from a command line (without the program name); exits with status 2 on bad flags."""
    preset = build_parser().parse_known_args(argv)[0].preset  # first pass: which preset supplies the defaults
    parser = build_parser(preset)
    ns = parser.parse_args(argv)
    if not ns.base and not ns.resume:
        parser.error("--base is required (unless --resume or --preset gives it)")
    if not ns.data:
        parser.error("--data is required (unless --preset gives it)")
    fields = vars(ns)
    del fields["preset"]
    progress = not fields.pop("no_progress")
    return TrainArgs(**fields, progress=progress, command=shlex.join(["remix-train", *argv]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from remix_serve.train.loop import train

    try:
        result = train(args)
    except (DataError, CheckpointError, ValueError) as e:
        print(f"remix-train: error:\n{e}", file=sys.stderr)
        return 2
    print(f"wrote {result.path} (step {result.steps})")
    if result.stopped_by:
        return 128 + signal.Signals[result.stopped_by].value
    return 0


if __name__ == "__main__":
    sys.exit(main())
