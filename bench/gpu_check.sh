#!/usr/bin/env bash
# The GPU check in one command, on a fresh host with one NVIDIA GPU and PyPI: install (make install picks
# vllm==0.32.0 where nvidia-smi sees a GPU), then bench/gpu_check.py under an 11-minute limit (about 8 minutes for
# checks 1-6, 3 for the pool's; `--only pool` runs those alone). Extra arguments go
# to gpu_check.py (--dry-run walks the set-up on any host).
set -euo pipefail
cd "$(dirname "$0")/.."
make install
exec timeout 660 .venv/bin/python bench/gpu_check.py "$@"
