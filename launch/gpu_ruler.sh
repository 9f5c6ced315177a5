#!/usr/bin/env bash
# RULER on one GPU, behind the committed GPU tables: SmolLM2-135M, bf16. SmolLM2 is too small to
# keep one H200 busy, so the stages run one launch/ruler.py process per task at the same time
# (their s/sample include that sharing).
#   bash launch/gpu_ruler.sh OUT            # stage main: NIAH family, 128K and 512K, reattention, 1 sample
#   bash launch/gpu_ruler.sh OUT grid       # 9 tasks (niah + vt) x 8K/16K/32K x full/streaming/reattention,
#                                           # 3 samples, 4K ceiling (about 9 min on one H200)
#   bash launch/gpu_ruler.sh OUT 1m         # NIAH family at 1M, reattention, 1 sample (about 10-12 min)
#   bash launch/gpu_ruler.sh OUT recall     # 6 NIAH tasks, 16K-512K reattention, 3 samples, --recall (> 8 min)
# Each process writes OUT/<stage>/<first task>/ (results.jsonl, table.md, scores.png, ruler.log,
# command.txt); the stage then merges them into OUT/<stage>/results.jsonl, table.md and scores.png.
# Re-running resumes from the results files. LIMIT=seconds stops every process of a stage there.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1
shift
stages=("${@:-main}")
export PYTHONUNBUFFERED=1
NIAH=(niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 niah_multikey_2 niah_multikey_3
  niah_multivalue niah_multiquery)

stage() {  # stage NAME CEILING "TASKS TASKS ..." ARGS...: one process per word (a --tasks list), then the merged table
  local name=$1 ceiling=$2 groups=$3
  shift 3
  local start=$SECONDS pids=() t
  for t in $groups; do
    local dir=$out/$name/${t%%,*}
    mkdir -p "$dir"
    local cmd=(python3 launch/ruler.py --model smollm2-135m --model.dtype=bf16 --ceiling "$ceiling"
      --tasks "$t" --out "$dir" "$@")
    printf '%q ' "${cmd[@]}" >"$dir/command.txt"
    echo "== $name/$t: $(cat "$dir/command.txt")"
    timeout "${LIMIT:-3600}" "${cmd[@]}" >>"$dir/ruler.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || echo "a $name process exited $?"; done
  cat "$out/$name"/*/results.jsonl >"$out/$name/results.jsonl" 2>/dev/null
  python3 -m dist_reattn.report.ruler_report "$out/$name/results.jsonl" --ceiling "$ceiling" \
    --plot "$out/$name/scores.png" | tee "$out/$name/table.md"
  echo "$name: $((SECONDS - start)) s"
}

joined() { local IFS=,; echo "$*"; }
# main, grid and recall: one process per task; 1m: one process (a 1M cache each would not fit 8 times)
for s in "${stages[@]}"; do
  case $s in
    main) stage main 4K "${NIAH[*]}" --len 128K,512K --mode reattention --samples 1 ;;
    grid) stage grid 4K "${NIAH[*]} vt" --len 8K,16K,32K --mode full,streaming,reattention --samples 3 ;;
    1m) stage 1m none "$(joined "${NIAH[@]}")" --len 1M --mode reattention --samples 1 ;;
    recall) stage recall none "niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 niah_multivalue niah_multiquery" \
      --len 16K,32K,128K,512K --mode reattention --samples 3 --recall ;;
    *) echo "unknown stage $s" >&2 ;;
  esac
done
echo "total ${SECONDS} s; results under $out"
