"""remix-serve's pool mode in the API process: checks before vLLM's load/unload, /v1/models cards, the poller.

vLLM's own `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter` (present because pool mode sets
`VLLM_ALLOW_RUNTIME_LORA_UPDATING`) are replaced by the endpoint plugin's routes of the same path (vLLM lets an
endpoint plugin's route replace a core route with the same path and method, `plugins/endpoint_plugins/
interface.py`), which run `PoolServer.load` / `.unload`: our checks first, then vLLM's own handler
(`OpenAIServingModels.load_lora_adapter` / `unload_lora_adapter`), then, on unload, what vLLM leaves undone:
`engine_client.remove_lora` and the pool's `remix_pool_forget`, so the pages are free at once. The routes sit
under /v1, so `--api-key` guards them as every other /v1 route.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from http import HTTPStatus
from pathlib import Path

from fastapi.responses import JSONResponse

from remix_serve.checkpoint import (
    CONFIG_FILE,
    BaseFingerprint,
    CheckpointError,
    RemixConfig,
    load_checkpoint,
    load_config,
)
from remix_serve.server.pool_cli import PoolServerConfig, find_checkpoints
from remix_serve.vllm_plugin.pool.admission import check_admission
from remix_serve.vllm_plugin.pool.pages import PoolError
from remix_serve.vllm_plugin.pool.resolver import checkpoint_in
from remix_serve.vllm_plugin.spec import PoolSettings

logger = logging.getLogger(__name__)


class RouteError(Exception):
    """An OpenAI-style error: `{"error": {"message", "type", "code"}}` with HTTP status `code`."""

    def __init__(self, status: HTTPStatus, err_type: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.err_type, self.message, self.param = status, err_type, message, param

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.err_type, "param": self.param, "code": int(self.status)}
        return JSONResponse({"error": body}, status_code=int(self.status))


def remix_card(cfg: RemixConfig, shown_base: str) -> dict:
    return {
        "num_loras": cfg.num_loras,
        "top_k": cfg.top_k,
        "rank": cfg.rank,
        "weighting": cfg.weighting,
        "layers": cfg.adapted_layers,
        "target_modules": cfg.target_modules,
        "base_model": shown_base,
    }


def under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class PoolServer:
    """State and checks of a multi-checkpoint server, in the API process."""

    def __init__(self, engine_client, models, config: PoolServerConfig, settings: PoolSettings, show_paths: bool):
        from remix_serve import bases

        self.engine_client, self.models, self.config, self.settings = engine_client, models, config, settings
        self.show_paths = show_paths
        self.fingerprint: BaseFingerprint = bases.base_fingerprint(config.base_path)
        self.roots = [Path(r).resolve() for r in config.allowed_roots]
        self.lock = asyncio.Lock()  # one load or unload at a time: the in-use check and the unload stay atomic
        self._configs: dict[str, tuple[float, RemixConfig]] = {}

    def shown(self, path: str) -> str:
        return path if self.show_paths else Path(path).name

    # --- checks ---

    def check_path(self, raw: str) -> Path:
        """The checkpoint folder `raw` names, symlinks and .. resolved, if it is under an allowed root."""
        path = Path(os.path.expanduser(raw)).resolve()
        if not any(under(path, root) for root in self.roots):
            raise RouteError(
                HTTPStatus.BAD_REQUEST,
                "AdapterPathNotAllowed",
                f"lora_path {raw!r} is outside the folders this server loads checkpoints from (the start-up "
                "checkpoints' folders, --adapter-dir and --allow-adapter-root)",
                "lora_path",
            )
        if not path.is_dir():
            raise RouteError(HTTPStatus.NOT_FOUND, "NotFoundError", f"lora_path {raw!r}: no such folder", "lora_path")
        if not (path / CONFIG_FILE).is_file():
            raise RouteError(
                HTTPStatus.BAD_REQUEST,
                "InvalidCheckpoint",
                f"lora_path {raw!r} holds no {CONFIG_FILE}: not a ReMix checkpoint (this server serves ReMix only)",
                "lora_path",
            )
        return path

    def check_name(self, name: str) -> None:
        if not name or not name.strip():
            raise RouteError(HTTPStatus.BAD_REQUEST, "InvalidUserInput", "lora_name must not be empty", "lora_name")
        if self.models.is_base_model(name):
            raise RouteError(
                HTTPStatus.CONFLICT,
                "NameTaken",
                f"lora_name {name!r} is the base model's served name; choose another",
                "lora_name",
            )
        if name in self.models.lora_requests:
            taken = self.shown(self.models.lora_requests[name].lora_path)
            raise RouteError(
                HTTPStatus.CONFLICT,
                "NameTaken",
                f"lora_name {name!r} is taken by a loaded checkpoint ({taken}); unload it first",
                "lora_name",
            )

    def check_checkpoint(self, name: str, path: Path) -> None:
        """Every defect of the checkpoint (load_checkpoint), then the pool's admission rule (shared with the
        worker): another base, n/k/r above the limits, too large for the pool."""
        try:
            ckpt = load_checkpoint(path)
            check_admission(ckpt.config, name, self.settings, self.config.max_loras, self.fingerprint,
                            where=f"{self.shown(str(path))}/{CONFIG_FILE}",
                            base=f"the served base {self.config.base_name!r}")  # fmt: skip
        except (CheckpointError, PoolError) as e:
            text = str(e) if self.show_paths else str(e).replace(str(path.parent) + "/", "")
            kind = "CheckpointTooLarge" if isinstance(e, PoolError) else "InvalidCheckpoint"
            raise RouteError(
                HTTPStatus.BAD_REQUEST, kind, f"checkpoint {name!r} cannot be served:\n{text}", "lora_path"
            ) from None

    def in_flight(self, name: str) -> int:
        """Running or waiting requests for LoRA `name` (AsyncLLM's output processor keeps every unfinished one)."""
        processor = getattr(self.engine_client, "output_processor", None)
        states = getattr(processor, "request_states", {}) or {}
        return sum(1 for state in list(states.values()) if getattr(state, "lora_name", None) == name)

    # --- routes ---

    async def load(self, body: dict) -> JSONResponse:
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        try:
            request = LoadLoRAAdapterRequest.model_validate(body)
        except Exception as e:
            return RouteError(HTTPStatus.BAD_REQUEST, "InvalidUserInput", f"bad request body: {e}").response()
        async with self.lock:
            try:
                self.check_name(request.lora_name)
                path = self.check_path(request.lora_path)
                await asyncio.to_thread(self.check_checkpoint, request.lora_name, path)
            except RouteError as e:
                return e.response()
            request = request.model_copy(update={"lora_path": str(path)})
            response = await self.models.load_lora_adapter(request)
        return self._vllm_response(response)

    async def unload(self, body: dict) -> JSONResponse:
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        try:
            request = UnloadLoRAAdapterRequest.model_validate(body)
        except Exception as e:
            return RouteError(HTTPStatus.BAD_REQUEST, "InvalidUserInput", f"bad request body: {e}").response()
        name = request.lora_name
        async with self.lock:
            if self.models.is_base_model(name):
                return RouteError(
                    HTTPStatus.BAD_REQUEST, "InvalidUserInput", f"{name!r} is the base model: it cannot be unloaded",
                    "lora_name",
                ).response()  # fmt: skip
            lora = self.models.lora_requests.get(name)
            if lora is None:
                return RouteError(
                    HTTPStatus.NOT_FOUND, "NotFoundError", f"no checkpoint named {name!r} is loaded", "lora_name"
                ).response()
            busy = self.in_flight(name)
            if busy:
                return RouteError(
                    HTTPStatus.CONFLICT,
                    "AdapterInUse",
                    f"checkpoint {name!r} is in use by {busy} running or waiting request(s); unload it when they"
                    " have finished",
                    "lora_name",
                ).response()
            response = await self.models.unload_lora_adapter(request)
            if not isinstance(response, str):
                return self._vllm_response(response)
            # vLLM's unload only forgets the name: remove the adapter from the engine, then free its pages
            await self.engine_client.remove_lora(lora.lora_int_id)
            try:
                await self.engine_client.collective_rpc("remix_pool_forget", args=(name,))
            except Exception:
                logger.exception("remix-serve: freeing the pool pages of %r failed", name)
                return RouteError(
                    HTTPStatus.INTERNAL_SERVER_ERROR,
                    "InternalServerError",
                    f"checkpoint {name!r} was unloaded but its pool pages could not be freed (see the server log)",
                ).response()
        self._configs.pop(name, None)
        return self._vllm_response(response)

    @staticmethod
    def _vllm_response(response) -> JSONResponse:
        if isinstance(response, str):
            return JSONResponse({"message": response}, status_code=200)
        return JSONResponse(response.model_dump(), status_code=response.error.code)

    # --- /v1/models and /v1/remix/adapter ---

    def config_of(self, path: str) -> RemixConfig | None:
        try:
            mtime = (Path(path) / CONFIG_FILE).stat().st_mtime
            cached = self._configs.get(path)
            if cached is None or cached[0] != mtime:
                self._configs[path] = (mtime, load_config(path))
            return self._configs[path][1]
        except (OSError, CheckpointError):
            return None

    def unloaded_dir_checkpoints(self) -> dict[str, str]:
        """--adapter-dir checkpoints that are not loaded (yet), by name: servable on their first request."""
        out: dict[str, str] = {}
        for folder in self.config.adapter_dirs:
            try:
                found = find_checkpoints(folder)
            except OSError:
                continue
            for name, path in found.items():
                if name not in out and name not in self.models.lora_requests and not self.models.is_base_model(name):
                    out[name] = str(path)
        return out

    async def models_list(self) -> dict:
        models = (await self.models.show_available_models()).model_dump()
        shown_base = self.shown(self.config.base_path)
        for card in models["data"]:
            lora = self.models.lora_requests.get(card["id"])
            if lora is None:  # the base
                if card.get("root"):
                    card["root"] = self.shown(card["root"])
                continue
            card["root"] = self.shown(lora.lora_path)
            card["loaded"] = True
            cfg = self.config_of(lora.lora_path)
            if cfg is not None:
                card["remix"] = remix_card(cfg, shown_base)
        now = int(time.time())
        for name, path in self.unloaded_dir_checkpoints().items():
            cfg = self.config_of(path)
            if cfg is None:
                continue
            models["data"].append(
                {
                    "id": name,
                    "object": "model",
                    "created": now,
                    "owned_by": "vllm",
                    "root": self.shown(path),
                    "parent": self.config.base_name,
                    "max_model_len": None,
                    "permission": [],
                    "loaded": False,
                    "remix": remix_card(cfg, shown_base),
                }
            )
        return models

    def path_of(self, name: str) -> str | None:
        lora = self.models.lora_requests.get(name)
        if lora is not None:
            return lora.lora_path
        path = checkpoint_in(self.config.adapter_dirs, name)
        return None if path is None else str(path)
