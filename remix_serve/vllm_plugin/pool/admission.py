"""The pool's admission rule, in one place: the worker (`AdapterPool.admit`) and the API server (the
`/v1/load_lora_adapter` checks of remix-serve) both call `check_admission`.

Pure Python over the checkpoint's config: no torch tensors, no vLLM.
"""

from __future__ import annotations

from typing import Any

from remix_serve.checkpoint import CONFIG_FILE, BaseFingerprint, CheckpointError, fingerprint_problems
from remix_serve.vllm_plugin.pool.pages import LoraLayout, PoolError, pages_needed

SIZE_HINT = "raise --pool-size or lower --max-loras"


def check_admission(
    config: Any,
    name: str,
    settings: Any,
    slots: int,
    fingerprint: BaseFingerprint,
    *,
    where: str,
    base: str,
) -> None:
    """Raise unless a checkpoint with RemixConfig `config` can be served under `name` by a pool with
    PoolSettings `settings` and `slots` (vLLM's --max-loras) on a base with `fingerprint`.

    CheckpointError: another base (`where` is the config's path, `base` names the served base), or n, k, r above
    the pool's limits (every problem, one per line). PoolError: the checkpoint needs more than `1/slots` of a
    store, so that the checkpoints of any step would not always fit at once.
    """
    problems = fingerprint_problems(config, fingerprint, where, base)
    for what, value, limit, flag in (
        ("n (num_loras)", config.num_loras, settings.n_max, "--pool-max-loras-per-layer"),
        ("k (top_k)", config.top_k, settings.k_max, "--pool-max-top-k"),
        ("r (rank)", config.rank, settings.r_max, "--pool-max-rank"),
    ):
        if value > limit:
            problems.append(f"checkpoint {name!r} has {what} = {value}; this server allows at most {limit} ({flag})")
    if problems:
        raise CheckpointError(problems)
    layout = LoraLayout.of(config)
    need, share = pages_needed(layout, settings.r_page), {k: v // slots for k, v in settings.pages.items()}
    over = [f"{need[st]} pages of the {st} store" for st in need if need[st] > share[st]]
    if over:
        raise PoolError(
            f"checkpoint {name!r} ({layout.describe()}) needs {' and '.join(over)}; with --max-loras {slots} a"
            f" checkpoint may take at most {share} pages per store, so that every step's checkpoints fit at once"
            f" ({SIZE_HINT})"
        )


def config_where(path: Any) -> str:
    return f"{path}/{CONFIG_FILE}"
