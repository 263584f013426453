#!/usr/bin/env bash
# The worked example of docs/own-data.md (issue 32): CIFAR-10 written out as an image folder at
# 64x64 (all 10 classes), the default's recipe trained on it for EPOCHS epochs, evaluated on the
# folder's own test split and archived. Everything goes to $OUT (default runs/own-data-example):
# data/ (the folder, ~60,000 PNGs), train/ (the run), evaluation/, store/ (the .mar files).
# Each step is skipped when its output exists, so the script can be stopped and rerun.
#   bash training/own_data_example.sh                 # about 50 minutes on 2 CPU cores
#   EPOCHS=20 N=1000 bash training/own_data_example.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RD="${ROBUSTDEQ:-.venv/bin/robustdeq}"
OUT="${OUT:-runs/own-data-example}"
EPOCHS="${EPOCHS:-4}"          # training epochs over the folder's train split
THREADS="${THREADS:-2}"        # torch threads of the training run
N="${N:-500}"                  # test-split images attacked
ATTACKS="${ATTACKS:-pgd apgd-ce apgd-t}"
[ -d "$OUT/data/train" ] || "$RD" cifar-folder "$OUT/data" --size 64 --no-progress
[ -f "$OUT/train/model.pt" ] || "$RD" train --config training/configs/deq-small-nfgsm-rs.yaml --out "$OUT/train" \
  --no-progress --set data.source=imagefolder --set "data.root=$OUT/data" --set data.input_size=64 \
  --set "optim.epochs=$EPOCHS" --set "run.threads=$THREADS"
# shellcheck disable=SC2086  # ATTACKS is a list of family names
[ -f "$OUT/evaluation/robustness_card.json" ] || "$RD" evaluate --checkpoint "$OUT/train/model.pt" \
  --out "$OUT/evaluation" --n "$N" --attacks $ATTACKS --defense none --no-progress
[ -f "$OUT/store/cifar64.mar" ] || "$RD" archive --checkpoint "$OUT/train/model.pt" --name cifar64 \
  --out "$OUT/store" --card "$OUT/evaluation/robustness_card.json"
"$RD" card "$OUT/evaluation/robustness_card.json"
