"""Training throughput of remix-train's step on the bundled base: M = 1, 2, 4 routed passes batched into one forward,
and, at the largest M, the same step as a Python loop over M (the baseline, run in the same process).

    python bench/train_throughput.py                      # first demo config: n=8 k=2 r=8, layers 22-29, up/down
    python bench/train_throughput.py --layers all --target-modules gate_proj,up_proj,down_proj --threads 2

One timed step = forward + backward of B examples x M selections (loss and RLOO router term as in training), no
optimizer step. Burn-in steps first; then `--rounds` rounds, each timing every config once (interleaved, so load
from other processes hits all configs alike); the median per config is reported. Example tokens/s counts each
example's B*T tokens once per step (what training throughput means to a user); routed tokens/s counts B*M*T.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    from transformers import AutoModelForCausalLM

    from remix_serve import bases, reference, routing
    from remix_serve.checkpoint import RemixConfig
    from remix_serve.train.cli import parse_layers, parse_targets
    from remix_serve.train.data import IGNORE
    from remix_serve.train.loss import rloo_router_loss, routed_losses

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--loras", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layers", type=parse_layers, default=parse_layers("22-29"))
    p.add_argument("--target-modules", type=parse_targets, default=["up_proj", "down_proj"])
    p.add_argument("--batch-size", type=int, default=4, help="examples B per step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens T per example (second half supervised)")
    p.add_argument("--samples", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--burn-in", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    base_path = bases.resolve_base(a.base)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = RemixConfig(
        base_model=a.base, base_fingerprint=bases.base_fingerprint(str(base_path)), num_loras=a.loras, top_k=a.top_k,
        rank=a.rank, alpha=16.0, omega_rule="lora", omega=routing.omega(16.0, a.top_k, a.rank, "lora"),
        target_modules=a.target_modules, layers=a.layers, dtype="float32",
    )  # fmt: skip
    reference.apply_remix(model, config)
    with torch.no_grad():  # B != 0, so selections matter as they do mid-training
        for m in reference.remix_mlps(model).values():
            for b in m.lora_B.values():
                b.normal_(0.0, 0.01)
    model.train()
    B, T = a.batch_size, a.seq_len
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : T // 2] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    gen = torch.Generator().manual_seed(0)

    def batched(M: int) -> None:  # what remix-train runs: one forward over B*M sequences
        losses, log_q = routed_losses(model, batch, M, gen)
        loss = losses.mean() + (rloo_router_loss(losses, log_q) if M > 1 else 0.0)
        loss.backward()

    def looped(M: int) -> None:  # the baseline: M forwards of B sequences, one backward through all of them
        parts = [routed_losses(model, batch, 1, gen) for _ in range(M)]
        losses = torch.cat([p[0] for p in parts], dim=1)  # [B, M]
        log_q = torch.cat([p[1] for p in parts], dim=1)
        (losses.mean() + rloo_router_loss(losses, log_q)).backward()

    configs = [(f"batched M={M}", batched, M) for M in a.samples]
    M_max = max(a.samples)
    configs.append((f"loop    M={M_max}", looped, M_max))
    for _, fn, M in configs:  # burn-in
        for _ in range(a.burn_in):
            fn(M)
            model.zero_grad(set_to_none=True)
    times: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    for _ in range(a.rounds):
        for name, fn, M in configs:
            t0 = time.perf_counter()
            fn(M)  # CPU: synchronous, the timer needs no device sync
            times[name].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)

    layers = "all" if a.layers is None else f"{a.layers[0]}-{a.layers[-1]}"
    head = (
        f"cpu={cpu_name()!r} threads={a.threads} model={a.base} n={a.loras} k={a.top_k} r={a.rank}"
        f" layers={layers} targets={','.join(a.target_modules)} B={B} T={T}"
    )
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, _, M in configs:
        s = med[name]
        print(f"{head} {name}: {s * 1000:.0f} ms/step, example tok/s {B * T / s:.0f}, routed tok/s {B * M * T / s:.0f}")
    ratio = med[f"loop    M={M_max}"] / med[f"batched M={M_max}"]
    print(f"{head} batched vs loop at M={M_max}: {ratio:.2f}x faster (target >= 1.3x)")


if __name__ == "__main__":
    main()
