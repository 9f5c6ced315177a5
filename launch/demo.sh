#!/usr/bin/env bash
# The demo, with its own set-up: NIAH on the bundled SmolLM2-135M-Instruct at 16K tokens (twice its
# trained window), modes full and reattention side by side, on CPU. Extra args go to launch/niah.py,
# e.g. the full grid: bash launch/demo.sh --depths 0.1,0.5,0.9 --mode full,streaming,reattention
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
. .venv/bin/activate
python launch/niah.py --model smollm2-135m --len 16K --depths 0.3 --mode full,reattention --out runs/demo "$@"
