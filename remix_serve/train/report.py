"""What remix-train writes beside the adapter: a model card (`README.md`) and `routing.png` (usage heatmap)."""

from __future__ import annotations

import importlib.util
import io

from remix_serve.checkpoint import RemixConfig
from remix_serve.train.args import TrainArgs
from remix_serve.train.evaluate import EvalResult


def routing_png(usage: dict[int, list[int]], usage_ess: dict[int, float], title: str) -> bytes:
    """Heatmap of the share of each layer's selections that went to each LoRA (rows: layers, columns: LoRAs)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in servers and CI
    import matplotlib.pyplot as plt

    layers = sorted(usage)
    shares = [[c / max(sum(usage[layer]), 1) for c in usage[layer]] for layer in layers]
    n = len(shares[0]) if shares else 1
    fig, ax = plt.subplots(figsize=(1.6 + 0.55 * n, 1.2 + 0.32 * len(layers)), dpi=100)
    im = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1.0 / n, max(map(max, shares))))
    ax.set_xticks(range(n))
    ax.set_xlabel("LoRA")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([f"layer {layer}  ESS {usage_ess[layer]:.2f}" for layer in layers], fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="share of selections")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def model_card(config: RemixConfig, base_model: str, final: EvalResult, args: TrainArgs) -> str:
    """Markdown model card: command, config, data, steps, losses, per-layer usage and ESS."""
    t = config.training
    n, k, r = config.num_loras, config.top_k, config.rank
    kind = {"remix": "ReMix (RLOO router)", "softmax": "softmax-router baseline (MixLoRA-style)", "lora": "plain LoRA"}
    rloo = f"RLOO, M = {t['samples']} selections per example" if t["router"] == "remix" else "backprop / none"
    stopped = f" (stopped by {t['stopped_by']})" if t["stopped_by"] else ""
    layers = "all" if config.layers is None else ", ".join(map(str, config.adapted_layers))
    lines = [
        f"# {kind[t['router']]} adapter on `{base_model}` (n={n}, k={k}, r={r})",
        "",
        "Written by `remix-train` (remix-serve). Serve it with `remix-serve --adapter <this folder>`.",
        "",
        "## Command",
        "",
        "```",
        t.get("command") or "(Python API: remix_serve.train.train)",
        "```",
        "",
        "## Config",
        "",
        "| key | value |",
        "| --- | --- |",
        f"| base | `{base_model}` |",
        f"| LoRAs n / top-k k / rank r | {n} / {k} / {r} |",
        f"| omega | {config.omega:.6g} (`{config.omega_rule}` rule, alpha {config.alpha:g}) |",
        f"| weighting | `{config.weighting}` |",
        f"| target modules | {', '.join(config.target_modules)} |",
        f"| adapted layers | {layers} |",
        f"| adapter dtype | {config.dtype} |",
        "",
        "## Data and training",
        "",
        "| key | value |",
        "| --- | --- |",
        f"| train data | `{t['data']}` ({t['examples']} examples) |",
        f"| eval data | `{t['eval_data']}` ({t['eval_examples']} examples) |",
        f"| router training | {rloo} |",
        f"| steps | {t['step']} of {t['max_steps']}{stopped} |",
        f"| batch x grad-accum | {t['batch_size']} x {t['grad_accum']} |",
        f"| lr / router lr | {t['lr']:g} / {t['router_lr'] if t['router_lr'] is not None else '-'} |",
        f"| max len / seed | {t['max_len']} / {t['seed']} |",
        f"| wall time (this run) | {t['wall_s_this_run']:.0f} s |",
        "",
        "## Losses",
        "",
        f"- train loss (mean of the last 20 steps): {_fmt(t['train_loss'])}",
        f"- eval loss (top-k routing, token-weighted): {_fmt(t['eval_loss_initial'])} at the start of this run"
        f" -> {_fmt(t['eval_loss'])} at step {t['step']}",
        "",
    ]
    evals = [h for h in t["history"] if "eval_loss" in h]
    if evals:
        lines += ["| step | eval loss |", "| --- | --- |"] + [f"| {h['step']} | {h['eval_loss']:.4f} |" for h in evals]
        lines.append("")
    lines += [
        "## Routing",
        "",
        f"Per-layer LoRA usage under deterministic top-k on {t['usage_data']} data ({final.tokens} supervised tokens):"
        f" share of each layer's selections per LoRA, and the ESS of that usage (1 = one LoRA takes all traffic,"
        f" n = {n} = perfectly even). Mean ESS of the per-token routing weights: {t['routing_weight_ess']:.3f}"
        f" (k = {k} by construction for constant weighting; the softmax baseline collapses toward 1).",
        "",
        "![routing](routing.png)" if have_matplotlib() else "(no routing.png: matplotlib was not installed)",
        "",
        "| layer | " + " | ".join(f"LoRA {i}" for i in range(n)) + " | usage ESS |",
        "| --- | " + " | ".join("---" for _ in range(n)) + " | --- |",
    ]
    for layer, counts in sorted(final.usage.items()):
        total = max(sum(counts), 1)
        shares = " | ".join(f"{c / total:.3f}" for c in counts)
        lines.append(f"| {layer} | {shares} | {final.usage_ess[layer]:.2f} |")
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def have_matplotlib() -> bool:
    """matplotlib is a dev extra (`pip install -e .[dev]`); without it the checkpoint gets no routing.png."""
    return importlib.util.find_spec("matplotlib") is not None


def report_files(config: RemixConfig, base_model: str, final: EvalResult, args: TrainArgs) -> dict[str, str | bytes]:
    """The extra files of a checkpoint written by remix-train: README.md and (with matplotlib) routing.png."""
    files: dict[str, str | bytes] = {"README.md": model_card(config, base_model, final, args)}
    if have_matplotlib():
        title = f"{config.training['router']}: LoRA usage per layer (n={config.num_loras}, k={config.top_k})"
        files["routing.png"] = routing_png(final.usage, final.usage_ess, title)
    return files
