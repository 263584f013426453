"""Command-line front ends: ``robustdeq accuracy``, ``evaluate``, ``merge-shards``, ``compare``, ``card``,
``combine-cards`` and ``attack-coverage``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..card import format_card, validate_card
from ..card import load_card as read_card  # re-exported for old imports; the card's home is card.py
from .suite import DEFAULT_FAMILIES, DEFAULT_SHARD_FAMILIES, EvalConfig

_EVALUATE_EPILOG = """\
attack families (--attacks, default: all but autoattack):
  pgd           ready-made PGD at z[N] (phantom gradient), as in training and the paper
  ifgsm         I-FGSM of paper 2 (Eq. 13-14: step 1/255, no random start)
  intermediate  paper 1 Eq. 11 grid over state i, unroll K_a, lambda (--full-grid: 1..N x 1..9 x {0.5, 1})
  apgd-ce       APGD-CE (pyautoattack) through the strongest Eq. 11 gradient
  apgd-t        APGD-T (pyautoattack, --apgd-targets target classes)
  square        Square (pyautoattack, black box, --square-queries)
  autoattack    the reference AutoAttack, version 'standard' (APGD-CE, APGD-T and FAB-T with 9
                targets, Square with 5,000 queries: RobustBench's autoattack_acc) through the
                strongest Eq. 11 gradient; hours on a CPU, so only when named
  adaptive      per defense: BPDA and full unroll (soft sign) PGD, APGD-T through each of them,
                for the gated defense an attack that keeps the gate shut, then Square through
                the whole pipeline on every survivor
  cross-model   the strongest inputs of other evaluations of the same images (--transfer-from),
                fed to this model with and without each defense; they count in the worst case
  radii         paper 2 Table 1: I-FGSM and PGD at eps 2, 4, 6, 8 /255
  analyses      Fig. 2c/3b/3c dynamics, Table 3 transfer matrix, Table 5 T_f x R grid
  checks        gradient-masking checks (eps sweep, 2x steps, 2x solver steps, input gradients)

The defense keeps paper 1's own budget (beta 2/255, eps 8/255) whatever the attack's --eps.
The run is resumable: rerun the same command after an interruption and finished jobs are
skipped; rerunning with more --attacks families adds just their jobs.
Outputs in --out: results.json, report.md, robustness_card.json, PNG plots.

Scale-out: --shard i/k evaluates shard i (0-based) of k, whole blocks of --block images each,
in its own process or machine; 'robustdeq merge-shards --out DIR SHARD_DIR...' then writes
exactly what one process would have. Shards run the per-sample families (not analyses or
checks); rerun 'evaluate' with those families on the merged folder to add them.
"""


def add_accuracy_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Clean and ready-made PGD accuracy of a checkpoint at its chosen early state and at z[N], on "
        "the CIFAR-10 test split or on the checkpoint's own validation split. Non-adaptive: the attack follows the "
        "phantom gradient of the final state. Use 'robustdeq evaluate' for adaptive attacks."
    )
    p.add_argument("--checkpoint", required=True, help="a model.pt written by 'robustdeq train'")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--n", type=int, default=None, help="images (default: the whole split)")
    p.add_argument("--pgd-steps", type=int, default=10, help="PGD steps (0 = clean only; default 10)")
    p.add_argument("--eps", default="8/255", help="l_inf radius (default 8/255)")
    p.add_argument("--step-size", default="2/255",
                   help="PGD step (default 2/255; paper 2's protocol: 1/255)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--data", default=None, help="CIFAR-10 source (default: ../shared/data archive)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--no-progress", action="store_true")


def run_accuracy(args: argparse.Namespace) -> int:
    from ..number_parsing import parse_number
    from . import checkpoint_accuracy

    result = checkpoint_accuracy(
        args.checkpoint,
        split=args.split,
        n=args.n,
        pgd_steps=args.pgd_steps,
        eps=float(parse_number(args.eps)),
        step_size=float(parse_number(args.step_size)),
        batch_size=args.batch_size,
        data=args.data,
        device=args.device,
        progress=not args.no_progress,
    )
    k = result["state"]
    pgd = f", PGD-{args.pgd_steps} {100 * result['pgd_acc']:.2f}%" if result["pgd_acc"] is not None else ""
    where = f"{result['model']} at z[{k}] on {result['n']} {result['split']} images"
    final = ""
    if k != result["n_states"]:  # the final state too, where it is not the readout
        pgd_final = result["pgd_acc_final"]
        final = f" (z[{result['n_states']}]: clean {100 * result['clean_acc_final']:.2f}%"
        final += (f", PGD-{args.pgd_steps} {100 * pgd_final:.2f}%" if pgd_final is not None else "") + ")"
    print(f"{where}: clean {100 * result['clean_acc']:.2f}%{pgd}{final}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Evaluate a checkpoint under ready-made, intermediate-state (paper 1 Eq. 11), AutoAttack "
        "(APGD-CE, APGD-T, Square) and adaptive attacks on the entropy-reduction defense; report per-sample worst "
        "cases with Wilson intervals, the paper's analyses, and write a robustness card."
    )
    p.epilog = _EVALUATE_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--checkpoint", required=True, help="a model.pt written by 'robustdeq train'")
    p.add_argument("--out", required=True, help="output folder (resumes if it holds the same evaluation)")
    p.add_argument("--n", type=int, default=1000, help="test images, a fixed seeded subset (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="subset and attack seed (default 0)")
    p.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="draw the images from the test set (default) or from the checkpoint's validation split "
        "(for choosing between recipes or checkpoints without touching the test set)",
    )
    p.add_argument("--eps", default="8/255", help="l_inf radius (default 8/255)")
    p.add_argument("--steps", type=int, default=10, help="PGD steps of the white-box attacks (default 10)")
    p.add_argument(
        "--attacks",
        nargs="+",
        default=None,
        metavar="FAMILY",
        help="attack families to run (default: all but autoattack; with --shard, also not analyses and checks)",
    )
    p.add_argument("--defense", action="append", default=None, metavar="T_f,R[,gated]",
                   help="defense setting (repeatable; default 2,10 and 2,10,gated; 'none': no defense)")  # fmt: skip
    p.add_argument("--full-grid", action="store_true", help="paper 1's full Eq. 11 grid: 1..N x K_a 1..9 x 2")
    p.add_argument("--states", type=int, nargs="+", default=None, help="Eq. 11 states i (default 1, ~3N/8, k, N)")
    p.add_argument("--unrolls", type=int, nargs="+", default=[2, 5], help="Eq. 11 K_a values (default 2 5)")
    p.add_argument("--gate-quantile", type=float, default=0.95,
                   help="gate threshold: this quantile of clean validation entropy (default 0.95)")  # fmt: skip
    p.add_argument("--apgd-iters", type=int, default=100)
    p.add_argument("--apgd-targets", type=int, default=3, help="APGD-T target classes (AutoAttack: 9)")
    p.add_argument("--square-queries", type=int, default=1000, help="Square queries on the undefended model")
    p.add_argument("--defended-square-queries", type=int, default=1000,
                   help="Square queries through a defense, on every survivor (default 1000)")  # fmt: skip
    p.add_argument("--defended-square-n", type=int, default=None,
                   help="attack at most this many survivors with Square through a defense (default: all)")  # fmt: skip
    p.add_argument("--defended-apgd-iters", type=int, default=20,
                   help="APGD-T through BPDA and through the unroll: iterations per target (default 20)")  # fmt: skip
    p.add_argument("--defended-apgd-targets", type=int, default=9, help="... and target classes (default 9)")
    p.add_argument("--select-n", type=int, default=200,
                   help="validation images on which the Eq. 11 grid chooses the surrogate (default 200)")  # fmt: skip
    p.add_argument("--adaptive-steps", type=int, default=10, help="PGD steps of BPDA / unroll / gate-aware")
    p.add_argument("--check-n", type=int, default=200, help="images for the gradient-masking checks")
    p.add_argument("--transfer-from", action="append", default=[], metavar="LABEL=FOLDER",
                   help="a finished evaluation of another model on the same images whose strongest inputs are "
                   "transferred to this one (repeatable; family cross-model)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument(
        "--block",
        type=int,
        default=1000,
        help="batches never cross a block of this many images; shards are whole blocks (default 1000)",
    )
    p.add_argument(
        "--shard",
        default=None,
        metavar="i/k",
        help="evaluate only shard i (0-based) of k; merge the folders with 'robustdeq merge-shards'",
    )
    p.add_argument("--data", default=None, help="CIFAR-10 source (default: ../shared/data archive)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--restart", action="store_true", help="discard a previous evaluation in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (each finished job still logs a line)")


def run_evaluate(args: argparse.Namespace) -> int:
    import torch

    from ..allocator import tune_cpu_allocator
    from ..number_parsing import parse_number
    from .report import write_outputs
    from .shards import Shard
    from .suite import Evaluator

    if args.threads:
        torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    eps = float(parse_number(args.eps))
    families = args.attacks or (DEFAULT_SHARD_FAMILIES if args.shard else DEFAULT_FAMILIES)
    config = EvalConfig(
        n=args.n,
        seed=args.seed,
        split=args.split,
        eps=eps,
        step_size=eps / 4,
        steps=args.steps,
        batch_size=args.batch_size,
        families=tuple(families),
        full_grid=args.full_grid,
        states=tuple(args.states) if args.states else None,
        unrolls=tuple(args.unrolls),
        defenses=tuple(args.defense) if args.defense else ("2,10", "2,10,gated"),
        gate_quantile=args.gate_quantile,
        apgd_iters=args.apgd_iters,
        apgd_targets=args.apgd_targets,
        square_queries=args.square_queries,
        defended_square_queries=args.defended_square_queries,
        defended_square_n=args.defended_square_n,
        defended_apgd_iters=args.defended_apgd_iters,
        defended_apgd_targets=args.defended_apgd_targets,
        select_n=args.select_n,
        adaptive_steps=args.adaptive_steps,
        check_n=args.check_n,
        block=args.block,
        transfer_from=tuple(args.transfer_from),
    )
    shard = Shard.parse(args.shard) if args.shard else None
    ev = Evaluator(args.checkpoint, args.out, config, device=args.device, data=args.data,
                   progress=not args.no_progress, restart=args.restart, shard=shard)  # fmt: skip
    results = ev.run()
    if shard is not None:
        print(f"shard {shard.index}/{shard.count}: images {ev.offset}..{ev.offset + ev.n - 1} done in {args.out}; "
              "merge all shards with 'robustdeq merge-shards'")  # fmt: skip
        return 0
    _print_summary(results, write_outputs(results, Path(args.out)))
    return 0


def _print_summary(results: dict, paths: dict) -> None:
    for s in results["settings"]:
        clean = s["clean"]["acc"] if s["clean"] else float("nan")
        print(f"{s['name']:<22} clean {100 * clean:5.1f}%   worst case {100 * s['worst_case']['acc']:5.1f}%"
              + (f"   (non-adaptive {100 * s['non_adaptive']['acc']:.1f}%)" if s["non_adaptive"] else ""))  # fmt: skip
    print(f"wrote {', '.join(str(p) for p in paths.values())}")


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Merge complete shard folders of one evaluation (same checkpoint, subset and settings, shards "
        "0..k-1) into --out and write its results, report and robustness card. The merge equals a single-process "
        "run image for image; --out is an ordinary evaluation folder afterwards."
    )
    p.add_argument("shards", nargs="+", help="the shard folders (any order)")
    p.add_argument("--out", required=True, help="folder for the merged evaluation")
    p.add_argument("--checkpoint", default=None, help="the checkpoint, if it moved since the shards ran")
    p.add_argument("--data", default=None, help="CIFAR-10 source, if the shards used another")
    p.add_argument("--device", default=None)


def run_merge(args: argparse.Namespace) -> int:
    from .report import write_outputs
    from .shards import ShardMergeError, merge_shards
    from .suite import Evaluator

    try:
        out = merge_shards(args.shards, args.out)
    except (ShardMergeError, FileNotFoundError) as exc:
        print(f"merge-shards: {exc}", file=sys.stderr)
        return 2
    state = json.loads((out / "state.json").read_text())
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in state["identity"]["config"].items()}
    ev = Evaluator(args.checkpoint or state["checkpoint"], str(out), EvalConfig(**config), device=args.device,
                   data=args.data or state.get("data"), progress=False)  # fmt: skip
    _print_summary(ev.run(), write_outputs(ev.results(), out))
    return 0


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Compare the per-sample results of two 'robustdeq evaluate' runs on the same test subset with "
        "exact McNemar tests; with one file, compare each defense setting with the undefended model."
    )
    p.add_argument("results", nargs="+", help="one or two results.json files (or evaluation folders)")
    p.add_argument("--metric", nargs="+", default=None, help="metrics to compare (default: all shared)")


def run_compare(args: argparse.Namespace) -> int:
    from .compare import chain_notes, compare_results, compare_within, evaluation_name, format_comparison, load_results

    if len(args.results) > 2:
        print("compare takes one or two results files", file=sys.stderr)
        return 2
    a = load_results(args.results[0])
    if len(args.results) == 1:
        print(format_comparison(compare_within(a), "baseline", "setting"))
        for note in chain_notes(a):
            print(f"\n{note}")
        return 0
    b = load_results(args.results[1])
    print(format_comparison(compare_results(a, b, args.metric), evaluation_name(a), evaluation_name(b)))
    return 0


def add_card_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Print the robustness card that 'robustdeq evaluate' wrote and that an archive ships: for each "
        "test-time setting its clean and robust accuracy (95%% Wilson interval), whether the robust figure comes "
        "from adaptive attacks or from attacks transferred from the undefended model, and its cost relative to "
        "plain inference, sorted by cost. Use it to choose T_f and R."
    )
    p.add_argument(
        "card",
        help="robustness_card.json, a folder holding one (a checkpoint's or an evaluation's), a checkpoint file "
        "(the card beside it) or a .mar archive",
    )
    p.add_argument("--json", action="store_true", help="print the card itself")


def add_combine_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "The adaptive attacks on the defense cost minutes per image on a CPU, so the defense is often "
        "evaluated on fewer images: run 'robustdeq evaluate --n 1000 --defense none' and 'robustdeq evaluate --n "
        "200' (same --seed and --split: the 200 are the first 200 of the 1000), then combine them. The card keeps "
        "the undefended row at n = 1000 and the defense rows at n = 200, each with its own interval; the command "
        "checks that the smaller run's images are the larger run's first."
    )
    p.add_argument("main", help="the undefended evaluation (folder or results.json)")
    p.add_argument("defended", help="the evaluation with the defense settings, on the first images")
    p.add_argument("--out", required=True, help="where to write the combined robustness_card.json")


def run_combine(args: argparse.Namespace) -> int:
    from .combined_card import combine_cards, load_evaluation

    card = combine_cards(load_evaluation(args.main), load_evaluation(args.defended))
    validate_card(card)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(card, indent=1) + "\n")
    print(format_card(card))
    print(f"wrote {out}")
    return 0


def run_card(args: argparse.Namespace) -> int:
    card = read_card(Path(args.card))
    print(json.dumps(card, indent=1) if args.json else format_card(card))
    return 0


def add_coverage_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Read a finished evaluation and report, for every attack on the undefended model, the "
        "clean-correct images it breaks, those that only it breaks, and a greedy cover with the accuracy and "
        "attack time so far: the attacks that a larger run (for example the full test set) needs to reproduce "
        "this worst case, and what leaving the others out would have cost on these images."
    )
    p.add_argument("evaluation", help="an evaluation folder ('robustdeq evaluate --out') or its results.json")


def run_coverage(args: argparse.Namespace) -> int:
    from .combined_card import load_evaluation
    from .coverage import attack_coverage, format_coverage

    print(format_coverage(attack_coverage(load_evaluation(args.evaluation))), end="")
    return 0
