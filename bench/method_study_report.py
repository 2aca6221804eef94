"""The method study's output: docs/results.md (tables over seeds) and its four figures, from the cached run JSON.

Called by bench/method_study.py; holds no training or evaluation, only arithmetic over results and plotting.
"""

from __future__ import annotations

import statistics
from pathlib import Path

FIGURES = {
    "m": "study-accuracy-vs-M.png",
    "k": "study-accuracy-vs-k.png",
    "ess": "study-routing-ess.png",
    "usage": "study-usage-heatmaps.png",
}


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    m, s = mean_sd([v * scale for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _acc(evals: dict, names: list[str], skill: str | None = None) -> list[float]:
    """Exact-match accuracy (mean over skills, or one skill) of each named run."""
    out = []
    for n in names:
        served = evals[n]["served"]
        out.append(served["accuracy_mean"] if skill is None else served["accuracy"].get(skill, 0.0))
    return out


def _last_eval(run: dict) -> dict:
    return run["trace"]["evals"][-1]


def _router_ess_ends(runs: list[dict], layer: str, width: int = 10, key: str = "router_ess") -> tuple[float, float]:
    """An ESS trace (`key`) at `layer`, mean over the first and over the last `width` steps, then over runs."""
    first = [statistics.mean(s[key][layer] for s in r["trace"]["steps"][:width]) for r in runs]
    last = [statistics.mean(s[key][layer] for s in r["trace"]["steps"][-width:]) for r in runs]
    return statistics.mean(first), statistics.mean(last)


def _claims(methods, final, evals, runs: dict, layer: str) -> list[str]:
    """The paper's orderings, checked on the means; "clear" when the means differ by more than both spreads."""
    have = {m.name for m in methods}
    acc = {m.name: mean_sd(_acc(evals, final[m.name])) for m in methods}
    rows = []

    def compare(claim: str, paper: str, hi: str, lo: str) -> None:
        if hi not in have or lo not in have:
            return
        (mh, sh), (ml, sl) = acc[hi], acc[lo]
        holds = "yes" if mh > ml else ("tie" if mh == ml else "no")
        if mh > ml and mh - ml <= max(sh, sl):
            holds = "yes, within the spread"
        elif mh < ml and ml - mh <= max(sh, sl):
            holds = "no, within the spread"
        rows.append(f"| {claim} | {paper} | {100 * mh:.1f} vs {100 * ml:.1f} | {holds} |")

    compare("ReMix k=2 beats one rank-16 LoRA", "59.67 vs 54.51 (GSM8K)", "remix-k2-M4", "lora-r16")
    compare("ReMix beats the softmax router (MixLoRA)", "60.77 vs 57.43 (3-task average)", "remix-k2-M4", "softmax-k2")
    compare("ReMix k=1 beats one rank-8 LoRA (same active parameters)", "- (not reported)", "remix-k1-M4", "lora-r8")
    compare("accuracy rises with k: k=2 over k=1", "59.67 vs 56.18 (GSM8K)", "remix-k2-M4", "remix-k1-M4")
    compare("accuracy rises with k: k=4 over k=2", "64.22 vs 59.67 (GSM8K)", "remix-k4-M4", "remix-k2-M4")
    compare("accuracy rises with M: M=4 over M=2", "56.79 vs 56.03 (GSM8K)", "remix-k2-M4", "remix-k2-M2")
    compare("accuracy rises with M: M=8 over M=4", "57.47 vs 56.79 (GSM8K)", "remix-k2-M8", "remix-k2-M4")
    if {"softmax-k2", "remix-k2-M4"} <= have:
        s0, s1 = _router_ess_ends([runs[n] for n in final["softmax-k2"]], layer)
        r0, r1 = _router_ess_ends([runs[n] for n in final["remix-k2-M4"]], layer)
        w0, w1 = _router_ess_ends([runs[n] for n in final["softmax-k2"]], layer, key="weight_ess")
        # "yes" asks for a collapse of the softmax router (at least halved) and none of ReMix's; where both halve,
        # the routers both concentrate and what still differs is the weights applied (ReMix's stay k equal ones)
        if s1 <= 0.5 * s0:
            holds = "yes" if r1 > 0.5 * r0 else "no: both routers concentrate; only the weights applied differ"
        else:
            holds = "it falls, no collapse" if s1 < s0 and r1 > s1 else "no"
        rows.append(f"| the softmax router's ESS collapses, ReMix's does not (layer {layer}, first -> last 10 steps)"
                    f" | about 4 -> 1 within 1,000 steps (MixLoRA, last layer) | router ESS (q over n): softmax"
                    f" {s0:.2f} -> {s1:.2f}, ReMix {r0:.2f} -> {r1:.2f}; ESS of the k = 2 weights applied: softmax"
                    f" {w0:.2f} -> {w1:.2f}, ReMix 2 by construction | {holds} |")  # fmt: skip
    return rows


def _machines(runs) -> str:
    """The CPUs the runs trained on, with how many runs each ("unrecorded" for runs from before `machine`)."""
    counts: dict[str, int] = {}
    for r in runs:
        m = r.get("machine")
        key = f"{m['cpu']} ({m['cores']} cores, {m['capability']})" if m else "unrecorded"
        counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{k}: {v} runs" for k, v in counts.items())


def _plot_scaling(path: Path, title: str, xlabel: str, points, refs) -> None:
    """points: [(x, [accuracies over seeds])]; refs: [(label, [accuracies])] drawn as horizontal bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
    xs = [x for x, _ in points]
    ms = [100 * mean_sd(v)[0] for _, v in points]
    sds = [100 * mean_sd(v)[1] for _, v in points]
    ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=4, label="ReMix (mean ± sd over seeds)")
    for i, (label, values) in enumerate(refs):
        m, s = mean_sd([100 * v for v in values])
        color = f"C{i + 1}"
        ax.axhline(m, color=color, linestyle="--", linewidth=1, label=f"{label}: {m:.1f}")
        ax.axhspan(m - s, m + s, color=color, alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("exact match, mean over skills (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _smooth(values: list[float], width: int = 10) -> list[float]:
    """Trailing moving average (per-step statistics of one batch of 8 examples are noisy)."""
    return [statistics.mean(values[max(0, i - width + 1) : i + 1]) for i in range(len(values))]


def _plot_ess(path: Path, runs_by_method: dict[str, list[dict]], layer: str) -> None:
    """Over training steps, mean over seeds: router ESS (q over n) at the last adapted layer, the applied weights'
    ESS and the selection counts' (usage) ESS, both averaged over layers; 10-step moving averages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("router_ess", f"router ESS (q over the n LoRAs), layer {layer}"),
        ("weight_ess", "ESS of the applied weights, mean over layers"),
        ("usage_ess", "usage ESS of each batch's selections (ReMix: sampled), mean over layers"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), dpi=110)
    for i, (label, runs) in enumerate(runs_by_method.items()):
        if not runs:
            continue
        steps = [s["step"] for s in runs[0]["trace"]["steps"]]
        for ax, (key, _) in zip(axes, panels, strict=True):
            if key == "router_ess":
                series = [[s[key][layer] for s in r["trace"]["steps"]] for r in runs]
            else:
                series = [[statistics.mean(s[key].values()) for s in r["trace"]["steps"]] for r in runs]
            mean = [statistics.mean(col) for col in zip(*series, strict=True)]
            ax.plot(steps, _smooth(mean), color=f"C{i}", label=label)
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("step (training batches)")
        ax.set_ylabel("ESS")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_usage(path: Path, panels: list[tuple[str, dict]], layers: list[str]) -> None:
    """Per-skill share of each LoRA's selections: one heatmap per (method, layer); panels: [(label, reference eval)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), len(layers), figsize=(3.4 * len(layers), 2.6 * len(panels)), dpi=110,
                             squeeze=False)  # fmt: skip
    for row, (label, ref) in enumerate(panels):
        skills = sorted(ref["skills"])
        for col, layer in enumerate(layers):
            counts = [ref["skills"][s]["usage"][layer] for s in skills]
            shares = [[c / max(sum(r), 1) for c in r] for r in counts]
            ax = axes[row][col]
            im = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0.0)
            ax.set_yticks(range(len(skills)))
            ax.set_yticklabels(skills, fontsize=7)
            ax.set_xticks(range(len(shares[0])))
            ax.set_xlabel("LoRA", fontsize=7)
            ax.set_title(f"{label}, layer {layer}", fontsize=8)
            fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(
    out: Path, scale, methods, chosen, final, runs, evals, wall_s: float, command: list[str], expected_runs: int
) -> None:
    """Write out/results.md and the figures (FIGURES) from the study's cached results.

    `final` holds the evaluated runs of each method (fewer than the seeds while the study is in progress);
    `expected_runs` is how many the whole study has, so that a partial report says so at the top."""
    out.mkdir(parents=True, exist_ok=True)
    evaluated = sum(len(v) for v in final.values())
    names = {m.name for m in methods}
    layers = [str(x) for x in scale.layers]
    skills = sorted(evals[final[methods[0].name][0]]["served"]["accuracy"])
    compute_s = sum(r["wall_s"] for r in runs.values() if r["method"] in names)
    eval_s = sum(
        e.get("wall_s", 0) + e["served"]["engine_start_s"] + e["served"]["generate_s"]
        for n, e in evals.items()
        if n != "base"
    )
    lines = [
        "# Does ReMix beat its baselines on SmolLM2-135M?",
        "",
        "Written by `bench/method_study.py` (issue 12); every number below comes from its cached run files.",
        "",
        *(
            [
                f"**In progress: {evaluated} of {expected_runs} final runs evaluated.** Means and spreads are over the"
                " seeds done so far (the `seeds` column); a method appears once its learning-rate sweep is done. Run"
                " the command again to continue.",
                "",
            ]
            if evaluated < expected_runs
            else []
        ),
        "```",
        " ".join(command),
        "```",
        "",
        f"Wall time of this invocation: {wall_s / 60:.1f} min (cached runs are not retrained). Compute behind the"
        f" tables: training {compute_s / 60:.1f} min over {sum(1 for r in runs.values() if r['method'] in names)}"
        f" runs, evaluation {eval_s / 60:.1f} min, on {_machines(r for r in runs.values() if r['method'] in names)}.",
        "",
        "## Set-up",
        "",
        f"- Base `{scale.base}`, adapted layers {', '.join(layers)} ({', '.join(scale.target_modules)}),"
        f" alpha {scale.alpha:g}, adapter float32.",
        f"- Data: `examples/make_data.py --study` (seed {scale.data_seed}): {scale.n_train} training, {scale.n_dev}"
        f" dev (learning-rate choice), {scale.n_test} test examples, six skills in equal shares.",
        f"- Every run: {scale.steps} steps of {scale.batch_size} examples, warmup {scale.warmup}, cosine to 10%,"
        " AdamW, the same batch order for a given seed.",
        f"- Learning rates tried on seed {scale.seeds[0]}: {', '.join(f'{x:g}' for x in scale.lrs)}; the lowest dev"
        f" loss wins and trains on seeds {', '.join(map(str, scale.seeds))}.",
        f"- Exact match: greedy answers (at most {scale.max_tokens} tokens) from vLLM's offline `LLM` with the"
        " remix plugin loading each checkpoint, compared with the reference answer after stripping whitespace.",
        "- Mean ± sample standard deviation over seeds.",
        "",
        "## The paper's claims at this scale",
        "",
        "| claim | paper (Llama 3 8B) | here (exact match %, mean over seeds) | ordering holds |",
        "| --- | --- | --- | --- |",
        *_claims(methods, final, evals, runs, layers[-1]),
        "",
        "## Results",
        "",
        "| method | lr | seeds | test loss | exact match % | " + " | ".join(skills) + " | train s / run |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in skills) + " | --- |",
    ]
    if "base" in evals:
        base_acc = evals["base"]["served"]["accuracy"]
        lines.append(
            f"| base model (no adapter) | - | - | - | {100 * statistics.mean(base_acc.values()):.1f} | "
            + " | ".join(f"{100 * base_acc[s]:.1f}" for s in skills)
            + " | - |"
        )
    for m in methods:
        ns = final[m.name]
        lines.append(
            f"| {m.label} | {chosen[m.name]:g} | {len(ns)} | {fmt([evals[n]['test_loss'] for n in ns], digits=4)} | "
            f"{fmt(_acc(evals, ns), 100)} | "
            + " | ".join(fmt(_acc(evals, ns, s), 100) for s in skills)
            + f" | {statistics.mean(runs[n]['wall_s'] for n in ns):.0f} |"
        )
    lines += [
        "",
        "## Routing",
        "",
        "Router ESS is the effective support size of q = softmax(P x) over the n LoRAs (1: the router puts all mass on"
        " one LoRA; n: uniform), weight ESS that of the weights applied (k for ReMix by construction), usage ESS that"
        " of each layer's selection counts on the dev set. Final values, mean over layers, over seeds.",
        "",
        "| method | router ESS at step 1 | router ESS, last step | weight ESS, last step | usage ESS (dev) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m in methods:
        if m.router == "lora":
            continue
        rs = [runs[n] for n in final[m.name]]
        first = [statistics.mean(r["trace"]["steps"][0]["router_ess"].values()) for r in rs]
        last = [statistics.mean(r["trace"]["steps"][-1]["router_ess"].values()) for r in rs]
        w = [statistics.mean(r["trace"]["steps"][-1]["weight_ess"].values()) for r in rs]
        usage = [statistics.mean(_last_eval(r)["usage_ess"].values()) for r in rs]
        lines.append(f"| {m.label} | {fmt(first, digits=2)} | {fmt(last, digits=2)} | {fmt(w, digits=2)} |"
                     f" {fmt(usage, digits=2)} |")  # fmt: skip
    # rates outside --lrs that seed 0 also trained (an earlier, wider sweep) are shown, marked, and choose nothing
    seed0 = {r["lr"] for r in runs.values() if r["seed"] == scale.seeds[0] and r["method"] in names}
    shown = sorted(seed0 | set(scale.lrs))
    lines += [
        "",
        "## Learning-rate sweep (seed 0, dev loss)",
        "",
        "| method | "
        + " | ".join(f"lr {x:g}" + ("" if x in scale.lrs else " (earlier)") for x in shown)
        + " | chosen |",
        "| --- | " + " | ".join("---" for _ in shown) + " | --- |",
    ]
    for m in methods:
        cells = []
        for lr in shown:
            r = runs.get(f"{m.name}_lr{lr:g}_s{scale.seeds[0]}")
            cells.append(f"{r['dev_loss']:.4f}" if r else "-")
        end = _sweep_end(chosen[m.name], scale.lrs)
        lines.append(f"| {m.label} | " + " | ".join(cells) + f" | {chosen[m.name]:g}{end} |")
    if any(_sweep_end(chosen[m.name], scale.lrs) for m in methods):
        lines += ["", "A rate chosen at an end of the sweep may be short of that method's best: widen `--lrs`."]
    if len(shown) > len(scale.lrs):
        lines += ["", "Rates marked (earlier) were trained by an earlier, wider sweep; they are not in `--lrs` and"
                  " choose nothing (their runs count in the compute above)."]  # fmt: skip

    figures = _figures(out, methods, final, runs, evals, layers)
    if figures:
        lines += ["", "## Figures", ""] + [f"![{alt}]({name})\n" for alt, name in figures]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out / 'results.md'}", flush=True)


def _sweep_end(lr: float, lrs: tuple[float, ...]) -> str:
    """Mark a chosen rate that no tried rate brackets: the sweep cannot tell whether a rate beyond it is better."""
    if len(lrs) == 1:
        return " (the only rate tried)"
    return " (top of the sweep)" if lr == max(lrs) else " (bottom of the sweep)" if lr == min(lrs) else ""


def _figures(out: Path, methods, final, runs, evals, layers: list[str]) -> list[tuple[str, str]]:
    """Draw what the chosen methods allow; returns (alt text, file name) of each figure written."""
    have = {m.name for m in methods}
    written = []

    def refs(*names: str) -> list:
        return [(BY_LABEL.get(n, n), _acc(evals, final[n])) for n in names if n in have]

    m_points = [(mm, _acc(evals, final[f"remix-k2-M{mm}"])) for mm in (2, 4, 8) if f"remix-k2-M{mm}" in have]
    if m_points:
        _plot_scaling(out / FIGURES["m"], "ReMix n=8 k=2 r=8: accuracy against M", "M (routed passes per example)",
                      m_points, refs("lora-r16", "softmax-k2"))  # fmt: skip
        written.append(("accuracy against M", FIGURES["m"]))
    k_points = [(k, _acc(evals, final[f"remix-k{k}-M4"])) for k in (1, 2, 4) if f"remix-k{k}-M4" in have]
    if k_points:
        _plot_scaling(out / FIGURES["k"], "ReMix n=8 r=8 M=4: accuracy against k", "k (LoRAs per token)",
                      k_points, refs("lora-r8", "lora-r16", "softmax-k2"))  # fmt: skip
        written.append(("accuracy against k", FIGURES["k"]))
    ess_runs = {BY_LABEL[n]: [runs[x] for x in final[n]] for n in ("softmax-k2", "remix-k2-M4") if n in have}
    if ess_runs:
        _plot_ess(out / FIGURES["ess"], ess_runs, layers[-1])
        written.append(("routing ESS over steps", FIGURES["ess"]))
    panels = [(BY_LABEL[n], evals[final[n][0]]) for n in ("softmax-k2", "remix-k2-M4") if n in have]
    if panels:
        _plot_usage(out / FIGURES["usage"], panels, [layers[0], layers[-1]] if len(layers) > 1 else layers)
        written.append(("per-skill LoRA usage", FIGURES["usage"]))
    return written


BY_LABEL = {
    "lora-r8": "LoRA r=8",
    "lora-r16": "LoRA r=16",
    "softmax-k2": "softmax router k=2",
    "remix-k2-M4": "ReMix k=2 M=4",
}
