"""The vLLM endpoint plugin: `/v1/remix/adapter`, ReMix details in `/v1/models`, and the remix_* metrics.

Loaded in the API-server process only, when `VLLM_PLUGINS` names `remix_serve_endpoint` (remix-serve sets it).
"""

from __future__ import annotations

import os
from argparse import Namespace
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import State

from remix_serve.checkpoint import load_config
from remix_serve.server.metrics import RemixCollector, UsagePoller, register_collector
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
async def show_adapter(raw_request: Request) -> JSONResponse:
    """The checkpoint's config and live per-layer usage (counts and ESS)."""
    state = raw_request.app.state
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


@router.get("/v1/models")
async def show_models(raw_request: Request) -> JSONResponse:
    """vLLM's model list, with the ReMix bank (n, k, r, ...) on the served adapter's entry; paths as shown_path."""
    state = raw_request.app.state
    models = (await state.openai_serving_models.show_available_models()).model_dump()
    cfg = state.remix_config
    for card in models["data"]:
        if card.get("root"):  # vLLM puts the base model's path here
            card["root"] = shown_path(card["root"], state.remix_show_paths)
        if card["id"] == state.remix_model_name:
            card["remix"] = {
                "num_loras": cfg.num_loras,
                "top_k": cfg.top_k,
                "rank": cfg.rank,
                "weighting": cfg.weighting,
                "layers": cfg.adapted_layers,
                "target_modules": cfg.target_modules,
                "base_model": shown_path(cfg.base_model, state.remix_show_paths),
            }
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
        names = args.served_model_name or [args.model]
        state.remix_model_name = names[0] if isinstance(names, list) else names
        state.remix_checkpoint = spec.checkpoint
        state.remix_show_paths = os.environ.get(SHOW_PATHS_ENV) == "1"
        state.remix_config = load_config(spec.checkpoint)
        collector = RemixCollector(state.remix_model_name)
        register_collector(collector)
        state.remix_poller = UsagePoller(engine_client, collector)
        state.remix_poller.start()
