"""remix-serve's pool mode at start-up: the checkpoints, their one base, the pool's sizes, vLLM's command line.

Everything here runs before any engine starts; a problem is a StartupError (remix-serve exits 2 with its message).
The API-process side (routes, checks on load/unload, the `--adapter-dir` resolver) is `server/pool.py`; the two
share `PoolServerConfig`, which the CLI passes in the environment (`POOL_ENV`), as it does `--show-adapter-paths`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from remix_serve import bases
from remix_serve.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    RemixConfig,
    fingerprint_problems,
    load_checkpoint,
    load_config,
)
from remix_serve.vllm_plugin.pool.pages import PoolError
from remix_serve.vllm_plugin.spec import POOL_ENV, PoolSettings

logger = logging.getLogger(__name__)

MAX_LORAS_DEFAULT_CAP = 8


class StartupError(ValueError):
    """Pool mode cannot start: the message names the bad flag, checkpoint or value."""


class PoolServerConfig(BaseModel):
    """What the API process needs to know about the pool server beyond vLLM's own arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_name: str
    base_path: str
    adapter_dirs: list[str]
    allowed_roots: list[str]
    max_loras: int

    def to_env(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_env(cls) -> PoolServerConfig | None:
        value = os.environ.get(POOL_ENV)
        return cls.model_validate_json(value) if value else None


def parse_adapter(value: str) -> tuple[str, Path]:
    """`--adapter PATH` or `NAME=PATH` -> (name, absolute path); the name defaults to the folder's name.

    A value that exists as a path is a path even if it holds '='."""
    if "=" in value and not Path(value).exists():
        name, path = value.split("=", 1)
        if not name:
            raise StartupError(f"--adapter {value!r}: empty name before '='")
    else:
        name, path = "", value
    folder = Path(path).expanduser().resolve()
    return name or folder.name, folder


def find_checkpoints(folder: str | os.PathLike) -> dict[str, Path]:
    """Sub-folders of `folder` holding remix_config.json, by folder name (sorted)."""
    root = Path(folder)
    return {p.name: p.resolve() for p in sorted(root.iterdir()) if (p / CONFIG_FILE).is_file()}


def default_max_loras(count: int) -> int:
    """Checkpoints per engine step when --max-loras is not given: every start-up checkpoint, at least 1, at most 8
    (each slot costs one router row per layer and one page-table row; 8 keeps a mixed batch cheap)."""
    return max(1, min(MAX_LORAS_DEFAULT_CAP, count))


def pool_vllm_argv(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """Validate pool mode's checkpoints and flags; return vLLM's model and LoRA flags (the CLI adds the flags both
    modes share) and the environment to set."""
    from remix_serve.vllm_plugin import pool_engine_kwargs
    from remix_serve.vllm_plugin.pool.sizing import plan_pool

    if args.name:
        raise StartupError("--name is for one checkpoint; in pool mode name each one with --adapter NAME=PATH")
    if args.tensor_parallel_size != 1:
        raise StartupError("pool mode serves with --tensor-parallel-size 1 only (for now)")
    adapters: dict[str, Path] = {}
    for value in args.adapter:
        name, path = parse_adapter(value)
        if name in adapters:
            raise StartupError(
                f"two checkpoints are named {name!r}: {adapters[name]} and {path}; name one with --adapter NAME=PATH"
            )
        adapters[name] = path
    dirs = [Path(d).expanduser().resolve() for d in args.adapter_dir]
    for d in dirs:
        if not d.is_dir():
            raise StartupError(f"--adapter-dir {d} is not a folder")
    checkpoints = {}
    for name, path in adapters.items():
        try:
            checkpoints[name] = load_checkpoint(path)
        except CheckpointError as e:
            raise StartupError(f"invalid checkpoint {name!r} ({path}):\n{e}") from None
    # The base: that of the first start-up checkpoint, else that of the first checkpoint found in an --adapter-dir
    found: dict[str, tuple[Path, RemixConfig]] = {}
    for d in dirs:
        for name, path in find_checkpoints(d).items():
            if name in adapters or name in found:
                continue
            try:
                found[name] = (path, load_config(path))
            except CheckpointError as e:
                logger.warning("remix-serve: skipping %s in --adapter-dir %s:\n%s", name, d, e)
    if checkpoints:
        first = next(iter(checkpoints.values()))
        first_name = next(iter(checkpoints))
        base_cfg, base_rel = first.config, first.path
    elif found:
        first_name, (base_rel, base_cfg) = next(iter(found.items()))
    else:
        where = ", ".join(map(str, dirs)) or "(none)"
        raise StartupError(
            f"no checkpoint to serve: no --adapter, and no sub-folder holding {CONFIG_FILE} in --adapter-dir {where}"
        )
    try:
        base = bases.resolve_base(base_cfg.base_model, relative_to=base_rel)
        base_fp = bases.base_fingerprint(str(base))
    except bases.BaseModelError as e:
        raise StartupError(f"checkpoint {first_name!r}: base_model: {e}") from None
    for name, ckpt in checkpoints.items():
        problems = fingerprint_problems(ckpt.config, base_fp, f"{ckpt.path}/{CONFIG_FILE}", f"base {str(base)!r}")
        if problems:
            raise StartupError(
                f"checkpoint {name!r} ({ckpt.path}) is for another base than {first_name!r} (served base {base});"
                " all checkpoints of a server share one base:\n" + "\n".join(problems)
            )
    sizing = [c.config for c in checkpoints.values()]
    for name, (path, cfg) in list(found.items()):
        if fingerprint_problems(cfg, base_fp, str(path), str(base)):
            logger.warning("remix-serve: %s (--adapter-dir) is for another base than %s; it will not load", name, base)
            continue
        sizing.append(cfg)

    base_config = json.loads((base / "config.json").read_text())
    base_name = args.base_name or base.name
    if base_name in adapters:
        raise StartupError(f"checkpoint name {base_name!r} is the base model's served name; rename one (--base-name)")
    max_loras = args.max_loras or default_max_loras(len(checkpoints) or len(sizing))
    if max_loras < 1:
        raise StartupError(f"--max-loras {max_loras}: must be at least 1")
    dtype = args.dtype if args.dtype in ("float32", "bfloat16", "float16") else base_config.get("torch_dtype")
    try:
        settings = plan_pool(
            sizing,
            max_loras=max_loras,
            hidden_size=base_config["hidden_size"],
            intermediate_size=base_config["intermediate_size"],
            dtype=dtype,
            pool_size=args.pool_size,
            r_page=args.pool_page_rank,
            n_max=args.pool_max_loras_per_layer,
            k_max=args.pool_max_top_k,
            r_max=args.pool_max_rank,
        )
    except PoolError as e:
        raise StartupError(str(e)) from None
    from remix_serve.vllm_plugin.pool.admission import check_admission

    for name, ckpt in checkpoints.items():  # the flags may set limits below a start-up checkpoint
        try:
            check_admission(ckpt.config, name, PoolSettings(**settings), max_loras, base_fp,
                            where=f"{ckpt.path}/{CONFIG_FILE}", base=str(base))  # fmt: skip
        except (CheckpointError, PoolError) as e:
            raise StartupError(f"checkpoint {name!r} does not fit this pool:\n{e}") from None

    kwargs = pool_engine_kwargs(settings, base_config.get("architectures") or [], max_loras)
    argv = [
        "--model", str(base),
        "--tokenizer", str(base),
        "--served-model-name", base_name,
        "--hf-overrides", json.dumps(kwargs["hf_overrides"]),
        "--enable-lora",
        "--max-loras", str(kwargs["max_loras"]),
        "--max-lora-rank", str(kwargs["max_lora_rank"]),
        "--max-cpu-loras", str(kwargs["max_cpu_loras"]),
        "--lora-target-modules", *kwargs["lora_target_modules"],
        "--worker-extension-cls", kwargs["worker_extension_cls"],
    ]  # fmt: skip
    if adapters:
        argv += ["--lora-modules", *(json.dumps({"name": n, "path": str(p)}) for n, p in adapters.items())]
    roots = [*(str(p.parent) for p in adapters.values()), *map(str, dirs)]
    roots += [str(Path(r).expanduser().resolve()) for r in args.allow_adapter_root]
    config = PoolServerConfig(
        base_name=base_name,
        base_path=str(base),
        adapter_dirs=[str(d) for d in dirs],
        allowed_roots=list(dict.fromkeys(roots)),
        max_loras=max_loras,
    )
    # The runtime load/unload routes and LoRA resolvers only exist with this vLLM flag (the plugin checks them)
    env = {POOL_ENV: config.to_env(), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    return argv, env
