#!/usr/bin/env bash
# Set up the CPU environment and the deployment tools, then run the whole test suite (real vLLM
# engines, Helm, Prometheus and Chromium included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-cpu.sh
bash scripts/setup-deploy-tools.sh
# Two workers, a test file each at a time (module fixtures stay in one process): an engine test
# waits on its spawned engine for much of its run, so two overlap on 2 cores (1.8x measured).
exec "${KVFOLD_VENV:-.venv}/bin/python" -m pytest -v -rs --durations=15 \
    -n "${KVFOLD_TEST_WORKERS:-2}" --dist loadfile tests "$@"
