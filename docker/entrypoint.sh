#!/bin/sh
# Container entrypoint for remix-serve: container-friendly defaults, then `exec remix-serve "$@"`.
#
#   entrypoint.sh --adapter /ckpt [remix-serve flags...]   serve (listens on 0.0.0.0 unless --host is given)
#   entrypoint.sh --help                                    remix-serve's help
#   entrypoint.sh remix-serve ARGS... | entrypoint.sh CMD   the same / run another command (e.g. a shell)
#
# Environment:
#   REMIX_HOST   default for --host (0.0.0.0, so the port is reachable from outside the container)
#   REMIX_PORT   default for --port when set (the image's HEALTHCHECK reads it too; remix-serve's default is 8000)
#   REMIX_PORT_FILE  when set, the port the server will listen on (from --port N, --port=N, REMIX_PORT or the
#                default 8000) is written there for the image's HEALTHCHECK (docker/healthcheck.py)
#   REMIX_HOME   where bundled bases are converted on first use; must be writable. Default
#                $XDG_CACHE_HOME/remix-serve, else $HOME/.cache/remix-serve, else /tmp/remix-serve.
# It runs without Docker too: it only needs `remix-serve` on PATH (or REMIX_SERVE_BIN).
set -eu

if [ -z "${REMIX_HOME:-}" ]; then
    if [ -n "${XDG_CACHE_HOME:-}" ]; then
        REMIX_HOME="$XDG_CACHE_HOME/remix-serve"
    elif [ -n "${HOME:-}" ] && [ "$HOME" != / ] && [ -w "$HOME" ]; then
        REMIX_HOME="$HOME/.cache/remix-serve"
    else
        # An arbitrary UID without a writable home (OpenShift-style): the cache still needs a place.
        REMIX_HOME=/tmp/remix-serve
    fi
fi
export REMIX_HOME
if ! mkdir -p "$REMIX_HOME" 2>/dev/null || [ ! -w "$REMIX_HOME" ]; then
    echo "entrypoint: REMIX_HOME=$REMIX_HOME is not writable; set REMIX_HOME to a writable folder" >&2
    exit 2
fi

# A Kubernetes Service named `vllm` makes the kubelet inject VLLM_PORT=tcp://IP:PORT into every pod of the
# namespace; vLLM reads VLLM_PORT as its own internal port number and refuses to start. Drop that form only.
case "${VLLM_PORT:-}" in
    tcp://*)
        echo "entrypoint: ignoring VLLM_PORT=$VLLM_PORT (injected by a Service named vllm)" >&2
        unset VLLM_PORT
        ;;
esac

# `docker run IMAGE bash` (or remix-train, ...): run that command, in the same environment, instead of the server.
if [ "$#" -gt 0 ]; then
    case "$1" in
        remix-serve) shift ;;
        -*) ;;
        *) exec "$@" ;;
    esac
fi

has_flag() {
    flag=$1
    shift
    for arg in "$@"; do
        case "$arg" in
            "$flag" | "$flag"=*) return 0 ;;
        esac
    done
    return 1
}

if [ -n "${REMIX_PORT:-}" ] && ! has_flag --port "$@"; then
    set -- --port "$REMIX_PORT" "$@"
fi
if ! has_flag --host "$@"; then
    set -- --host "${REMIX_HOST:-0.0.0.0}" "$@"
fi

# The port remix-serve will listen on: its last --port wins, as in argparse.
port=8000
take_next=
for arg in "$@"; do
    if [ -n "$take_next" ]; then
        port=$arg
        take_next=
    fi
    case "$arg" in
        --port) take_next=1 ;;
        --port=*) port=${arg#--port=} ;;
    esac
done
if [ -n "${REMIX_PORT_FILE:-}" ] && ! printf '%s\n' "$port" 2>/dev/null >"$REMIX_PORT_FILE"; then
    echo "entrypoint: cannot write REMIX_PORT_FILE=$REMIX_PORT_FILE; the HEALTHCHECK will probe ${REMIX_PORT:-8000}" >&2
fi

exec "${REMIX_SERVE_BIN:-remix-serve}" "$@"
