#!/usr/bin/env bash
# The selection variants and the selection probe on one GPU (SmolLM2-135M, bf16), behind the tables of
# launch/results/select-*/ (issue: retrieval in natural text):
#   bash launch/gpu_select.sh OUT                 # stage variants: 4 prose tasks + niah_single_1, 32K and 128K,
#                                                 # 10 samples, scope.select = paper, qkv, qkv2, qk_pe, --diagnose;
#                                                 # the 8K full-attention ceiling with the paper runs. Beside them,
#                                                 # a calibration run (other seeds: --seed 1, 32K, 5 samples of the
#                                                 # prose tasks) whose probe names the retrieval heads
#                                                 # (OUT/variants/heads.json, MIN_SHARE default 0.6), then the
#                                                 # paper's scoring with scope.heads=that file on the same samples
#   bash launch/gpu_select.sh OUT probe1m         # the probe at 1M: niah_single_2 and niah_single_1, paper
#   bash launch/gpu_select.sh OUT models          # the probe (with its fused ranks) under the paper's selection
#                                                 # on both models: SmolLM2 and Gemma-3-270M at 32K and 128K,
#                                                 # prose (10 samples) and noise (5; 3 at 128K), Gemma's full-
#                                                 # attention ceiling at 32K, SmolLM2 at 1M (2 prose, 1 noise)
#   bash launch/gpu_select.sh OUT mass            # scope.select=mass against paper on the same samples in the same
#                                                 # run: SmolLM2 at 32K and 128K (the four prose tasks, 10 samples;
#                                                 # noise, 5), Gemma-3-270M at 32K (niah_single_2/3) and 128K
#                                                 # (niah_single_2), 10 samples; SmolLM2 mass at 1M (2 samples)
#   bash launch/gpu_select.sh OUT shared          # scope.select=mass_shared against paper, SmolLM2, same samples in
#                                                 # the same run: niah_single_2 at 32K and 128K (10 samples), mass_shared
#                                                 # also on niah_single_3 and niah_multikey_1 at 32K, noise at 128K (3);
#                                                 # Gemma-3-270M mass_shared on niah_single_2 at 32K and 128K
#                                                 # and niah_single_3 at 32K, 10 samples (its paper runs: stage models)
#   bash launch/gpu_select.sh OUT shared2         # what stage shared left (select-mass_shared-H100-2026-12-07/):
#                                                 # SmolLM2 mass_shared on niah_multivalue at 32K and niah_single_3 at
#                                                 # 32K with span 64 / clip 63 (the same scope budget; its UUID value
#                                                 # is longer than span 32 reaches), 10 samples each, niah_single_2 at
#                                                 # 1M (2); Gemma-3-270M mass_shared as in stage shared, and
#                                                 # niah_single_3 at 32K with span 64 / clip 128, paper and mass_shared
#   bash launch/gpu_select.sh OUT shared3         # the cells a default needs, mass_shared with span 64 and one hit per
#                                                 # block (distinct; clip 63 for SmolLM2, 128 for Gemma: the budget of
#                                                 # span 32): SmolLM2 on the four prose tasks at 32K and 128K, noise
#                                                 # at 128K (3), niah_single_2 at 1M (2); beside it on
#                                                 # niah_multivalue at 32K, span 64 without distinct and span 32;
#                                                 # Gemma-3-270M on niah_single_2 at 32K and 128K, niah_single_3 at
#                                                 # 32K, niah_multikey_1 and niah_multivalue at 32K (5 each);
#                                                 # 10 samples where not named
# GEMMA (default gemma3-270m, the bundled package) may name the .gguf file instead, where the
# package is not installed (the device machine, which has no network: launch/results/*/README.md);
# GEMMA=none skips the Gemma-3-270M processes.
# One launch/ruler.py process per (selection, length), all at once on the one GPU (SmolLM2 cannot keep
# it busy alone), so s/sample are not speed figures; prefill_seconds compare the selections only
# because every process shares the GPU the same way. Each process writes
# OUT/<stage>/<select>-<len>/ (results.jsonl, table.md, ruler.log, command.txt); the stage then writes
# OUT/<stage>/selection.md (python -m dist_reattn.report.selection_report). LIMIT=seconds stops every
# process of a stage that long after the stage began (default 3600); a re-run resumes from the results files.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1
shift
stages=("${@:-variants}")
export PYTHONUNBUFFERED=1
TASKS=niah_single_2,niah_single_3,niah_multikey_1,niah_multivalue,niah_single_1

