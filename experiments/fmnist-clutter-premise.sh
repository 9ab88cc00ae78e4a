#!/usr/bin/env bash
# Issue #32, item 2: does the REPA premise hold on fmnist-clutter? The same linear probe (rrepa.eval.linear: logistic
# regression, l2 chosen on held-out train features, fit on the first $MAX_TRAIN train images, accuracy on the 10,000
# test images) of (1) the raw pixels, (2) the SSL encoder's architecture with random weights, (3) that encoder trained
# on the variant without labels (`rrepa encoder train --data fmnist-clutter`). Goal: (3) - (1) >= 20 points.
#   bash experiments/fmnist-clutter-premise.sh [OUT_DIR]      # default results/fmnist-clutter
# Writes OUT_DIR/premise.jsonl (one JSON line per probe, appended) and OUT_DIR/weights/fmnist-clutter-ssl.safetensors.
# About 20 minutes on one thread of the 2-core machine.
set -euo pipefail
out=${1:-results/fmnist-clutter}
max_train=${MAX_TRAIN:-20000}
rrepa=${RREPA:-.venv/bin/rrepa}
mkdir -p "$out/weights"
export HF_HUB_OFFLINE=1 RREPA_OFFLINE=1
enc="$out/weights/fmnist-clutter-ssl.safetensors"
[ -f "$enc" ] || $rrepa encoder train --data fmnist-clutter --out "$enc" --probe-max-train "$max_train"
$rrepa encoder probe --data fmnist-clutter --pixels "$enc" --probe-max-train "$max_train" | tee -a "$out/premise.jsonl"
$rrepa encoder probe --data fmnist-clutter --random "$enc" --probe-max-train "$max_train" | tee -a "$out/premise.jsonl"
