#!/usr/bin/env bash
# README command (2): set up .venv if needed, then run the whole test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
# The Node.js runtime test needs onnxruntime-node; install it when node/npm exist (its install
# script downloads extras that are not needed, hence --ignore-scripts). The test skips otherwise.
if command -v npm >/dev/null 2>&1 && [ -f scripts/node/package.json ] && [ ! -d scripts/node/node_modules/onnxruntime-node ]; then
    (cd scripts/node && npm install --ignore-scripts --no-audit --no-fund --silent >/dev/null 2>&1) \
        || echo "[test] npm install of onnxruntime-node failed; the Node.js test will be skipped"
fi
exec .venv/bin/python -m pytest -q "$@"
