#!/usr/bin/env bash
# Set up the environment (if needed) and run the whole test suite: `bash runs/test.sh [pytest args]`.
# Tests read the real sample data in ../shared/data (override with NANOCHAT_TEST_DATA=...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
exec .venv/bin/python -m pytest -q "$@"
