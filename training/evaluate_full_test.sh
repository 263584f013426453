#!/usr/bin/env bash
# The default DEQ's undefended worst case on the full CIFAR-10 test set (10,000 images, a
# +-1-point interval instead of the 1,000-image evaluation's +-3), sharded over processes
# and merged (docs/evaluation.md, "Sharding a large evaluation").
#   bash training/evaluate_full_test.sh                 # 2 shards at once, one thread each
#   SHARDS=10 JOBS=2 bash training/evaluate_full_test.sh  # 10 shards, 2 at a time (resumable per shard)
#   RECIPE=deq-small-nfgsm bash training/evaluate_full_test.sh
#   ATTACKS="apgd-t square" bash training/evaluate_full_test.sh   # only the attacks that set the worst case
# The shards can also run on other machines: copy runs/eval-full/<recipe>/shard-<i>/ back and rerun.
#   BASE=training/shipped/<recipe>/evaluation-full/shards bash training/evaluate_full_test.sh
#     keeps the shards beside the result, so that finished shards can be committed and a later checkout resumes
# Result: training/shipped/<recipe>/evaluation-full/ (results.json, report.md, robustness_card.json, the
# coverage plot and logs/ of every shard).
set -euo pipefail
cd "$(dirname "$0")/.."
RD=${RD:-.venv/bin/robustdeq}
# shellcheck source=training/shards.sh
source training/shards.sh
# the default: the newest long run that has finished (100 epochs, then 50, then budget B)
default=deq-small-nfgsm-rs-100
[ -f "training/shipped/$default/model.pt" ] || default=deq-small-nfgsm-rs-long
[ -f "training/shipped/$default/model.pt" ] || default=deq-small-nfgsm-rs
RECIPE=${RECIPE:-$default}
SHARDS=${SHARDS:-2}
JOBS=${JOBS:-2}
N=${N:-10000}
# every attack family by default; 'robustdeq attack-coverage runs/eval/<recipe>' shows which of them
# set the 1,000-image worst case, for example ATTACKS="apgd-t apgd-ce" to run only those
ATTACKS=${ATTACKS:-"pgd ifgsm intermediate apgd-ce apgd-t square"}
ckpt="training/shipped/$RECIPE/model.pt"
[ -f "$ckpt" ] || { echo "no $ckpt: train it first (bash training/train_shipped.sh $RECIPE)" >&2; exit 2; }
base=${BASE:-runs/eval-full/$RECIPE}
mkdir -p "$base"
# shellcheck disable=SC2086
run_shards "$base/merged" "$base/shard" "$SHARDS" "$JOBS" --checkpoint "$ckpt" --n "$N" --defense none --attacks $ATTACKS
dest="training/shipped/$RECIPE/evaluation-full"
mkdir -p "$dest/logs"
cp "$base"/merged/{results.json,report.md,robustness_card.json} "$base"/merged/*.png "$dest/"
cp "$base"/shard-*.log "$dest/logs/"  # each shard's job lines and times; the merged result needs no shard folder
echo "wrote $dest/"
