#!/usr/bin/env bash
# Evaluate the shipped checkpoints on the same 1,000 seeded test images (the README's and
# docs/results.md's robustness figures), add the cross-model transfers, compare the paired
# models with exact McNemar tests, and regenerate docs/results.md.
#   bash training/evaluate_shipped.sh                      # every trained recipe, resumable
#   bash training/evaluate_shipped.sh deq-small-nfgsm-rs   # one recipe (its transfers too, where the sources exist)
#   OMP_NUM_THREADS=1 DEFENDED_N=0 bash training/evaluate_shipped.sh   # one core, beside a training run; no defended run
#   SHARDS=2 bash training/evaluate_shipped.sh deq-small-nfgsm-rs-long   # a new evaluation as 2 shards at once, one core each
#   AUTOATTACK=0 bash training/evaluate_shipped.sh deq-small-nfgsm-rs-100  # everything but the reference AutoAttack (hours)
# Full runs live in runs/eval/<recipe>; the report, plots, results and robustness card are
# copied next to each checkpoint (training/shipped/<recipe>/). A recipe without a model.pt
# (not trained yet) is skipped with a note.
set -euo pipefail
cd "$(dirname "$0")/.."
RD=${RD:-.venv/bin/robustdeq}
# shellcheck source=training/shards.sh
source training/shards.sh
PY=${PY:-.venv/bin/python}
# every model gets the same attacks on the undefended model, so that their worst cases compare;
# the defense (2,10 and its gated variant) is evaluated adaptively on the defaults
PLAIN_ATTACKS="pgd ifgsm intermediate apgd-ce apgd-t square"

# The default's defense is evaluated with the full adaptive chain on the first DEFENDED_N of the
# 1,000 images (about 3 core-minutes per surviving image on deq-small; docs/evaluation.md,
# "The defense on fewer images"), and its card combines both runs. DEFENDED_N=0 leaves the
# defended run out (for example while the undefended evaluations are queued one core at a time).
DEFENDED_N=${DEFENDED_N:-200}
# blocks of 100 (2 shards can split 200 images) and batches of 100, as in the long default's main
# run: every batch is seeded by its first image's position, so the defended run's undefended
# results repeat the main run's first images (docs/evaluation.md, "The defense on fewer images")
DEFENDED_BATCHES="--block 100 --batch-size 100"

# SHARDS=k runs an evaluation that has not started yet as k processes of one thread each, merges
# them (robustdeq merge-shards: image for image what one process computes) and finishes the
# whole-subset families (analyses, checks) in one process. A recipe evaluated this way has a
# fixed --block in its flags, so that every later pass (transfers, resuming) matches it.
SHARDS=${SHARDS:-1}

# AUTOATTACK=0 leaves out the reference AutoAttack pass of the long-budget pair (below; several
# core-hours each), for example to compare a new run with the suite's figures first
AUTOATTACK=${AUTOATTACK:-1}

# the flags of each recipe's evaluation (the transfer pass must repeat them to resume it)
flags() {
    case "$1" in
        # everything, with the defense. The committed evaluation (2026-11-21) ran the first adaptive
        # chain (no APGD-T through the defense, Square with 100 queries on 100 survivors); a fresh
        # run gets today's chain on all 1,000 images, several core-hours (docs/evaluation.md)
        deq-tiny-trades-rs) echo "" ;;
        deq-small-nfgsm-rs) echo "--defense none" ;;  # everything; the defense: below
        # the same, in blocks that 2 shards can split and batches that its defended run repeats
        deq-small-nfgsm-rs-long | deq-small-nfgsm-rs-100) echo "--defense none --block 500 --batch-size 100" ;;
        # the long peer: the peers' attacks, in blocks that 2 shards can split
        resnet-peer-nfgsm-long) echo "--defense none --attacks $PLAIN_ATTACKS checks --block 500 --batch-size 100" ;;
        lyadeq-* | *-clean) echo "--defense none --attacks $PLAIN_ATTACKS radii checks" ;;
        *) echo "--defense none --attacks $PLAIN_ATTACKS checks" ;;
    esac
}

# run_eval OUT ARGS...: 'robustdeq evaluate ARGS --out OUT', as $SHARDS shards when OUT has not started
run_eval() {
    local out=$1 shard_args=()
    shift
    if [ "$SHARDS" -gt 1 ] && [ ! -f "$out/state.json" ]; then
        for a in "$@"; do  # the whole-subset families run after the merge
            [ "$a" = checks ] || [ "$a" = analyses ] || shard_args+=("$a")
        done
        run_shards "$out" "$out-shard" "$SHARDS" "$SHARDS" "${shard_args[@]}"
    fi
    # progress bars on a terminal; in a log, the evaluator's line per finished job
    if [ -t 2 ]; then "$RD" evaluate "$@" --out "$out"; else "$RD" evaluate "$@" --no-progress --out "$out"; fi
}

