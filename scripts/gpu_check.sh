#!/usr/bin/env bash
# The GPU check of extraction (one short run, under 8 minutes on one GPU), for a machine with CUDA:
#   1. the machine: nvidia-smi, torch's view of the GPUs;
#   2. featbank doctor on ELPV with --device cuda: each stage's cost and the predicted img/s;
#   3. bench_extract on CUDA: the backbone alone vs featbank extract end to end (every run from no
#      cache, checked to embed N images), with the doctor's prediction beside it; then again with
#      --decode gpu (JPEGs decoded by nvJPEG and resized on the GPU);
#   4. extract with --procs = the GPU count (work units), rows/s printed.
# Needs: featbank installed in the Python that runs it (PYTHON, default python3) with its
# dependencies (torch with CUDA, h5py, onnxruntime, elpv-dataset for the data). The figures go into
# table in docs/at-scale.md by hand once it has run. Output: stdout, and JSON lines in $OUT if set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
N=${GPU_CHECK_N:-2000}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/featbank-gpu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export FEATBANK_CACHE_DIR="$WORK/cache"

echo "== 1/4 the machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'GPU(s)')"
GPUS=$($PY -c "import torch; print(max(1, torch.cuda.device_count()))")

echo "== 2/4 data: ELPV, and featbank doctor --device cuda"
$PY scripts/prepare_data.py elpv "$WORK/elpv" --split 70-30 >/dev/null
timeout 120 $PY -m featbank.cli doctor "$WORK/elpv" --device cuda --batch-size 128 --sample 128

echo "== 3/4 bench_extract on CUDA (N=$N, best of 2, RSS runs skipped)"
timeout 300 $PY scripts/bench_extract.py --device cuda --n "$N" --repeat 2 --batch-size 128 --skip-rss --skip-tutorial

echo "== 3b/4 bench_extract on CUDA with --decode gpu (nvJPEG decode and resize on the GPU; PNGs via Pillow)"
timeout 150 $PY scripts/bench_extract.py --device cuda --decode gpu --n "$N" --repeat 2 --batch-size 128 --skip-rss \
    --skip-tutorial

echo "== 4/4 extract --procs $GPUS (one worker per GPU, work units)"
start=$(date +%s.%N)
timeout 200 $PY -m featbank.cli extract "$WORK/elpv" --out "$WORK/procs.h5" --device cuda --procs "$GPUS" \
    --batch-size 128 --num-workers 0 --quiet
end=$(date +%s.%N)
$PY - "$WORK/procs.h5" "$start" "$end" <<'PYEOF'
import sys, h5py
with h5py.File(sys.argv[1], "r") as f:
    n = f["embeddings"].shape[0]
dt = float(sys.argv[3]) - float(sys.argv[2])
print(f"extract --procs: {n} rows in {dt:.1f} s = {n / dt:.1f} img/s (process start-up included)")
PYEOF