SMOL=(--model smollm2-135m)
gemma=${GEMMA:-gemma3-270m}
GEMMA=(--model "$gemma" --config gemma3-270m)
PROSE=niah_single_2,niah_single_3,niah_multikey_1,niah_multivalue

one() {  # one STAGE NAME ARGS...: a ruler.py process in the background (SmolLM2 unless ARGS name a model)
  local stage=$1 name=$2
  shift 2
  local dir=$out/$stage/$name
  [ "$gemma" = none ] && [[ " $* " == *" --model "* ]] && echo "== $stage/$name: skipped (GEMMA=none)" && return
  mkdir -p "$dir"
  local model=("${SMOL[@]}")
  [[ " $* " == *" --model "* ]] && model=()
  local cmd=(python3 launch/ruler.py "${model[@]}" --model.dtype=bf16 --mode reattention --diagnose
    --out "$dir" "$@")
  printf '%q ' "${cmd[@]}" >"$dir/command.txt"
  echo "== $stage/$name: $(cat "$dir/command.txt")"
  timeout "$(left)" "${cmd[@]}" >>"$dir/ruler.log" 2>&1 &
}

left() { echo $((${LIMIT:-3600} - (SECONDS - start))); }  # seconds left of the stage's LIMIT

for s in "${stages[@]}"; do
  start=$SECONDS
  case $s in
    variants)
      for sel in paper qkv qkv2 qk_pe; do
        ceiling=none
        [ $sel = paper ] && ceiling=8K
        one variants "$sel-32K" --tasks $TASKS --len 32K --samples 10 --ceiling $ceiling --scope.select=$sel
        one variants "$sel-128K" --tasks $TASKS --len 128K --samples 10 --ceiling none --scope.select=$sel
      done
      mkdir -p "$out/calibration"
      timeout "$(left)" python3 launch/ruler.py --model smollm2-135m --model.dtype=bf16 --mode reattention --diagnose --seed 1 \
        --tasks "${TASKS%,niah_single_1}" --len 32K --samples 5 --ceiling none --out "$out/calibration/paper-32K" \
        >"$out/calibration/ruler.log" 2>&1
      python3 -m dist_reattn.report.selection_report "$out/calibration/paper-32K/results.jsonl" \
        --out "$out/calibration/selection.md" --heads-out "$out/variants/heads.json" --min-share "${MIN_SHARE:-0.6}" | tail -1
      for n in 32K 128K; do
        one variants "heads-$n" --tasks $TASKS --len $n --samples 10 --ceiling none --scope.heads="$out/variants/heads.json"
      done
      ;;
    probe1m)
      one probe1m paper-1M --tasks niah_single_2,niah_single_1 --len 1M --samples 2 --ceiling none
      ;;
    models)
      for n in 32K 128K; do
        one models "smollm2-prose-$n" --tasks niah_single_2 --len $n --samples 10 --ceiling none
        one models "smollm2-prose3-$n" --tasks ${PROSE#niah_single_2,} --len $n --samples 10 --ceiling none
        one models "smollm2-noise-$n" --tasks niah_single_1 --len $n --samples $([ $n = 32K ] && echo 5 || echo 3) --ceiling none
        one models "gemma-prose-$n" "${GEMMA[@]}" --tasks niah_single_2 --len $n --samples 10 --ceiling none
        one models "gemma-noise-$n" "${GEMMA[@]}" --tasks niah_single_1 --len $n --samples $([ $n = 32K ] && echo 5 || echo 3) --ceiling none
      done
      one models gemma-prose3-32K "${GEMMA[@]}" --tasks ${PROSE#niah_single_2,} --len 32K --samples 10 --ceiling none
      one models gemma-full-32K "${GEMMA[@]}" --tasks $PROSE --len 32K --samples 10 --ceiling none --mode full
      one models smollm2-1M --tasks niah_single_2,niah_single_1 --len 1M --samples 2 --ceiling none
      ;;
    mass)
      for sel in paper mass; do
        for n in 32K 128K; do
          one mass "smollm2-$sel-a-$n" --tasks niah_single_2,niah_single_3 --len $n --samples 10 --ceiling none --scope.select=$sel
          one mass "smollm2-$sel-b-$n" --tasks niah_multikey_1,niah_multivalue --len $n --samples 10 --ceiling none --scope.select=$sel
          one mass "smollm2-$sel-noise-$n" --tasks niah_single_1 --len $n --samples 5 --ceiling none --scope.select=$sel
        done
        one mass "gemma-$sel-32K" "${GEMMA[@]}" --tasks niah_single_2,niah_single_3 --len 32K --samples 10 --ceiling none --scope.select=$sel
        one mass "gemma-$sel-128K" "${GEMMA[@]}" --tasks niah_single_2 --len 128K --samples 10 --ceiling none --scope.select=$sel
      done
      one mass smollm2-mass-1M --tasks niah_single_2 --len 1M --samples 2 --ceiling none --scope.select=mass
      ;;
    shared)
      for n in 32K 128K; do
        for sel in paper mass_shared; do
          one shared "smollm2-$sel-$n" --tasks niah_single_2 --len $n --samples 10 --ceiling none --scope.select=$sel
        done
        one shared "gemma-mass_shared-$n" "${GEMMA[@]}" --tasks niah_single_2 --len $n --samples 10 --ceiling none --scope.select=mass_shared
      done
      for t in niah_single_3 niah_multikey_1; do
        one shared "smollm2-mass_shared-$t-32K" --tasks $t --len 32K --samples 10 --ceiling none --scope.select=mass_shared
      done
      one shared gemma-mass_shared-niah_single_3-32K "${GEMMA[@]}" --tasks niah_single_3 --len 32K --samples 10 --ceiling none --scope.select=mass_shared
      one shared smollm2-mass_shared-noise-128K --tasks niah_single_1 --len 128K --samples 3 --ceiling none --scope.select=mass_shared
      ;;
    shared2)
      one shared2 smollm2-mass_shared-niah_multivalue-32K --tasks niah_multivalue --len 32K --samples 10 --ceiling none --scope.select=mass_shared
      one shared2 smollm2-mass_shared-span64-niah_single_3-32K --tasks niah_single_3 --len 32K --samples 10 --ceiling none \
        --scope.select=mass_shared --scope.span=64 --scope.recall_clip=63
      one shared2 smollm2-mass_shared-1M --tasks niah_single_2 --len 1M --samples 2 --ceiling none --scope.select=mass_shared
      for n in 32K 128K; do
        one shared2 "gemma-mass_shared-$n" "${GEMMA[@]}" --tasks niah_single_2 --len $n --samples 10 --ceiling none --scope.select=mass_shared
      done
      one shared2 gemma-mass_shared-niah_single_3-32K "${GEMMA[@]}" --tasks niah_single_3 --len 32K --samples 10 --ceiling none --scope.select=mass_shared
      for sel in paper mass_shared; do
        one shared2 "gemma-$sel-span64-niah_single_3-32K" "${GEMMA[@]}" --tasks niah_single_3 --len 32K --samples 10 --ceiling none \
          --scope.select=$sel --scope.span=64 --scope.recall_clip=128
      done
      ;;
    shared3)
      S64D=(--scope.select=mass_shared --scope.span=64 --scope.recall_clip=63 --scope.distinct=true)
      G64D=(--scope.select=mass_shared --scope.span=64 --scope.recall_clip=128 --scope.distinct=true)
      for n in 32K 128K; do
        for t in ${PROSE//,/ }; do
          one shared3 "smollm2-s64d-$t-$n" --tasks $t --len $n --samples 10 --ceiling none "${S64D[@]}"
        done
        one shared3 "gemma-s64d-$n" "${GEMMA[@]}" --tasks niah_single_2 --len $n --samples 10 --ceiling none "${G64D[@]}"
      done
      one shared3 smollm2-s64d-noise-128K --tasks niah_single_1 --len 128K --samples 3 --ceiling none "${S64D[@]}"
      one shared3 smollm2-s64d-1M --tasks niah_single_2 --len 1M --samples 2 --ceiling none "${S64D[@]}"
      one shared3 smollm2-s64-niah_multivalue-32K --tasks niah_multivalue --len 32K --samples 10 --ceiling none \
        --scope.select=mass_shared --scope.span=64 --scope.recall_clip=63
      one shared3 smollm2-mass_shared-niah_multivalue-32K --tasks niah_multivalue --len 32K --samples 10 --ceiling none --scope.select=mass_shared
      one shared3 gemma-s64d-niah_single_3-32K "${GEMMA[@]}" --tasks niah_single_3 --len 32K --samples 10 --ceiling none "${G64D[@]}"
      one shared3 gemma-s64d-mk1-mv-32K "${GEMMA[@]}" --tasks niah_multikey_1,niah_multivalue --len 32K --samples 5 --ceiling none "${G64D[@]}"
      ;;
    *) echo "unknown stage $s" >&2 && continue ;;
  esac
  wait
  python3 -m dist_reattn.report.selection_report "$out/$s"/*/results.jsonl --out "$out/$s/selection.md" >/dev/null
  echo "$s: $((SECONDS - start)) s"
done
echo "total ${SECONDS} s; results under $out"
