#!/usr/bin/env bash
# Create .venv and install featbank (editable) with its test and lite extras. Idempotent: it
# reinstalls only when pyproject.toml or scripts/constraints.txt changed since the last run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.featbank-setup
want="$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import featbank, torch, h5py" 2>/dev/null; then
    echo "[setup] .venv is up to date"
    exit 0
fi
echo "[setup] installing featbank and its dependencies into .venv (torch takes a few minutes the first time)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c scripts/constraints.txt \
    "torch" "torchvision" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c scripts/constraints.txt \
    -e ".[test,lite,ray,parquet,dicom]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import featbank, torch, h5py, onnxruntime, timm, pydicom" && .venv/bin/ruff --version >/dev/null || {
    echo "[setup] installation failed: see the pip output above" >&2
    exit 1
}
echo "$want" > "$stamp"
echo "[setup] done: $(.venv/bin/featbank --version)"
