#!/usr/bin/env bash
# RULER on one GPU, behind the committed GPU tables: SmolLM2-135M, bf16, the eight NIAH tasks in
# reattention mode, one sample per cell, with full attention at 4K (in the window) as the ceiling.
#   bash launch/gpu_ruler.sh OUT            # stage main: 128K and 512K (about 4-5 min on one H200)
#   bash launch/gpu_ruler.sh OUT main 1m    # and niah_single_1 + niah_multikey_2 at 1M (~2.5 min more)
# Each stage writes OUT/<stage>/ (results.jsonl, table.md, scores.png, ruler.log, command.txt) and
# prints its wall time; re-running resumes from the results files.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1
shift
stages=("${@:-main}")
export PYTHONUNBUFFERED=1

run() {  # run NAME ARGS...: one launch/ruler.py run into OUT/NAME
  local name=$1
  shift
  local dir=$out/$name start=$SECONDS
  mkdir -p "$dir"
  local cmd=(python3 launch/ruler.py --model smollm2-135m --model.dtype=bf16 --mode reattention
    --ceiling 4K --samples 1 --out "$dir" "$@")
  printf '%q ' "${cmd[@]}" >"$dir/command.txt"
  echo "== $name: $(cat "$dir/command.txt")"
  "${cmd[@]}" >>"$dir/ruler.log" 2>&1
  echo "exit $? after $((SECONDS - start)) s"
  cat "$dir/table.md" 2>/dev/null
}

for stage in "${stages[@]}"; do
  case $stage in
    main) run main --tasks niah --len 128K,512K ;;
    1m) run 1m --tasks niah_single_1,niah_multikey_2 --len 1M ;;
    *) echo "unknown stage $stage" >&2 ;;
  esac
done
echo "total ${SECONDS} s; results under $out"
