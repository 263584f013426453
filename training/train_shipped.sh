#!/usr/bin/env bash
# Train (or resume) the shipped checkpoints into training/shipped/<recipe>/. Each run resumes
# from its last.pt, so this script can be stopped and started again. Every recipe below has
# finished and is committed (model.pt, last.pt, logs, curves; the long runs chunk by chunk in
# docs/training-budget.md), except the two of issue 30 that are still running chunk by chunk:
# deq-small-nfgsm-rs-100 and resnet-peer-nfgsm-long (not started yet). Rerunning a finished recipe finds its run complete and stops, though
# it still replaces that recipe's train.out and adds a line to its command.txt. To train longer,
# raise the recipe's optim.epochs; to retrain from scratch, move its folder away first.
# Usage: bash training/train_shipped.sh [recipe ...]   (default: every shipped recipe, in order)
#   TIME_LIMIT=150 bash training/train_shipped.sh deq-small-nfgsm-rs   # one chunk: stop resumably after 150 min
#   JOBS=2 bash training/train_shipped.sh deq-small-nfgsm-rs deq-small-nfgsm   # two runs at once (one core each)
# The issue-15 recipes are set to one thread each (run.threads: 1): two of them share 2 cores
# without slowing each other, where two 2-thread runs would.
set -euo pipefail
cd "$(dirname "$0")/.."
ROBUSTDEQ="${ROBUSTDEQ:-.venv/bin/robustdeq}"
JOBS="${JOBS:-1}"
recipes=("$@")
if [ ${#recipes[@]} -eq 0 ]; then
  recipes=(
    deq-small-nfgsm-rs deq-small-nfgsm lyadeq-small-nfgsm-rs resnet-peer-nfgsm  # equal budget B (issue 15)
    deq-small-clean lyadeq-small-clean                                         # plain-trained, paper 2's protocol
    deq-small-nfgsm-rs-long                                                    # the default's own long run: 50 epochs, 9.1 CPU-h in 6 chunks
    deq-small-nfgsm-rs-100                                                     # the full-length schedule: -long continued to 100 epochs
    resnet-peer-nfgsm-long                                                     # the explicit peer on the same CPU-hours (issue 30)
    deq-tiny-trades-rs deq-tiny-trades lyadeq-tiny-trades lyadeq-tiny-clean     # the previous tiny set (fast lane)
  )
fi
# a run that continues another one starts from a copy of that run's last state (issue 30: the
# full-length schedule resumes the 50-epoch run into a 100-epoch cosine schedule)
declare -A CONTINUES=([deq-small-nfgsm-rs-100]=deq-small-nfgsm-rs-long)
limit=()
[ -z "${TIME_LIMIT:-}" ] || limit=(--time-limit "$TIME_LIMIT")
train() {
  local r=$1
  mkdir -p "training/shipped/$r"
  local from=${CONTINUES[$r]:-}
  if [ -n "$from" ] && [ ! -f "training/shipped/$r/last.pt" ]; then
    for f in last.pt log.jsonl epochs.csv; do
      [ ! -f "training/shipped/$from/$f" ] || cp "training/shipped/$from/$f" "training/shipped/$r/"
    done
    echo "# continues training/shipped/$from (its last.pt, log.jsonl and epochs.csv copied here)" >> "training/shipped/$r/command.txt"
  fi
  echo "robustdeq train --config training/configs/$r.yaml --out training/shipped/$r ${limit[*]}" >> "training/shipped/$r/command.txt"
  "$ROBUSTDEQ" train --config "training/configs/$r.yaml" --out "training/shipped/$r" "${limit[@]}" --no-progress \
    > "training/shipped/$r/train.out" 2>&1
  echo "== $r: $(tail -n 1 "training/shipped/$r/train.out")"
}
running=0
for r in "${recipes[@]}"; do
  [ -f "training/configs/$r.yaml" ] || { echo "unknown recipe $r (no training/configs/$r.yaml)" >&2; exit 2; }
  if [ "$JOBS" -gt 1 ]; then
    train "$r" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
  else
    train "$r"
  fi
done
wait
