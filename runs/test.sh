#!/usr/bin/env bash
# Set up the environment (if needed) and run the whole test suite: `bash runs/test.sh [pytest args]`.
# The fast lane skips the tests marked slow (whole stages, torchrun, compilation): `bash runs/test.sh -m "not slow"`.
# Tests read the embedded sample in data/ (NANOCHAT_TEST_DATA=DIR: another data tree of that layout); the few
# that compare it with the full data tree ../shared/data (NANOCHAT_SHARED_DATA=DIR) skip when that is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
exec .venv/bin/python -m pytest -q "$@"
