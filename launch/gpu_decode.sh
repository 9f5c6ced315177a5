#!/usr/bin/env bash
# The decode measurements behind the committed decode results, on one GPU, into OUT/<name>/:
#   bash launch/gpu_decode.sh OUT tests smol llama niah1m
# Stages: tests (the decode and kernel tests compiled on the GPU), smol (bench_decode, SmolLM2 128K
# and 1M), llama (bench_decode, the Llama-3.1-8B shape with random weights, 128K and 512K), niah1m
# (SmolLM2 NIAH at 1M, depth 0.5, 32 new tokens: decode_ms_per_token and decode_warmup_s of a real run).
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1
shift
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1

step() {  # step NAME CMD...: CMD's output into OUT/NAME/log.txt, the command into command.txt
  local dir=$out/$1
  shift
  mkdir -p "$dir"
  printf '%q ' "$@" >"$dir/command.txt"
  echo "== $(cat "$dir/command.txt")"
  "$@" >"$dir/log.txt" 2>&1
  echo "exit $? after ${SECONDS}s"
  tail -n 4 "$dir/log.txt"
}

for stage in "$@"; do
  case $stage in
    tests) step tests python3 -m pytest -q tests/test_decode.py tests/test_kernel_score_topk.py -k "decode or device_end" ;;
    smol) step bench-smol python3 launch/bench_decode.py --model smollm2-135m --len 128K,1M --out "$out/bench-smol" ;;
    llama)
      step bench-llama python3 launch/bench_decode.py --model random:llama-3.1-8b --len 128K,512K --tokens 32 \
        --same-tokens 256 --out "$out/bench-llama"
      ;;
    niah1m)
      step niah-smol-1M python3 launch/niah.py --model smollm2-135m --len 1M --depths 0.5 --mode reattention \
        --max-new-tokens 32 --out "$out/niah-smol-1M"
      ;;
    *) echo "unknown stage $stage" && exit 2 ;;
  esac
done
