#!/usr/bin/env bash
# scope.scoring=fp8 against exact on one GPU, behind launch/results/fp8-*/ (issue: FP8 scoring):
#   bash launch/gpu_fp8.sh OUT tests    # the FP8 kernel and engine tests, compiled on the GPU
#   bash launch/gpu_fp8.sh OUT bench    # the kernel against exact at c 512 (the engine's chunk) and 2048,
#                                       # N 256K-4M, with pass-1 variants PIPE=1, GATE=1 and the FLOOR=1
#                                       # baseline (pass 1 without its tile list: what the list costs)
#   bash launch/gpu_fp8.sh OUT time     # SmolLM2 NIAH 1M (noise, depth 0.5), exact then fp8 (margin 4),
#                                       # one after the other with the GPU to itself: prefill seconds
#   bash launch/gpu_fp8.sh OUT audit    # the selection audit on real keys, margins 0,1,2,4,8,12, 1 sample
#                                       # each (launch/ruler.py --fp8-audit): SmolLM2 niah_single_2 (prose)
#                                       # at 1M and niah_single_1 (noise) at 256K; Gemma-3-270M both at 1M
#   bash launch/gpu_fp8.sh OUT parity   # task parity: RULER niah_single_1/2/3 + niah_multikey_1 at 32K and
#                                       # 128K, SmolLM2, exact and fp8 on the same samples (SAMPLES, default 3)
# GEMMA (default gemma3-270m, the bundled package) may name the .gguf file instead; GEMMA=none skips
# the Gemma-3-270M audit. The audit and
# parity processes of a stage run at once on the one GPU, so their seconds are not speed figures;
# LIMIT=seconds stops them that long after the stage began (default 3600); re-runs resume.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1
shift
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
SMOL=(--model smollm2-135m --model.dtype=bf16)
gemma=${GEMMA:-gemma3-270m}
GEMMA=(--model "$gemma" --config gemma3-270m --model.dtype=bf16)
left() { echo $((${LIMIT:-3600} - (SECONDS - start))); }

bg() {  # bg STAGE NAME CMD...: CMD in the background, its log and command line in OUT/STAGE/NAME/
  local dir=$out/$1/$2
  shift 2
  mkdir -p "$dir"
  printf '%q ' "$@" >"$dir/command.txt"
  echo "== $(cat "$dir/command.txt")"
  timeout "$(left)" "$@" >>"$dir/log.txt" 2>&1 &
}

for s in "$@"; do
  start=$SECONDS
  case $s in
    tests)
      mkdir -p "$out/tests"
      timeout "$(left)" python3 -m pytest -q tests/test_kernel_fp8.py tests/test_engine_fp8.py 2>&1 | tee "$out/tests/log.txt" | tail -n 5
      ;;
    bench)
      mkdir -p "$out"
      timeout "$(left)" python3 launch/bench_fp8.py --out "$out/bench" --c 512 2048 --agree-margins 4 \
        --fp8-config PIPE=1 --fp8-config GATE=1 --fp8-config PIPE=1,GATE=1 --fp8-config FLOOR=1 2>&1 |
        tee "$out/bench.txt" | grep '^|'
      ;;
    time)
      for sc in exact fp8; do
        bg time $sc python3 launch/niah.py "${SMOL[@]}" --len 1M --depths 0.5 --mode reattention \
          --max-new-tokens 32 --scope.scoring=$sc --out "$out/time/$sc"
        wait
        grep -h -o '"prefill_seconds": [0-9.]*\|"found": [a-z]*' "$out/time/$sc"/results.jsonl 2>/dev/null
      done
      ;;
    audit)
      au=(--mode reattention --samples 1 --ceiling none --scope.scoring=fp8 --fp8-audit 0,1,2,4,8,12)
      bg audit smollm2-prose-1M python3 launch/ruler.py "${SMOL[@]}" "${au[@]}" --tasks niah_single_2 --len 1M \
        --out "$out/audit/smollm2-prose-1M"
      bg audit smollm2-noise-256K python3 launch/ruler.py "${SMOL[@]}" "${au[@]}" --tasks niah_single_1 --len 256K \
        --out "$out/audit/smollm2-noise-256K"
      [ "$gemma" = none ] || bg audit gemma-1M python3 launch/ruler.py "${GEMMA[@]}" "${au[@]}" --tasks niah_single_2,niah_single_1 --len 1M \
        --out "$out/audit/gemma-1M"
      ;;
    parity)
      for n in 32K 128K; do
        for sc in exact fp8; do
          bg parity smollm2-$sc-$n python3 launch/ruler.py "${SMOL[@]}" --mode reattention --recall \
            --tasks niah_single_1,niah_single_2,niah_single_3,niah_multikey_1 --len $n --samples "${SAMPLES:-3}" \
            --ceiling none --scope.scoring=$sc --out "$out/parity/smollm2-$sc-$n"
        done
      done
      ;;
    *) echo "unknown stage $s" >&2 && continue ;;
  esac
  wait
  echo "$s: $((SECONDS - start)) s"
done
echo "total ${SECONDS} s; results under $out"
