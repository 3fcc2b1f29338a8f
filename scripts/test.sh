#!/usr/bin/env bash
# README command (2): set up .venv if needed, then run the whole test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
# The Node.js tests need onnxruntime-node, pngjs and sharp; install them when node/npm exist (the
# onnxruntime-node install script downloads extras that are not needed, hence --ignore-scripts).
# The tests skip otherwise.
if command -v npm >/dev/null 2>&1 && [ -f scripts/node/package.json ] && { [ ! -d scripts/node/node_modules/onnxruntime-node ] \
        || [ ! -d scripts/node/node_modules/pngjs ] || [ ! -d scripts/node/node_modules/sharp ]; }; then
    (cd scripts/node && npm install --ignore-scripts --no-audit --no-fund --silent >/dev/null 2>&1) \
        || echo "[test] npm install of the Node.js example's packages failed; the Node.js tests will be skipped"
fi
exec .venv/bin/python -m pytest -q "$@"
