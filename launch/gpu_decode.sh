#!/usr/bin/env bash
# The decode measurements behind the committed decode results, into OUT/<name>/:
#   bash launch/gpu_decode.sh OUT tests smol llama niah1m          # one GPU
#   bash launch/gpu_decode.sh OUT tests smol4m-p2 llama512k-p2     # two GPUs
# Stages: tests (the decode and kernel tests compiled on the GPU; with two GPUs the NCCL graph test
# runs too), smol (bench_decode, SmolLM2 128K and 1M), llama (bench_decode, the Llama-3.1-8B shape
# with random weights, 128K and 512K), niah1m (SmolLM2 NIAH at 1M, depth 0.5, 32 new tokens:
# decode_ms_per_token and decode_warmup_s of a real run); on two GPUs: smol4m-p2 (bench_decode,
# SmolLM2 4M), llama512k-p2 (bench_decode, Llama shape 512K), niah4m-p2 (SmolLM2 NIAH at 4M, depths
# from DEPTHS, default 0.5, 32 new tokens); mass (bench_decode, SmolLM2 128K and 1M, scope.select=paper
# then mass_shared: both passes of a token in the graph against the paper's one).
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1
shift
two=(python3 -m torch.distributed.run --standalone --nproc_per_node 2)
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
    tests) step tests python3 -m pytest -q tests/test_decode.py tests/test_kernel_score_topk.py -k "decode or device_end or gpus" ;;
    smol) step bench-smol python3 launch/bench_decode.py --model smollm2-135m --len 128K,1M --out "$out/bench-smol" ;;
    llama)
      step bench-llama python3 launch/bench_decode.py --model random:llama-3.1-8b --len 128K,512K --tokens 32 \
        --same-tokens 256 --out "$out/bench-llama"
      ;;
    niah1m)
      step niah-smol-1M python3 launch/niah.py --model smollm2-135m --len 1M --depths 0.5 --mode reattention \
        --max-new-tokens 32 --out "$out/niah-smol-1M"
      ;;
    mass)
      for sel in paper mass_shared; do
        step "bench-smol-$sel" python3 launch/bench_decode.py --model smollm2-135m --len 128K,1M --tokens 32 \
          --same-tokens 128 --no-hf --scope.select=$sel --out "$out/bench-smol-$sel"
      done
      ;;
    smol4m-p2)
      step bench-smol-4M-p2 "${two[@]}" launch/bench_decode.py --model smollm2-135m --len 4M --tokens 64 \
        --same-tokens 256 --out "$out/bench-smol-4M-p2"
      ;;
    llama512k-p2)
      step bench-llama-512K-p2 "${two[@]}" launch/bench_decode.py --model random:llama-3.1-8b --len 512K \
        --tokens 32 --same-tokens 256 --out "$out/bench-llama-512K-p2"
      ;;
    niah4m-p2)
      step niah-smol-4M-p2 "${two[@]}" launch/niah.py --model smollm2-135m --len 4M --depths "${DEPTHS:-0.5}" \
        --mode reattention --max-new-tokens 32 --out "$out/niah-smol-4M-p2"
      ;;
    *) echo "unknown stage $stage" && exit 2 ;;
  esac
done
