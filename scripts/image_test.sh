#!/usr/bin/env bash
# The CPU image for real (`make image-test`): build docker/Dockerfile.cpu with podman from a clean copy of HEAD,
# run it on examples/demo-adapter as the `docker run` line of README.md and docs/deployment.md does, and check
# what a user relies on.
#
# Needs root and Debian (it apt-installs podman and friends when missing), no Docker daemon and no registry:
# the base image python:3.11-slim-bookworm is replaced by a local stand-in built with debootstrap (Debian's
# python3.11) unless that tag is already in podman's storage. Host pip settings (find-links folder, CA bundle)
# go in as build arguments; PyTorch's CPU index is passed only when it answers from here.
#
# Environment:
#   REMIX_IMAGE_TEST_DIR    work folder: podman storage, stand-in rootfs, build context (/var/tmp/remix-image-test)
#   REMIX_IMAGE_TEST_FRESH  1: delete the podman storage and the stand-in first (a cold run, as on a new machine)
#   REMIX_IMAGE_TEST_PORT   host port mapped to the container's 8000 (18000)
#   PIP_FIND_LINKS, PIP_CERT  override what is read from the host's pip configuration
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${REMIX_IMAGE_TEST_DIR:-/var/tmp/remix-image-test}
PORT=${REMIX_IMAGE_TEST_PORT:-18000}
IMAGE=localhost/remix-serve:image-test-cpu
BASE=docker.io/library/python:3.11-slim-bookworm
NAME=remix-image-test
URL=http://127.0.0.1:$PORT
t_script=$(date +%s)

