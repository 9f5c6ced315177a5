#!/usr/bin/env bash
# Multi-GPU NIAH runs behind the committed scaling reports: each (model, length, P, layout) into
# OUT/<name>/ (results.jsonl, profile.json, niah.log, command.txt); `launch/scaling.py --from` then
# builds the report. Stages run in the order given, e.g. on a 4-GPU host:
#   bash launch/gpu_scaling.sh OUT smol1m llama512k
# Stages: smol1m (SmolLM2 1M, P = 1, 2, 4 sequence groups, P = 2 tensor parallel), llama512k (the
# Llama-3.1-8B shape with random weights, 512K, P = 1, 2, 4), smol4m-p2 / smol4m-p4 (SmolLM2 4M,
# depths from DEPTHS, default 0.5). P larger than the GPUs present is skipped. NVLink multicast stays
# off (NCCL_NVLS_ENABLE=0 and friends) wherever several GPUs share a host with others.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1
shift
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
depths=${DEPTHS:-0.5}

run() {  # run NAME P ARGS...: one NIAH run at P ranks
  local name=$1 p=$2
  shift 2
  if [ "$p" -gt "$gpus" ]; then
    echo "skip $name: P=$p > $gpus GPUs"
    return
  fi
  local dir=$out/$name launcher=(python3)
  [ "$p" -gt 1 ] && launcher=(python3 -m torch.distributed.run --standalone --nproc_per_node "$p")
  mkdir -p "$dir"
  local cmd=("${launcher[@]}" launch/niah.py --mode reattention --out "$dir" "$@")
  printf '%q ' "${cmd[@]}" >"$dir/command.txt"
  echo "== $name: $(cat "$dir/command.txt")"
  "${cmd[@]}" >>"$dir/niah.log" 2>&1
  echo "exit $? after ${SECONDS}s; $(grep -E 'OK |MISS' "$dir/niah.log" | tail -n 1)"
}

for stage in "$@"; do
  case $stage in
    smol1m)
      for p in 1 2 4; do run "smol-1M-p$p" "$p" --model smollm2-135m --len 1M --depths "$depths"; done
      run smol-1M-p2-tensor 2 --model smollm2-135m --len 1M --depths "$depths" --parallel.layout=tensor
      ;;
    llama512k)
      for p in 1 2 4; do
        run "llama8b-512K-p$p" "$p" --model random:llama-3.1-8b --config llama-3.1-8b --len 512K --depths "$depths"
      done
      ;;
    smol4m-p2) run smol-4M-p2 2 --model smollm2-135m --len 4M --depths "$depths" ;;
    smol4m-p4) run smol-4M-p4 4 --model smollm2-135m --len 4M --depths "$depths" ;;
    *) echo "unknown stage $stage" >&2 ;;
  esac
done
