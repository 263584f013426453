"""Command-line front ends: ``robustdeq evaluate``, ``robustdeq compare`` and ``robustdeq card``."""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

from .suite import FAMILIES, EvalConfig

_EVALUATE_EPILOG = """\
attack families (--attacks, default: all):
  pgd           ready-made PGD at z[N] (phantom gradient), as in training and the paper
  ifgsm         I-FGSM of paper 2 (Eq. 13-14: step 1/255, no random start)
  intermediate  paper 1 Eq. 11 grid over state i, unroll K_a, lambda (--full-grid: 1..N x 1..9 x {0.5, 1})
  apgd-ce       APGD-CE (pyautoattack) through the strongest Eq. 11 gradient
  apgd-t        APGD-T (pyautoattack, --apgd-targets target classes)
  square        Square (pyautoattack, black box, --square-queries)
  adaptive      per defense: BPDA, full unroll with soft sign, Square through the pipeline,
                and for the gated defense an attack that keeps the gate shut
  radii         paper 2 Table 1: I-FGSM and PGD at eps 2, 4, 6, 8 /255
  analyses      Fig. 2c/3b/3c dynamics, Table 3 transfer matrix, Table 5 T_f x R grid
  checks        gradient-masking checks (eps sweep, 2x steps, 2x solver steps, input gradients)

The defense keeps paper 1's own budget (beta 2/255, eps 8/255) whatever the attack's --eps.
The run is resumable: rerun the same command after an interruption and finished jobs are
skipped; rerunning with more --attacks families adds just their jobs.
Outputs in --out: results.json, report.md, robustness_card.json, PNG plots.
"""


def add_evaluate_parser(sub, func) -> None:
    p = sub.add_parser(
        "evaluate",
        help="honest robustness evaluation: intermediate-state, AutoAttack and adaptive attacks",
        description="Evaluate a checkpoint under ready-made, intermediate-state (paper 1 Eq. 11), AutoAttack "
        "(APGD-CE, APGD-T, Square) and adaptive attacks on the entropy-reduction defense; report per-sample worst "
        "cases with Wilson intervals, the paper's analyses, and write a robustness card.",
        epilog=_EVALUATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    p.add_argument("--attacks", nargs="+", default=list(FAMILIES), metavar="FAMILY",
                   help="attack families to run (default: all; see below)")  # fmt: skip
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
    p.add_argument("--defended-square-queries", type=int, default=100)
    p.add_argument("--defended-square-n", type=int, default=100, help="survivors Square attacks through a defense")
    p.add_argument("--adaptive-steps", type=int, default=10, help="PGD steps of BPDA / unroll / gate-aware")
    p.add_argument("--check-n", type=int, default=200, help="images for the gradient-masking checks")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--data", default=None, help="CIFAR-10 source (default: ../shared/data archive)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--restart", action="store_true", help="discard a previous evaluation in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=func)


def run_evaluate(args: argparse.Namespace) -> int:
    import torch

    from ..runtime import tune_cpu_allocator
    from ..training.config import parse_number
    from .report import write_outputs
    from .suite import Evaluator

    if args.threads:
        torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    eps = float(parse_number(args.eps))
    config = EvalConfig(
        n=args.n,
        seed=args.seed,
        split=args.split,
        eps=eps,
        step_size=eps / 4,
        steps=args.steps,
        batch_size=args.batch_size,
        families=tuple(args.attacks),
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
        adaptive_steps=args.adaptive_steps,
        check_n=args.check_n,
    )
    ev = Evaluator(args.checkpoint, args.out, config, device=args.device, data=args.data,
                   progress=not args.no_progress, restart=args.restart)  # fmt: skip
    results = ev.run()
    paths = write_outputs(results, Path(args.out))
    for s in results["settings"]:
        clean = s["clean"]["acc"] if s["clean"] else float("nan")
        print(f"{s['name']:<22} clean {100 * clean:5.1f}%   worst case {100 * s['worst_case']['acc']:5.1f}%"
              + (f"   (non-adaptive {100 * s['non_adaptive']['acc']:.1f}%)" if s["non_adaptive"] else ""))  # fmt: skip
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def add_compare_parser(sub, func) -> None:
    p = sub.add_parser(
        "compare",
        help="paired McNemar tests between two evaluations (or the settings of one)",
        description="Compare the per-sample results of two 'robustdeq evaluate' runs on the same test subset with "
        "exact McNemar tests; with one file, compare each defense setting with the undefended model.",
    )
    p.add_argument("results", nargs="+", help="one or two results.json files (or evaluation folders)")
    p.add_argument("--metric", nargs="+", default=None, help="metrics to compare (default: all shared)")
    p.set_defaults(func=func)


