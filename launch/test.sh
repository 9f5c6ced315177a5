#!/usr/bin/env bash
# The test suite, with its own set-up: lint, format check, then pytest. Extra args go to pytest.
# Runs at the tested versions (launch/constraints.txt, in .venv); DIST_REATTN_NEWEST=1 runs it against
# the newest releases instead (in .venv-newest; see launch/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
venv=.venv
[ "${DIST_REATTN_NEWEST:-0}" = 1 ] && venv=.venv-newest
# shellcheck disable=SC1091
. "$venv/bin/activate"
ruff check .
ruff format --check .
python -m pytest -q --durations=20 "$@"
