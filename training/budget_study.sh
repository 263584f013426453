#!/usr/bin/env bash
# The training-budget study (docs/training-budget.md): short pilots at about equal cost (~20-25 min
# each on 2 cores; epochs set from each recipe's measured samples/s), one at a time, each with a
# complete learning-rate schedule.
# Usage: bash training/budget_study.sh PILOT [PILOT ...]   (no argument: list the pilots)
# Each pilot trains into training/budget/<pilot>/ and is then ranked on 500 validation images
# by the worst of PGD-10 and APGD-CE at its readout state (robustdeq evaluate --split val).
# The table and the plot: python -m robustdeq.training.budget training/budget --out docs
set -euo pipefail
cd "$(dirname "$0")/.."
ROBUSTDEQ="${ROBUSTDEQ:-.venv/bin/robustdeq}"
C=training/configs
# shared by every pilot: 12k-sample epochs (a validation point every 12k samples), 150 clean pretraining steps
COMMON=(--set data.epoch_size=12000 --set pretrain.steps=150 --set validation.selection_n=500 --set run.threads=2)
declare -A PILOTS=(
  # today's recipe: TRADES + Sec. 3.3, PGD-10 inner attack, Adam + cosine
  [p1-tiny-trades-rs-pgd10]="$C/deq-tiny-trades-rs.yaml --set optim.epochs=5"
  # the same with PGD-2 (step 4/255)
  [p2-tiny-trades-rs-pgd2]="$C/deq-tiny-trades-rs.yaml --set optim.epochs=11 --set attack.steps=2 --set attack.step_size=4/255"
  # PGD-AT + Sec. 3.3 with N-FGSM (one step of eps from +-2 eps noise, no projection)
  [p3-tiny-pgdat-rs-nfgsm]="$C/deq-tiny-pgd-rs.yaml --set optim.epochs=12 --set attack.kind=nfgsm --set attack.step_size=8/255 --set attack.noise=2"
  # TRADES + Sec. 3.3 with N-FGSM as the inner maximisation of the KL term
  [p4-tiny-trades-rs-nfgsm]="$C/deq-tiny-trades-rs.yaml --set optim.epochs=24 --set attack.kind=nfgsm --set attack.step_size=8/255 --set attack.noise=2"
  # P3 with SGD (Nesterov) + one-cycle learning rate + weight EMA, same epochs
  [p5-tiny-pgdat-rs-nfgsm-sgd]="$C/deq-tiny-pgd-rs.yaml --set optim.epochs=12 --set attack.kind=nfgsm --set attack.step_size=8/255 --set attack.noise=2 --set optim.name=sgd --set optim.lr=0.05 --set optim.weight_decay=5e-4 --set optim.schedule=onecycle --set optim.ema_decay=0.999"
  # P3 at P2's cost (twice the epochs)
  [p3b-tiny-pgdat-rs-nfgsm-24ep]="$C/deq-tiny-pgd-rs.yaml --set optim.epochs=24 --set attack.kind=nfgsm --set attack.step_size=8/255 --set attack.noise=2"
  # the larger preset (0.23M parameters) with P3b's recipe at about P3b's CPU time (it trains ~1.9x slower)
  [p6-small-pgdat-rs-nfgsm]="$C/deq-tiny-pgd-rs.yaml --set model.name=deq-small --set optim.epochs=13 --set attack.kind=nfgsm --set attack.step_size=8/255 --set attack.noise=2"
  # issue 30, a faster trainer at equal epochs: P6 with the two levers that python -m robustdeq.training.speed
  # measured fastest: the training attack differentiates f(z[n]) alone (phantom unroll K = 0 inside the attack;
  # the loss keeps K = 5) and the Jacobian term probes a random quarter of the batch
  [p7-small-fast-unroll0-jacq]="$C/deq-tiny-pgd-rs.yaml --set model.name=deq-small --set optim.epochs=13 --set attack.kind=nfgsm --set attack.step_size=8/255 --set attack.noise=2 --set objective.attack_unroll=0 --set objective.jacobian_fraction=0.25"
  # the milder variant: attack unroll K = 2
  [p8-small-fast-unroll2-jacq]="$C/deq-tiny-pgd-rs.yaml --set model.name=deq-small --set optim.epochs=13 --set attack.kind=nfgsm --set attack.step_size=8/255 --set attack.noise=2 --set objective.attack_unroll=2 --set objective.jacobian_fraction=0.25"
)
if [ $# -eq 0 ]; then
  for p in "${!PILOTS[@]}"; do echo "$p: ${PILOTS[$p]}"; done | sort
  exit 0
fi
for p in "$@"; do
  [ -n "${PILOTS[$p]+x}" ] || { echo "unknown pilot $p; run without arguments for the list" >&2; exit 2; }
  mkdir -p "training/budget/$p"
  echo "robustdeq train --config ${PILOTS[$p]} ${COMMON[*]} --out training/budget/$p" > "training/budget/$p/command.txt"
  # shellcheck disable=SC2086
  "$ROBUSTDEQ" train --config ${PILOTS[$p]} "${COMMON[@]}" --out "training/budget/$p" --no-progress
  "$ROBUSTDEQ" evaluate --checkpoint "training/budget/$p/model.pt" --split val --n 500 --attacks pgd apgd-ce \
    --defense none --out "training/budget/$p/val-eval" --no-progress
done
