#!/usr/bin/env bash
# The test suite, with its own set-up: lint, format check, then pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest -q "$@"
