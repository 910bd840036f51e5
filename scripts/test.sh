#!/usr/bin/env bash
# Set up the CPU environment and the deployment tools, then run the whole test suite (real vLLM
# engines, Helm, Prometheus and Chromium included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-cpu.sh
bash scripts/setup-deploy-tools.sh
exec "${KVFOLD_VENV:-.venv}/bin/python" -m pytest -v -rs --durations=15 tests "$@"
