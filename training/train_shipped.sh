#!/usr/bin/env bash
# Train (or resume) the four shipped default checkpoints into training/shipped/<recipe>/.
# Each run resumes from its last.pt, so this script can be stopped and started again.
# Usage: bash training/train_shipped.sh [recipe ...]   (default: all four, one after another)
set -euo pipefail
cd "$(dirname "$0")/.."
ROBUSTDEQ="${ROBUSTDEQ:-.venv/bin/robustdeq}"
recipes=("$@")
if [ ${#recipes[@]} -eq 0 ]; then
  recipes=(deq-tiny-trades-rs deq-tiny-trades lyadeq-tiny-trades lyadeq-tiny-clean)
fi
for r in "${recipes[@]}"; do
  echo "== $r"
  "$ROBUSTDEQ" train --config "training/configs/$r.yaml" --out "training/shipped/$r"
done
