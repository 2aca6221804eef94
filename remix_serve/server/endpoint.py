"""The vLLM endpoint plugin: `/v1/remix/adapter`, ReMix details in `/v1/models`, and the remix_* metrics.

Loaded in the API-server process only, when `VLLM_PLUGINS` names `remix_serve_endpoint` (remix-serve sets it).
In pool mode (several checkpoints, `server/pool.py`) it also replaces vLLM's `/v1/load_lora_adapter` and
`/v1/unload_lora_adapter` with routes that check first and then call vLLM's own handlers.
"""

from __future__ import annotations

import os
from argparse import Namespace
from http import HTTPStatus
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import State

from remix_serve.checkpoint import load_config
from remix_serve.server.metrics import (
    PoolCollector,
    PoolPoller,
    RemixCollector,
    UsagePoller,
    UsageSnapshot,
    register_collector,
)
from remix_serve.vllm_plugin.spec import RemixOverrides

router = APIRouter()
# Set by `remix-serve --show-adapter-paths`: the routes then show the server's file-system paths, not only names.
SHOW_PATHS_ENV = "REMIX_SHOW_ADAPTER_PATHS"


def shown_path(path: str, show_paths: bool) -> str:
    """`path` as the routes show it: whole with --show-adapter-paths, else only its last component (a folder
    name says which checkpoint or base is served without telling clients how the server's disk is laid out).
    A bundled base's name has one component and so stays as it is."""
    return path if show_paths else Path(path).name


@router.get("/v1/remix/adapter")
async def show_adapter(raw_request: Request, model: str | None = None) -> JSONResponse:
    """The checkpoint's config and live per-layer usage (counts and ESS); in pool mode, of `?model=NAME`."""
    state = raw_request.app.state
    pool = getattr(state, "remix_pool", None)
    if pool is not None:
        return await show_pool_adapter(state, pool, model)
    snapshot = await state.remix_poller.refresh()
    config = state.remix_config.model_dump(mode="json")
    config["base_model"] = shown_path(config["base_model"], state.remix_show_paths)
    return JSONResponse(
        {
            "model": state.remix_model_name,
            "checkpoint": shown_path(state.remix_checkpoint, state.remix_show_paths),
            "config": config,
            "usage": snapshot.as_json(),
        }
    )


async def show_pool_adapter(state: State, pool, model: str | None) -> JSONResponse:
    from remix_serve.server.pool import RouteError

    loaded = sorted(pool.models.lora_requests)
    if not model:
        return RouteError(
            HTTPStatus.BAD_REQUEST, "InvalidUserInput", f"give ?model=NAME; loaded checkpoints: {loaded}", "model"
        ).response()
    path = pool.path_of(model)
    cfg = None if path is None else pool.config_of(path)
    if cfg is None:
        return RouteError(
            HTTPStatus.NOT_FOUND, "NotFoundError", f"no checkpoint named {model!r}; loaded: {loaded}", "model"
        ).response()
    snapshots = await state.remix_poller.refresh()
    snapshot = snapshots.get(model, UsageSnapshot())
    config = cfg.model_dump(mode="json")
    config["base_model"] = shown_path(config["base_model"], state.remix_show_paths)
    return JSONResponse(
        {
            "model": model,
            "checkpoint": shown_path(path, state.remix_show_paths),
            "loaded": model in pool.models.lora_requests,
            "config": config,
            "usage": snapshot.as_json(),
        }
    )


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(raw_request: Request) -> JSONResponse:
    """vLLM's route, with remix-serve's checks first (pool mode; server/pool.py)."""
    return await _pool_route(raw_request, "load")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(raw_request: Request) -> JSONResponse:
    """vLLM's route, then the engine's adapter and the pool's pages freed (pool mode; server/pool.py)."""
    return await _pool_route(raw_request, "unload")


async def _pool_route(raw_request: Request, action: str) -> JSONResponse:
    from remix_serve.server.pool import RouteError

    pool = getattr(raw_request.app.state, "remix_pool", None)
    if pool is None:
        return RouteError(
            HTTPStatus.NOT_FOUND,
            "NotFoundError",
            "loading and unloading checkpoints needs remix-serve's pool mode (--adapter-dir, --pool-size, or "
            "several --adapter)",
        ).response()
    try:
        body = await raw_request.json()
    except ValueError:
        return RouteError(HTTPStatus.BAD_REQUEST, "InvalidUserInput", "the request body is not JSON").response()
    if not isinstance(body, dict):
        return RouteError(HTTPStatus.BAD_REQUEST, "InvalidUserInput", "the body must be a JSON object").response()
    return await (pool.load(body) if action == "load" else pool.unload(body))


@router.get("/v1/models")
async def show_models(raw_request: Request) -> JSONResponse:
    """vLLM's model list, with the ReMix bank (n, k, r, ...) on the served adapter's entry; paths as shown_path."""
    state = raw_request.app.state
    if getattr(state, "remix_pool", None) is not None:
        return JSONResponse(content=await state.remix_pool.models_list())
    from remix_serve.server.pool import remix_card

    models = (await state.openai_serving_models.show_available_models()).model_dump()
    cfg = state.remix_config
    for card in models["data"]:
        if card.get("root"):  # vLLM puts the base model's path here
            card["root"] = shown_path(card["root"], state.remix_show_paths)
        if card["id"] == state.remix_model_name:
            card["remix"] = remix_card(cfg, shown_path(cfg.base_model, state.remix_show_paths))
    return JSONResponse(content=models)


class RemixEndpoint:
    """`vllm.endpoint_plugins` entry: HTTP surface only; the counters come from the worker extension."""

    name = "remix_serve_endpoint"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client, state: State, args: Namespace) -> None:
        spec = RemixOverrides.from_server_args(args.hf_overrides)
        if engine_client is None or spec is None:
            raise RuntimeError("remix_serve_endpoint needs an engine serving a ReMix checkpoint (--hf-overrides)")
        state.remix_show_paths = os.environ.get(SHOW_PATHS_ENV) == "1"
        if spec.pool is not None:
            self._init_pool(engine_client, state, args, spec)
            return
        names = args.served_model_name or [args.model]
        state.remix_model_name = names[0] if isinstance(names, list) else names
        state.remix_checkpoint = spec.checkpoint
        state.remix_config = load_config(spec.checkpoint)
        collector = RemixCollector(state.remix_model_name)
        register_collector(collector)
        state.remix_poller = UsagePoller(engine_client, collector)
        state.remix_poller.start()

    def _init_pool(self, engine_client, state: State, args: Namespace, spec: RemixOverrides) -> None:
        from remix_serve.server.pool import PoolServer
        from remix_serve.server.pool_cli import PoolServerConfig

        config = PoolServerConfig.from_env()
        if config is None:  # a plain `vllm serve` of a pool architecture: derive what remix-serve would pass
            names = args.served_model_name or [args.model]
            base_name = names[0] if isinstance(names, list) else names
            lora_paths = [m.path for m in (args.lora_modules or [])]
            roots = list(dict.fromkeys(str(Path(p).resolve().parent) for p in lora_paths))
            config = PoolServerConfig(base_name=base_name, base_path=str(Path(args.model).resolve()),
                                      adapter_dirs=[], allowed_roots=roots, max_loras=args.max_loras)  # fmt: skip
        state.remix_pool = PoolServer(
            engine_client, state.openai_serving_models, config, spec.pool, state.remix_show_paths
        )
        collector = PoolCollector()
        register_collector(collector)
        state.remix_poller = PoolPoller(engine_client, collector)
        state.remix_poller.start()
