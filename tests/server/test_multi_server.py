"""remix-serve in pool mode (several checkpoints on one base) as a real subprocess, driven by the openai client.

One server per module (an engine start, about 25-40 s on 2 cores): three start-up checkpoints of different n, k,
r, layers and targets (`a`, `bee`, `c`), a fourth found in an --adapter-dir on its first request (`s`, softmax),
the base under its own name (`base`, its folder's name), and an --allow-adapter-root for checkpoints loaded at run time.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from remix_serve import reference, tiny
from tests.helpers.dashboard import dashboard_metric_names, exported_metric_names
from tests.helpers.server import RemixServer
from tests.helpers.variants import variant

pytestmark = pytest.mark.engine
KEY = "pool-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# served name -> (variant, seed, where): start-up checkpoints, then the --adapter-dir one
CHECKPOINTS = {"a": ("default", 11), "bee": ("n6-k3-r2", 12), "c": ("n2-k1-r8-gate", 13), "s": ("softmax", 14)}
PROMPTS = ["The quick brown fox", "Once upon a time"]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def folders(tiny_base: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pool")
    paths = {}
    for name, (var, seed) in CHECKPOINTS.items():
        folder = root / ("dir" if name == "s" else "startup") / (name if name != "bee" else "b-folder")
        paths[name] = variant(var).build(folder, tiny_base, seed=seed)
    (root / "extra").mkdir()
    paths["root"] = root
    return paths


@pytest.fixture(scope="module")
def server(folders, tmp_path_factory):
    adapters = [folders["a"], f"bee={folders['bee']}", folders["c"]]
    srv = RemixServer(adapters, "--adapter-dir", str(folders["root"] / "dir"), "--allow-adapter-root",
                      str(folders["root"] / "extra"), "--api-key", KEY,
                      log=tmp_path_factory.mktemp("log") / "pool-server.log")  # fmt: skip
    try:
        yield srv.wait_ready()
    finally:
        srv.close()


@pytest.fixture(scope="module")
def oracles(folders, tiny_base: Path) -> dict:
    from transformers import AutoModelForCausalLM

    models = {name: reference.load_model(folders[name])[0] for name in CHECKPOINTS}
    models["base"] = AutoModelForCausalLM.from_pretrained(tiny_base, torch_dtype=torch.float32).eval()
    return models


def hf_greedy(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    x = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                             min_new_tokens=max_tokens, pad_token_id=None, eos_token_id=None)  # fmt: skip
    return out[0, len(prompt_ids) :].tolist()


def post(server, route: str, body: dict, headers: dict | None = AUTH) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{route}", json=body, headers=headers, timeout=60)


def samples(server) -> dict[tuple[str, tuple], float]:
    httpx.get(f"{server.url}/v1/remix/adapter?model=a", headers=AUTH, timeout=10)  # refreshes the snapshot
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def pages_used(server) -> dict[str, float]:
    return {
        dict(labels)["store"]: v
        for (name, labels), v in samples(server).items()
        if name == "remix_pool_pages" and dict(labels)["state"] == "used"
    }


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: str, chat: bool, stream: bool):
    """(prompt token ids, generated token ids) as the server reports them (`return_token_ids`)."""
    common = dict(model=model, max_tokens=MAX_TOKENS, temperature=0,
                  extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    if chat:
        call = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], stream=stream, **common)
    else:
        call = client.completions.create(prompt=prompt, stream=stream, **common)
    if not stream:
        out = await call
        extra = out.model_extra if chat else out.choices[0].model_extra
        return extra["prompt_token_ids"], out.choices[0].model_extra["token_ids"]
    prompt_ids, ids = None, []
    async for chunk in await call:
        extra = chunk.model_extra if chat else (chunk.choices[0].model_extra if chunk.choices else {})
        prompt_ids = prompt_ids or extra.get("prompt_token_ids")
        for choice in chunk.choices:
            ids += choice.model_extra.get("token_ids") or []
    return prompt_ids, ids


def check_mixed_batch(server, oracles, models: list[str]) -> None:
    """Every model x prompt x (completion, chat) x (stream or not), all at once; each equals its HF reference."""
    modes = [(chat, stream) for chat in (False, True) for stream in (False, True)]
    cases = [(m, p, chat, stream) for m in models for p in PROMPTS for chat, stream in modes]

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as client:
            return await asyncio.gather(*(one_request(client, *case) for case in cases))

    results = asyncio.run(run())
    bad = []
    for (model, prompt, chat, stream), (prompt_ids, ids) in zip(cases, results, strict=True):
        assert prompt_ids and len(ids) == MAX_TOKENS, (model, prompt, chat, stream, prompt_ids, ids)
        expected = hf_greedy(oracles[model], prompt_ids, MAX_TOKENS)
        if ids != expected:
            bad.append(f"{model} chat={chat} stream={stream} {prompt!r}: {ids} != {expected}")
    assert not bad, "\n".join(bad)


def test_concurrent_mixed_batch_matches_each_checkpoints_reference(server, oracles):
    # `s` is not loaded yet: its first request resolves it from the --adapter-dir
    check_mixed_batch(server, oracles, ["a", "bee", "c", "s", "base"])


def test_models_lists_every_checkpoint_with_its_card_and_the_base(server, folders):
    resolved = post(server, "completions", {"model": "s", "prompt": "x", "max_tokens": 1})
    assert resolved.status_code == 200
    cards = {c["id"]: c for c in httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"]}
    assert set(cards) >= {"base", "a", "bee", "c", "s"}
    assert "remix" not in cards["base"]
    for name, (var, _) in CHECKPOINTS.items():
        v, card = variant(var), cards[name]["remix"]
        assert (card["num_loras"], card["top_k"], card["rank"]) == (v.num_loras, v.top_k, v.rank), name
        assert card["layers"] == v.adapted_layers() and card["target_modules"] == list(v.target_modules)
        assert card["weighting"] == v.weighting and card["base_model"] == "base"
        assert cards[name]["loaded"] is True and "/" not in cards[name]["root"]


def test_adapter_dir_checkpoint_is_listed_before_its_first_request(server, folders, tiny_base):
    variant("n2-k1-r8-gate").build(folders["root"] / "dir" / "late", tiny_base, seed=21)
    cards = {c["id"]: c for c in httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"]}
    assert cards["late"]["loaded"] is False and cards["late"]["remix"]["num_loras"] == 2
    out = post(server, "completions", {"model": "late", "prompt": "hi", "max_tokens": 2})
    assert out.status_code == 200 and out.json()["model"] == "late"
    assert post(server, "unload_lora_adapter", {"lora_name": "late"}).status_code == 200


def test_load_use_unload_frees_pages_and_the_name_is_reusable(server, folders, tiny_base, oracles):
    a2 = variant("default").build(folders["root"] / "extra" / "a2", tiny_base, seed=11)  # same weights as `a`
    oracles["a2"] = oracles["a"]
    before = pages_used(server)
    assert post(server, "load_lora_adapter", {"lora_name": "a2", "lora_path": str(a2)}).status_code == 200
    check_mixed_batch(server, oracles, ["a2"])
    grown = pages_used(server)
    assert grown["gate_up"] > before["gate_up"] and grown["down"] > before["down"]
    assert post(server, "unload_lora_adapter", {"lora_name": "a2"}).status_code == 200
    assert pages_used(server) == before
    assert post(server, "completions", {"model": "a2", "prompt": "x", "max_tokens": 1}).status_code == 404
    # the same name again, through a path with .. in it
    again = str(folders["root"] / "extra" / ".." / "extra" / "a2")
    assert post(server, "load_lora_adapter", {"lora_name": "a2", "lora_path": again}).status_code == 200
    check_mixed_batch(server, oracles, ["a2"])
    assert post(server, "unload_lora_adapter", {"lora_name": "a2"}).status_code == 200
    assert pages_used(server) == before


def bad_checkpoints(folders, tiny_base: Path) -> dict[str, Path]:
    extra = folders["root"] / "extra"
    broken = variant("default").build(extra / "broken", tiny_base, seed=3)
    (broken / "adapter.safetensors").unlink()
    other_base = tiny.build_tiny_base(folders["root"] / "other-base", num_layers=3)
    outside = variant("default").build(folders["root"] / "outside" / "ok", tiny_base, seed=4)
    (extra / "link").symlink_to(outside, target_is_directory=True)
    return {
        "broken": broken,
        "other": variant("default").build(extra / "other", other_base, seed=5),
        "wide_n": variant("n8-k2-r8").build(extra / "wide", tiny_base, seed=6),
        "huge": tiny.build_tiny_checkpoint(extra / "huge", tiny_base, seed=7, num_loras=6, top_k=2, rank=8),
        "outside": outside,
        "link": extra / "link",
        "ok": variant("default").build(extra / "ok", tiny_base, seed=8),
    }


def test_bad_loads_and_unloads_are_refused_with_clear_errors_and_change_nothing(server, folders, tiny_base, oracles):
    bad = bad_checkpoints(folders, tiny_base)
    before = pages_used(server)
    cases = [  # (route, body, status, words in the message)
        ("load_lora_adapter", {"lora_name": "x1", "lora_path": str(bad["outside"])}, 400, ["outside", "ok"]),
        ("load_lora_adapter", {"lora_name": "x2", "lora_path": str(bad["link"])}, 400, ["outside", "link"]),
        ("load_lora_adapter", {"lora_name": "x3", "lora_path": f"{folders['root']}/extra/../outside/ok"}, 400,
         ["outside"]),
        ("load_lora_adapter", {"lora_name": "x4", "lora_path": str(bad["broken"])}, 400,
         ["adapter.safetensors", "missing"]),
        ("load_lora_adapter", {"lora_name": "x5", "lora_path": str(bad["other"])}, 400,
         ["num_hidden_layers", "another base"]),
        ("load_lora_adapter", {"lora_name": "x6", "lora_path": str(bad["wide_n"])}, 400,
         ["n (num_loras) = 8", "--pool-max-loras-per-layer"]),
        ("load_lora_adapter", {"lora_name": "x7", "lora_path": str(bad["huge"])}, 400,
         ["pages of the gate_up store", "--pool-size"]),
        ("load_lora_adapter", {"lora_name": "a", "lora_path": str(bad["ok"])}, 409, ["'a'", "taken"]),
        ("load_lora_adapter", {"lora_name": "base", "lora_path": str(bad["ok"])}, 409, ["'base'", "base model"]),
        ("load_lora_adapter", {"lora_name": "x8", "lora_path": str(folders["root"] / "extra" / "nope")}, 404,
         ["nope"]),
        ("unload_lora_adapter", {"lora_name": "nope"}, 404, ["'nope'"]),
        ("unload_lora_adapter", {"lora_name": "base"}, 400, ["base model"]),
    ]  # fmt: skip
    for route, body, status, words in cases:
        r = post(server, route, body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert error["code"] == status and error["type"] and all(w in error["message"] for w in words), (body, error)
    # --api-key guards both routes
    assert post(server, "load_lora_adapter", {"lora_name": "k", "lora_path": str(bad["ok"])}, None).status_code == 401
    assert post(server, "unload_lora_adapter", {"lora_name": "a"}, None).status_code == 401
    # unloading a checkpoint with a request in flight: 409, and the request finishes
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    stream = client.completions.create(model="c", prompt="long", max_tokens=300, stream=True,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    chunks = iter(stream)
    next(chunks)
    r = post(server, "unload_lora_adapter", {"lora_name": "c"})
    assert r.status_code == 409 and "in use" in r.json()["error"]["message"], r.text
    done = threading.Event()
    threading.Thread(target=lambda: (sum(1 for _ in chunks), done.set()), daemon=True).start()
    assert done.wait(120)
    # nothing else was disturbed: no page leaked, every checkpoint answers as before
    assert pages_used(server) == before
    names = {c.id for c in client.models.list().data}
    assert not names & {f"x{i}" for i in range(1, 9)} and "k" not in names
    check_mixed_batch(server, oracles, ["a", "bee", "c", "s", "base"])


def test_metrics_per_checkpoint_and_pool_gauges(server):
    deadline = time.monotonic() + 10
    while True:
        got = samples(server)
        names = {name for name, _ in got}
        if "remix_pool_loads_total" in names or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    k = {name: variant(var).top_k for name, (var, _) in CHECKPOINTS.items()}
    acts: dict[tuple[str, str], float] = {}
    routed: dict[tuple[str, str], float] = {}
    for (name, labels), value in got.items():
        lab = dict(labels)
        if name == "remix_lora_activations_total":
            acts[lab["model_name"], lab["layer"]] = acts.get((lab["model_name"], lab["layer"]), 0) + value
        elif name == "remix_routed_tokens_total":
            routed[lab["model_name"], lab["layer"]] = value
    assert {m for m, _ in routed} >= set(CHECKPOINTS)
    for (model, layer), n in routed.items():
        if model in k:
            assert n > 0 and acts[model, layer] == k[model] * n, (model, layer)
    assert {("c", "0"), ("c", "1"), ("bee", "1")} <= set(routed) and ("bee", "0") not in routed
    for store in ("gate_up", "down"):
        used = got["remix_pool_pages", (("state", "used"), ("store", store))]
        free = got["remix_pool_pages", (("state", "free"), ("store", store))]
        assert used + free == got["remix_pool_pages", (("state", "total"), ("store", store))] and used > 0
    assert got["remix_pool_loads_total", ()] >= 4 and got["remix_pool_resident_checkpoints", ()] >= 4
    for name in ("remix_pool_reloads_total", "remix_pool_evictions_total", "remix_pool_pinned_checkpoints"):
        assert (name, ()) in got
    exported = exported_metric_names(httpx.get(f"{server.url}/metrics").text)
    assert dashboard_metric_names() <= exported, dashboard_metric_names() - exported
    r = httpx.get(f"{server.url}/v1/remix/adapter?model=bee", headers=AUTH).json()
    assert r["model"] == "bee" and r["config"]["num_loras"] == 6 and [u["layer"] for u in r["usage"]] == [1]
    assert httpx.get(f"{server.url}/v1/remix/adapter?model=nope", headers=AUTH).status_code == 404


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "remix_serve.server.cli", *argv], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_startup_checkpoints_on_two_bases_exit_2_naming_the_odd_one(tiny_base: Path, tmp_path: Path):
    a = variant("default").build(tmp_path / "a", tiny_base, seed=1)
    other = variant("default").build(tmp_path / "odd", tiny.build_tiny_base(tmp_path / "base3", num_layers=3), seed=2)
    out = run_cli("--adapter", str(a), "--adapter", str(other), "--port", "1")
    assert out.returncode == 2, out.stderr
    assert "'odd'" in out.stderr and "another base" in out.stderr and "num_hidden_layers" in out.stderr
    dup = run_cli("--adapter", f"x={a}", "--adapter", f"x={other}", "--port", "1")
    assert dup.returncode == 2 and "'x'" in dup.stderr and str(a) in dup.stderr and str(other) in dup.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    none = run_cli("--adapter-dir", str(empty), "--port", "1")
    assert none.returncode == 2 and "no checkpoint to serve" in none.stderr
    shutil.rmtree(empty)