evaluate() {
    local recipe=$1
    shift
    if [ ! -f "training/shipped/$recipe/model.pt" ]; then
        echo "skip $recipe: not trained yet (bash training/train_shipped.sh $recipe)"
        return 0
    fi
    # shellcheck disable=SC2046
    run_eval "runs/eval/$recipe" --checkpoint "training/shipped/$recipe/model.pt" $(flags "$recipe") "$@"
    mkdir -p "training/shipped/$recipe/evaluation"
    cp runs/eval/"$recipe"/{results.json,report.md} runs/eval/"$recipe"/*.png "training/shipped/$recipe/evaluation/"
    cp "runs/eval/$recipe/robustness_card.json" "training/shipped/$recipe/"
}

# transfer_args SOURCE...: '--transfer-from S=runs/eval/S' for each source that has been evaluated, one word a line
transfer_args() {
    local s
    for s in "$@"; do
        if [ -f "runs/eval/$s/results.json" ]; then printf '%s\n' --transfer-from "$s=runs/eval/$s"; fi
    done
}

# cross-model transfer (docs/evaluation.md): TARGET SOURCE...; sources that were not evaluated are left out
transfer() {
    local target=$1 sources=()
    shift
    [ -f "runs/eval/$target/results.json" ] || return 0
    mapfile -t sources < <(transfer_args "$@")
    [ ${#sources[@]} -gt 0 ] || return 0
    # the same flags as the first pass (so it resumes), then only the new family
    evaluate "$target" --attacks cross-model "${sources[@]}"
}

recipes=("$@")
[ ${#recipes[@]} -gt 0 ] || recipes=(
    deq-small-nfgsm-rs-100 resnet-peer-nfgsm-long  # the full-length schedule and its peer at equal CPU-hours
    deq-small-nfgsm-rs-long  # the default (its full test set: training/evaluate_full_test.sh)
    deq-small-nfgsm-rs deq-small-nfgsm lyadeq-small-nfgsm-rs resnet-peer-nfgsm deq-small-clean lyadeq-small-clean
    deq-tiny-trades-rs deq-tiny-trades lyadeq-tiny-trades
)
for recipe in "${recipes[@]}"; do
    evaluate "$recipe"
done
# asked RECIPE: this run covers RECIPE (named on the command line, or every recipe by default)
asked() { [[ " ${recipes[*]} " == *" $1 "* ]]; }
# the reference AutoAttack (version 'standard', RobustBench's autoattack_acc) on the long-budget
# pair, as one more family of the same run: it joins their per-sample worst case. Several
# core-hours each on 2 cores (APGD-T and FAB-T with 9 targets, Square with 5,000 queries)
for recipe in deq-small-nfgsm-rs-100 resnet-peer-nfgsm-long; do
    if [ "$AUTOATTACK" != 0 ] && asked "$recipe" && [ -f "runs/eval/$recipe/results.json" ]; then
        evaluate "$recipe" --attacks autoattack
    fi
done
# paper 2's PGD at 8/255 (PGD-10, step 1/255, random start) counted on the final iterate, as paper 2
# counts, for the plain pair its Table 1 compares (docs/results.md); about 2 core-minutes each
for recipe in lyadeq-small-clean deq-small-clean; do
    final="training/shipped/$recipe/evaluation/final-iterate-pgd.json"
    if asked "$recipe" && [ -f "training/shipped/$recipe/model.pt" ] && [ ! -f "$final" ]; then
        "$RD" accuracy --checkpoint "training/shipped/$recipe/model.pt" --n 1000 --step-size 1/255 --no-progress \
            --out "$final"
    fi
done
# the transfers of issue 16: the peer and the Sec. 3.3 baseline onto the default, and back;
# the plain DEQ and the plain LyaDEQ onto each other (paper 2's claim)
transfer deq-small-nfgsm-rs resnet-peer-nfgsm deq-small-nfgsm lyadeq-small-nfgsm-rs
transfer resnet-peer-nfgsm deq-small-nfgsm-rs deq-small-nfgsm-rs-long
transfer deq-small-nfgsm deq-small-nfgsm-rs deq-small-nfgsm-rs-long
transfer deq-small-nfgsm-rs-long resnet-peer-nfgsm deq-small-nfgsm
transfer lyadeq-small-clean deq-small-clean
transfer deq-small-clean lyadeq-small-clean
# the LyaDEQ and the DEQ of budget B onto each other (LyaDEQ vs DEQ)
transfer lyadeq-small-nfgsm-rs deq-small-nfgsm-rs
# the long-budget pair onto each other
transfer deq-small-nfgsm-rs-100 resnet-peer-nfgsm-long
transfer resnet-peer-nfgsm-long deq-small-nfgsm-rs-100

# the default's defense on the first DEFENDED_N images, with the same transfers, and its combined card:
# the newest long run that has an evaluation in runs/eval/ (100 epochs, then 50: committed in
# training/shipped/deq-small-nfgsm-rs-long/evaluation-defended/), the budget-B run before them
defended=deq-small-nfgsm-rs-100
[ -f "runs/eval/$defended/results.json" ] || defended=deq-small-nfgsm-rs-long
[ -f "runs/eval/$defended/results.json" ] || defended=deq-small-nfgsm-rs
if [ "$DEFENDED_N" -gt 0 ] && [ -f "runs/eval/$defended/results.json" ]; then
    mapfile -t sources < <(transfer_args resnet-peer-nfgsm-long resnet-peer-nfgsm deq-small-nfgsm)
    run_eval "runs/eval/$defended-defended" --checkpoint "training/shipped/$defended/model.pt" \
        --n "$DEFENDED_N" $DEFENDED_BATCHES "${sources[@]}"
    mkdir -p "training/shipped/$defended/evaluation-defended"
    cp runs/eval/"$defended-defended"/{results.json,report.md} runs/eval/"$defended-defended"/*.png \
        "training/shipped/$defended/evaluation-defended/"
    "$RD" combine-cards "runs/eval/$defended" "runs/eval/$defended-defended" \
        --out "training/shipped/$defended/robustness_card.json"
fi

# evaluated NAME: the folder that holds NAME's evaluation (results.json with the per-sample record):
# this machine's job store runs/eval/NAME, else the copy committed next to the checkpoint, so that
# evaluating one recipe on a fresh checkout keeps every other pair in comparisons.md
evaluated() {
    local committed=training/shipped/$1/evaluation
    case "$1" in *-defended) committed=training/shipped/${1%-defended}/evaluation-defended ;; esac
    if [ -f "runs/eval/$1/results.json" ]; then echo "runs/eval/$1"
    elif [ -f "$committed/results.json" ]; then echo "$committed"
    fi
}

out=training/shipped/comparisons.md
{
    echo "# Paired comparisons of the shipped checkpoints"
    echo
    echo "Same 1,000 seeded CIFAR-10 test images; exact McNemar tests on per-sample correctness."
    echo "Produced by \`bash training/evaluate_shipped.sh\`; docs/results.md sets them next to the papers."
    compare_pair() {
        local title=$1 a=$2 b=$3 dir_a dir_b
        shift 3
        dir_a=$(evaluated "$a") dir_b=$(evaluated "$b")
        if [ -n "$dir_a" ] && [ -n "$dir_b" ]; then
            echo; echo "## $title: $a vs $b"; echo
            "$RD" compare "$dir_a" "$dir_b" --metric "$@"
        fi
    }
    METRICS="clean attack/pgd-ready attack/apgd-ce attack/square worst/none"
    # shellcheck disable=SC2086
    {
        compare_pair "Sec. 3.3 vs its baseline" deq-small-nfgsm deq-small-nfgsm-rs $METRICS
        compare_pair "the default's long run vs its budget-B run" deq-small-nfgsm-rs deq-small-nfgsm-rs-long $METRICS
        compare_pair "100 epochs vs 50" deq-small-nfgsm-rs-long deq-small-nfgsm-rs-100 $METRICS
        compare_pair "DEQ vs the explicit peer at equal long budget" resnet-peer-nfgsm-long deq-small-nfgsm-rs-100 $METRICS
        compare_pair "LyaDEQ vs DEQ" deq-small-nfgsm-rs lyadeq-small-nfgsm-rs $METRICS
        compare_pair "DEQ vs the explicit peer" resnet-peer-nfgsm deq-small-nfgsm-rs $METRICS
        compare_pair "plain LyaDEQ vs plain DEQ" deq-small-clean lyadeq-small-clean $METRICS
        compare_pair "Sec. 3.3 vs its baseline, previous tiny models" deq-tiny-trades deq-tiny-trades-rs $METRICS
        compare_pair "LyaDEQ vs DEQ, previous tiny models" deq-tiny-trades-rs lyadeq-tiny-trades $METRICS
    }
    for d in deq-small-nfgsm-rs-100-defended deq-small-nfgsm-rs-long-defended deq-small-nfgsm-rs-defended deq-tiny-trades-rs; do
        dir=$(evaluated "$d")
        if [ -n "$dir" ]; then
            echo; echo "## $d: defense settings vs none"; echo
            "$RD" compare "$dir"
        fi
    done
} > "$out"
echo "wrote $out"
"$PY" -m robustdeq.evaluation.results_page