say() { printf 'image-test: %s\n' "$*"; }
die() {
    say "$*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || die "run as root (podman without a daemon, apt-get, debootstrap)"

# 1. Tools (Debian bookworm packages; CONTAINER_NOTES-style recipe)
tools=(podman buildah runc debootstrap uidmap fuse-overlayfs slirp4netns containernetworking-plugins iptables
    catatonit golang-github-containers-common)
if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null || ! command -v runc >/dev/null; then
    say "installing ${tools[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${tools[@]}" >/dev/null
fi

# 2. Podman configuration of our own, state under WORK
if [ "${REMIX_IMAGE_TEST_FRESH:-0}" = 1 ] && [ -d "$WORK" ]; then
    say "fresh run: deleting $WORK"
    if [ -f "$WORK/containers.conf" ]; then
        CONTAINERS_CONF=$WORK/containers.conf CONTAINERS_STORAGE_CONF=$WORK/storage.conf \
            podman system reset --force >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
fi
mkdir -p "$WORK"
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
[ "$nofile" = unlimited ] && nofile=1048576
{ [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
# runc: crun refuses hybrid cgroup v1/v2 hosts. cgroupfs and a file event log: no systemd. The ulimits: podman's
# defaults exceed what some hosts allow, and every container would fail with "setrlimit ... not permitted".
cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
cat >"$WORK/storage.conf" <<EOF
[storage]
driver = "overlay"
runroot = "$WORK/run"
graphroot = "$WORK/storage"
EOF
export CONTAINERS_CONF=$WORK/containers.conf CONTAINERS_STORAGE_CONF=$WORK/storage.conf

# 3. The base image, or a stand-in for it
t_base=$(date +%s)
if podman image exists "$BASE"; then
    say "base $BASE: in storage"
else
    # The Debian mirror this host's apt uses (deb822 or one-line sources), else Debian's own.
    mirror=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
        sed -n -e 's,^URIs: *\([^ ]*/debian\)/* *$,\1,p' -e 's,^deb \(\[[^]]*\] \)\{0\,1\}\([^ ]*/debian\)/\{0\,1\} .*,\2,p' |
        head -n 1 || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    say "base $BASE: not in storage, building a stand-in (debootstrap bookworm from $mirror, Debian's python3.11)"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 ||
        die "debootstrap failed: see $WORK/debootstrap.log"
    tar -C "$WORK/rootfs" -c . | podman import - localhost/debian:bookworm >"$WORK/import.log" 2>&1 ||
        die "podman import failed: see $WORK/import.log"
    rm -rf "$WORK/rootfs"
    mkdir -p "$WORK/standin"
    # What the Dockerfile uses of python:3.11-slim: python/pip on PATH (with headers, to build the CPU kernels),
    # venv, and pip allowed to install outside a venv.
    cat >"$WORK/standin/Containerfile" <<'EOF'
FROM localhost/debian:bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/* /usr/lib/python3.11/EXTERNALLY-MANAGED \
    && ln -s /usr/bin/python3.11 /usr/local/bin/python && ln -s /usr/bin/pip3 /usr/local/bin/pip
CMD ["python3"]
EOF
    podman build --pull=never --network host -t "$BASE" "$WORK/standin" >"$WORK/standin.log" 2>&1 ||
        die "stand-in build failed: see $WORK/standin.log"
fi
t_base=$(($(date +%s) - t_base))

# 4. Build from a clean copy of HEAD (podman 4.3 writes build/ back into a bind-mounted context)
pip_setting() { python3 -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'$/\1/p" | head -n 1; }
find_links=${PIP_FIND_LINKS-$(pip_setting find-links)}
cert=${PIP_CERT-$(pip_setting cert)}
build_args=(--build-arg "PIP_FIND_LINKS=$find_links")
mounts=()
for dir in $find_links; do
    [ -d "$dir" ] && mounts+=(-v "$dir:$dir:ro")
done
if [ -n "$cert" ] && [ -f "$cert" ]; then
    mounts+=(-v "$cert:/etc/remix-build-ca.crt:ro")
    build_args+=(--build-arg PIP_CERT=/etc/remix-build-ca.crt)
fi
if ! curl -fsS --max-time 10 -o /dev/null https://download.pytorch.org/whl/cpu/ 2>/dev/null; then
    say "PyTorch's CPU index does not answer here: building without it (torch from find-links: ${find_links:-none})"
    build_args+=(--build-arg PIP_EXTRA_INDEX_URL=)
fi
rm -rf "$WORK/ctx"
mkdir -p "$WORK/ctx"
git archive HEAD | tar -x -C "$WORK/ctx"
commit=$(git rev-parse --short HEAD)
say "building $IMAGE from HEAD ($commit), --no-cache; log: $WORK/build.log"
t_build=$(date +%s)
if ! podman build --pull=never --no-cache --format docker --network host "${mounts[@]}" "${build_args[@]}" \
    -f "$WORK/ctx/docker/Dockerfile.cpu" -t "$IMAGE" "$WORK/ctx" >"$WORK/build.log" 2>&1; then
    tail -n 30 "$WORK/build.log" >&2
    die "image build failed"
fi
t_build=$(($(date +%s) - t_build))
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")

# 5. Run it as README.md and docs/deployment.md say: adapter read-only at /ckpt, port 8000 published, the image's own non-root user
podman rm -f "$NAME" >/dev/null 2>&1 || true
cleanup() { podman rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
t_start=$(date +%s)
# (stderr to a file: without systemd, podman logs an error for each health-check timer it cannot set up)
podman run -d --name "$NAME" --shm-size 4g -e VLLM_CPU_KVCACHE_SPACE=4 \
    -v "$WORK/ctx/examples/demo-adapter:/ckpt:ro" -p "127.0.0.1:$PORT:8000" "$IMAGE" --adapter /ckpt \
    >/dev/null 2>"$WORK/podman-run.log" || { cat "$WORK/podman-run.log" >&2; die "podman run failed"; }
until curl -fsS --max-time 2 -o /dev/null "$URL/health" 2>/dev/null; do
    if [ "$(podman inspect --format '{{.State.Running}}' "$NAME")" != true ]; then
        podman logs --tail 40 "$NAME" >&2
        die "the container exited before /health answered"
    fi
    [ $(($(date +%s) - t_start)) -lt 900 ] || die "no /health after 900 s"
    sleep 2
done
t_start=$(($(date +%s) - t_start))

# 6. Checks
failures=0
check() {
    local name=$1
    shift
    if "$@"; then
        printf 'PASS  %s\n' "$name"
    else
        printf 'FAIL  %s\n' "$name"
        failures=$((failures + 1))
    fi
}

check_health() { curl -fsS --max-time 5 "$URL/health" -o /dev/null; }

check_completion() {
    local out
    out=$(curl -fsS --max-time 120 "$URL/v1/completions" -H 'Content-Type: application/json' \
        -d '{"model": "ckpt", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}') || return 1
    say "completion: $(printf '%s' "$out" | python3 -c 'import json, sys; print(repr(json.load(sys.stdin)["choices"][0]["text"]))')"
    printf '%s' "$out" | python3 -c 'import json, sys; c = json.load(sys.stdin)["choices"][0]; assert c["text"].strip()'
}

check_metrics() {
    # The API process polls the worker's counters every second.
    local i text routed
    for i in $(seq 1 20); do
        text=$(curl -fsS --max-time 5 "$URL/metrics") || return 1
        routed=$(printf '%s\n' "$text" | awk '/^remix_routed_tokens_total\{/ {s += $NF} END {print s + 0}')
        if [ "${routed%.*}" -gt 0 ]; then
            say "metrics: $(printf '%s\n' "$text" | grep -c '^remix_') remix_* series, $routed routed tokens over all layers (after ${i} s)"
            printf '%s\n' "$text" | grep -q '^remix_lora_activations_total{.*model_name="ckpt"' &&
                printf '%s\n' "$text" | grep -q '^remix_layer_usage_ess{'
            return
        fi
        sleep 1
    done
    return 1
}

check_healthcheck() { podman healthcheck run "$NAME" >/dev/null; }

check_user() {
    local uid config
    uid=$(podman exec "$NAME" id -u)
    config=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
    say "user: uid $uid in the container, image USER $config"
    [ "$uid" = 10001 ] && [ "$config" = 10001:10001 ]
}

check_readonly_adapter() { ! podman exec "$NAME" touch /ckpt/written 2>/dev/null; }

check_graceful_stop() {
    # A long streamed completion in flight, then `podman stop`: it must finish, and the server exit 0 by itself.
    local stream=$WORK/stream.out t0 t_stop code tokens
    curl -sS -N --max-time 300 "$URL/v1/completions" -H 'Content-Type: application/json' \
        -d '{"model": "ckpt", "prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": true, "stream": true,
             "stream_options": {"include_usage": true}}' >"$stream" 2>&1 &
    local client=$!
    for _ in $(seq 1 100); do
        grep -qs '^data: {' "$stream" && break  # -s: curl may not have created it yet
        sleep 0.2
    done
    t0=$(date +%s)
    podman stop -t 120 "$NAME" >/dev/null 2>>"$WORK/podman-run.log"
    t_stop=$(($(date +%s) - t0))
    wait "$client" || true
    code=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")
    tokens=$(sed -n 's/.*"completion_tokens":\([0-9]*\).*/\1/p' "$stream" | tail -n 1)
    say "stop: took ${t_stop} s, exit code $code; in-flight stream: ${tokens:-no} completion tokens of 300, $(grep -c '^data: \[DONE\]' "$stream") [DONE]"
    [ "$code" = 0 ] && [ "${tokens:-0}" = 300 ] && grep -q '^data: \[DONE\]' "$stream" && [ "$t_stop" -lt 120 ]
}

check "/health answers 200" check_health
check "a completion (demo adapter, model 'ckpt')" check_completion
check "remix_* metrics count the request" check_metrics
check "the image's HEALTHCHECK (podman healthcheck run)" check_healthcheck
check "runs as uid 10001 (image USER 10001:10001)" check_user
check "adapter mounted read-only" check_readonly_adapter
check "podman stop: in-flight stream finishes, exit code 0" check_graceful_stop

printf 'image %s (HEAD %s): %s MB; base/stand-in %s s, build %s s, start to /health %s s; whole script %s s\n' \
    "$IMAGE" "$commit" $((size / 1000000)) "$t_base" "$t_build" "$t_start" $(($(date +%s) - t_script))
if [ "$failures" != 0 ]; then
    podman logs --tail 60 "$NAME" >&2 || true
    die "$failures check(s) failed (the container's log is above)"
fi
say "all checks passed"
