"""`remix-serve`: validate ReMix checkpoints, then run vLLM's OpenAI-compatible server on them.

Two modes. One `--adapter` (and no pool flag): today's single-checkpoint server, the bank fused into the base.
Several `--adapter`s, any `--adapter-dir`, or any pool flag (`--pool-*`, `--max-loras`, `--allow-adapter-root`,
`--base-name`): a multi-checkpoint server (pool mode, `vllm_plugin/pool/`), where each checkpoint is a vLLM LoRA
adapter chosen by the request's `model`, the base is served under its own name, and checkpoints are loaded and
unloaded at run time (`server/pool.py`).

Flags remix-serve does not know are passed to vLLM unchanged (see `python -m vllm.entrypoints.openai.api_server
--help`). A bad checkpoint exits with status 2 and one message, before any engine starts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

EXIT_BAD_CHECKPOINT = 2
DRAIN_SECONDS = 30  # SIGTERM: finish in-flight requests for up to this long (k8s grace period must exceed it)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="remix-serve",
        description="Serve a ReMix Mixture-of-LoRAs checkpoint with vLLM's OpenAI-compatible API "
        "(/v1/completions, /v1/chat/completions, /v1/models, /v1/remix/adapter, /health, /metrics).",
        epilog="Any other flag is passed to vLLM, e.g. --max-num-seqs 64 or --kv-cache-memory-bytes 1073741824. "
        "Example: remix-serve --adapter ./ckpt --port 8000",
    )
    from remix_serve.vllm_plugin.bank import FUSED_MAX_SHARE
    from remix_serve.vllm_plugin.spec import RemixOverrides

    checkpoint_help = RemixOverrides.model_fields["checkpoint"].description.split(";")[0]
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help=f"{checkpoint_help}; repeat it to serve several checkpoints on one base (pool mode), each as NAME "
        "(default: its folder's name)",
    )
    p.add_argument("--name", help="served model name in single-checkpoint mode (default: the checkpoint folder's name)")
    p.add_argument(
        "--bank-path",
        choices=["auto", "fused", "gather"],
        help="single-checkpoint mode: how the bank is applied; gather adds each token's k LoRAs to the base "
        "projections (cost k*r per token), fused appends the whole bank to the base weights (n*r); default auto: "
        f"gather where the CPU kernels run and a fused bank would add more than {FUSED_MAX_SHARE:.0%}% of the "
        "base's work per token, else fused",
    )
    pool = p.add_argument_group(
        "multi-checkpoint (pool) mode",
        "Used when --adapter is repeated, or with --adapter-dir or any of these flags. Requests pick a checkpoint "
        "by its name as `model`; the base model is served too, under --base-name.",
    )
    pool.add_argument(
        "--adapter-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="every sub-folder of DIR holding remix_config.json is a checkpoint, named by its folder and loaded on "
        "its first request (repeatable)",
    )
    pool.add_argument(
        "--max-loras",
        type=int,
        help="checkpoints in one engine step (vLLM's LoRA slots; default: the start-up checkpoints, 1 to 8)",
    )
    pool.add_argument(
        "--pool-size",
        help="adapter pool size: a number of checkpoints (e.g. 16) or bytes with a unit (e.g. 512MiB); default: "
        "max(start-up checkpoints, --max-loras) checkpoints as large as the largest",
    )
    pool.add_argument("--pool-page-rank", type=int, help="rank rows per pool page (default: from the ranks)")
    pool.add_argument(
        "--pool-max-loras-per-layer", type=int, help="largest n a checkpoint may have (default: the start-up max)"
    )
    pool.add_argument("--pool-max-top-k", type=int, help="largest k a checkpoint may have (default: the start-up max)")
    pool.add_argument("--pool-max-rank", type=int, help="largest r a checkpoint may have (default: the start-up max)")
    pool.add_argument(
        "--allow-adapter-root",
        action="append",
        default=[],
        metavar="DIR",
        help="/v1/load_lora_adapter may load checkpoints under DIR (repeatable; always allowed: the folders holding "
        "the start-up checkpoints, and every --adapter-dir)",
    )
    pool.add_argument("--base-name", help="the base model's served name (default: the base folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--api-key", help="require this bearer key on /v1/* (/health and /metrics stay open)")
    p.add_argument("--max-model-len", type=int, default=2048, help="context length (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", help="model dtype: bfloat16, float32, float16 (default: %(default)s)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="tensor-parallel ranks (default: 1)")
    p.add_argument(
        "--show-adapter-paths",
        action="store_true",
        help="show the checkpoint's and base's paths on this server in /v1/remix/adapter and /v1/models "
        "(default: folder names only)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=int,
        default=DRAIN_SECONDS,
        help="on SIGTERM, drain in-flight requests for up to this many seconds (default: %(default)s)",
    )
    return p


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def vllm_argv(args: argparse.Namespace, base: Path, passthrough: list[str]) -> list[str]:
    """The vLLM server command line for a validated checkpoint."""
    from remix_serve.vllm_plugin import WORKER_EXTENSION, hf_overrides

    base_archs = json.loads((base / "config.json").read_text()).get("architectures") or []
    checkpoint = str(Path(args.adapter).resolve())
    argv = [
        "--model", str(base),
        "--tokenizer", str(base),
        "--served-model-name", args.name or Path(checkpoint).name,
        "--hf-overrides", json.dumps(hf_overrides(checkpoint, base_archs, args.bank_path)),
        "--worker-extension-cls", WORKER_EXTENSION,
    ]  # fmt: skip
    return argv + server_argv(args, passthrough)


def server_argv(args: argparse.Namespace, passthrough: list[str]) -> list[str]:
    """The vLLM flags both modes share: address, sizes, key, drain, and the CPU defaults; then `passthrough`."""
    argv = [
        "--host", args.host,
        "--port", str(args.port),
        "--max-model-len", str(args.max_model_len),
        "--dtype", args.dtype,
        "--tensor-parallel-size", str(args.tensor_parallel_size),
        "--shutdown-timeout", str(args.shutdown_timeout),
    ]  # fmt: skip
    if args.api_key:
        argv += ["--api-key", args.api_key]
    if not has_cuda() and not any(a.startswith("--compilation-config") or a == "-cc" for a in passthrough):
        # vLLM-CPU compiles with inductor by default: minutes of gcc on a small host. Eager is the tested path.
        argv.append("--enforce-eager")
        if "VLLM_CPU_KVCACHE_SPACE" not in os.environ and "--kv-cache-memory-bytes" not in passthrough:
            argv += ["--kv-cache-memory-bytes", str(1 << 30)]
    return argv + passthrough


def _stop_before_serving(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    # As a container's PID 1 (the entrypoint execs us; no --init) the kernel drops SIGTERM unless a handler is
    # installed, so `docker stop` during checkpoint checks, base conversion or model load would wait for its
    # timeout and then kill. Until vLLM installs its own handler (drain, then exit 0) there is nothing to drain:
    # stop at once. Hence the imports below come after this line.
    signal.signal(signal.SIGTERM, _stop_before_serving)
    from remix_serve import bases
    from remix_serve.checkpoint import CheckpointError, load_checkpoint

    args, passthrough = build_parser().parse_known_args(argv)
    if is_pool_mode(args):
        from remix_serve.server import pool_cli

        if args.bank_path is not None:
            print(f"remix-serve: --bank-path {args.bank_path} applies to one checkpoint without pool flags; pool mode "
                  "always gathers each token's pages", file=sys.stderr)  # fmt: skip
            sys.exit(EXIT_BAD_CHECKPOINT)

        try:
            argv_for_vllm, env = pool_cli.pool_vllm_argv(args)
        except pool_cli.StartupError as e:
            print(f"remix-serve: {e}", file=sys.stderr)
            sys.exit(EXIT_BAD_CHECKPOINT)
        os.environ.update(env)
        serve(argv_for_vllm + server_argv(args, passthrough), show_paths=args.show_adapter_paths)
        return
    if not args.adapter:
        print("remix-serve: give a checkpoint with --adapter PATH (or --adapter-dir DIR)", file=sys.stderr)
        sys.exit(EXIT_BAD_CHECKPOINT)
    args.adapter = args.adapter[0]
    if "=" in args.adapter and not Path(args.adapter).exists():
        name, args.adapter = args.adapter.split("=", 1)
        args.name = args.name or name
    try:
        ckpt = load_checkpoint(args.adapter)
        base = bases.resolve_base(ckpt.config.base_model, relative_to=ckpt.path)
        argv_for_vllm = vllm_argv(args, base, passthrough)
    except (CheckpointError, bases.BaseModelError, ValueError) as e:  # ValueError: an unsupported base architecture
        print(f"remix-serve: invalid checkpoint {args.adapter}:\n{e}", file=sys.stderr)
        sys.exit(EXIT_BAD_CHECKPOINT)
    serve(argv_for_vllm, show_paths=args.show_adapter_paths)


def is_pool_mode(args: argparse.Namespace) -> bool:
    """Pool mode unless the command line is exactly today's: one --adapter and no pool flag."""
    pool_flags = (args.adapter_dir, args.max_loras, args.pool_size, args.pool_page_rank,
                  args.pool_max_loras_per_layer, args.pool_max_top_k, args.pool_max_rank,
                  args.allow_adapter_root, args.base_name)  # fmt: skip
    return len(args.adapter) != 1 or any(flag not in (None, []) for flag in pool_flags)


def serve(argv_for_vllm: list[str], show_paths: bool) -> None:
    """Run vLLM's API server in this process with our plugins allow-listed."""
    # The general plugin (model classes) and the endpoint plugin (routes, metrics) must both be allow-listed.
    os.environ["VLLM_PLUGINS"] = "remix_serve,remix_serve_endpoint"
    # The endpoint plugin runs in this process and reads the one flag of ours that it needs from the environment.
    from remix_serve.server.endpoint import SHOW_PATHS_ENV

    os.environ[SHOW_PATHS_ENV] = "1" if show_paths else "0"
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="remix-serve (vLLM flags)"))
    vllm_args = parser.parse_args(argv_for_vllm)
    configure_logging_from_args(vllm_args)
    validate_parsed_serve_args(vllm_args)
    uvloop.run(run_server(vllm_args))


if __name__ == "__main__":
    main()
