#!/usr/bin/env bash
# Evaluate the shipped checkpoints on the same 1,000 seeded test images (the README's
# robustness figures), then compare them pairwise with exact McNemar tests.
#   bash training/evaluate_shipped.sh            # all three, resumable
#   bash training/evaluate_shipped.sh deq-tiny-trades-rs
# Full runs live in runs/eval/<recipe>; the report, plots, results and robustness card
# are copied next to each checkpoint (training/shipped/<recipe>/).
set -euo pipefail
cd "$(dirname "$0")/.."
RD=${RD:-.venv/bin/robustdeq}
# the other checkpoints get the same attacks on the undefended model as deq-tiny-trades-rs,
# so their worst cases compare (the defense is evaluated on deq-tiny-trades-rs only)
PLAIN_ATTACKS="pgd ifgsm intermediate apgd-ce apgd-t square"

evaluate() {
    local recipe=$1
    shift
    "$RD" evaluate --checkpoint "training/shipped/$recipe/model.pt" --out "runs/eval/$recipe" "$@"
    mkdir -p "training/shipped/$recipe/evaluation"
    cp runs/eval/"$recipe"/{results.json,report.md} runs/eval/"$recipe"/*.png "training/shipped/$recipe/evaluation/"
    cp "runs/eval/$recipe/robustness_card.json" "training/shipped/$recipe/"
}

recipes=("$@")
[ ${#recipes[@]} -gt 0 ] || recipes=(deq-tiny-trades-rs deq-tiny-trades lyadeq-tiny-trades)
for recipe in "${recipes[@]}"; do
    case "$recipe" in
        deq-tiny-trades-rs) evaluate "$recipe" ;;  # everything, with the defense (2,10) and its gated variant
        lyadeq-*) evaluate "$recipe" --defense none --attacks $PLAIN_ATTACKS radii ;;
        *) evaluate "$recipe" --defense none --attacks $PLAIN_ATTACKS ;;
    esac
done

out=training/shipped/comparisons.md
{
    echo "# Paired comparisons of the shipped checkpoints"
    echo
    echo "Same 1,000 seeded CIFAR-10 test images; exact McNemar tests on per-sample correctness."
    echo "Produced by \`bash training/evaluate_shipped.sh\`."
    compare_pair() {
        local a=$1 b=$2
        shift 2
        if [ -f "runs/eval/$a/results.json" ] && [ -f "runs/eval/$b/results.json" ]; then
            echo; echo "## $a vs $b"; echo
            "$RD" compare "runs/eval/$a" "runs/eval/$b" --metric "$@"
        fi
    }
    compare_pair deq-tiny-trades deq-tiny-trades-rs clean attack/pgd-ready attack/apgd-ce attack/square worst/none
    compare_pair deq-tiny-trades-rs lyadeq-tiny-trades clean attack/pgd-ready attack/apgd-ce attack/square worst/none
    if [ -f runs/eval/deq-tiny-trades-rs/results.json ]; then
        echo; echo "## deq-tiny-trades-rs: defense settings vs none"; echo
        "$RD" compare runs/eval/deq-tiny-trades-rs
    fi
} > "$out"
echo "wrote $out"
