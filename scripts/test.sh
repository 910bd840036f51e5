#!/usr/bin/env bash
# Set up the CPU environment, then run the whole test suite (real vLLM engines included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-cpu.sh
exec "${KVFOLD_VENV:-.venv}/bin/python" -m pytest -v -rs --durations=15 tests "$@"