def run_compare(args: argparse.Namespace) -> int:
    from .compare import compare_results, compare_within, format_comparison, load_results

    if len(args.results) > 2:
        print("compare takes one or two results files", file=sys.stderr)
        return 2
    a = load_results(args.results[0])
    if len(args.results) == 1:
        print(format_comparison(compare_within(a), "baseline", "setting"))
        return 0
    b = load_results(args.results[1])
    name_a, name_b = Path(a["_path"]).parent.name or "A", Path(b["_path"]).parent.name or "B"
    print(format_comparison(compare_results(a, b, args.metric), name_a, name_b))
    return 0


def add_card_parser(sub) -> None:
    p = sub.add_parser(
        "card",
        help="print a robustness card as a table: robust accuracy vs cost per T_f/R setting",
        description="Print the robustness card that 'robustdeq evaluate' wrote and that an archive ships: for each "
        "test-time setting its clean and robust accuracy (95%% Wilson interval), whether the robust figure comes "
        "from adaptive attacks or from attacks transferred from the undefended model, and its cost relative to "
        "plain inference, sorted by cost. Use it to choose T_f and R.",
    )
    p.add_argument(
        "card",
        help="robustness_card.json, a folder holding one (a checkpoint's or an evaluation's), a checkpoint file "
        "(the card beside it) or a .mar archive",
    )
    p.add_argument("--json", action="store_true", help="print the card itself")
    p.set_defaults(func=run_card)


def read_card(path: Path) -> dict:
    """The card from a JSON file, a folder, a checkpoint (its sibling) or a .mar archive; validated."""
    from .report import validate_card

    path = Path(path)
    if path.suffix == ".mar":
        with zipfile.ZipFile(path) as archive:
            card = json.loads(archive.read("robustness_card.json"))
    else:
        if path.is_file() and path.suffix != ".json":
            path = path.parent
        if path.is_dir():
            path = path / "robustness_card.json"
        if not path.is_file():
            raise FileNotFoundError(f"no robustness card at {path}; 'robustdeq evaluate' writes one")
        card = json.loads(path.read_text())
    validate_card(card)
    return card


def format_card(card: dict) -> str:
    def pct(p) -> str:
        if not p:
            return "-"
        low, high = p["ci95"]
        return f"{100 * p['acc']:5.1f} [{100 * low:4.1f}, {100 * high:4.1f}]"

    eps = card["threat_model"]["eps"] * 255
    lines = [
        f"{card['model']}: readout z[{card['early_state']}] of {card['n_steps']}, l_inf eps {eps:g}/255, "
        f"n = {card['clean']['n']} test images",
        f"{'setting':<16}{'T_f':>4}{'R':>4}  {'clean %':<20}{'robust %':<20}{'cost':>7}  robust figure from",
    ]
    for s in sorted(card["settings"], key=lambda s: (s["cost_vs_plain"], s["name"])):
        clean = s.get("clean") or (card["clean"] if s["R"] == 0 else None)  # grid rows measured robustness only
        kind = "adaptive attacks" if s["robust_kind"].startswith(("adaptive", "per-sample")) else "transfer only"
        gate = f", gated above {s['threshold']:.2f} nats" if s.get("gated") else ""
        lines.append(
            f"{s['name']:<16}{s['T_f'] if s['T_f'] else '-':>4}{s['R']:>4}  {pct(clean):<20}"
            f"{pct(s['robust']):<20}{s['cost_vs_plain']:6.1f}x  {kind}{gate}"
        )
    return "\n".join(lines)


def run_card(args: argparse.Namespace) -> int:
    card = read_card(Path(args.card))
    print(json.dumps(card, indent=1) if args.json else format_card(card))
    return 0
