#!/usr/bin/env bash
# Set up the CPU environment, then serve a small model with vLLM's default backend and with each
# kvfold backend, and print the KV capacity (tokens, max concurrency) vLLM reports for each.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-cpu.sh
exec "${KVFOLD_VENV:-.venv}/bin/kvfold" demo "$@"
