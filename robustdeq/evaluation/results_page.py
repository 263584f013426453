"""``docs/results.md``: the project's robustness figures on one page, next to the papers' own.

Everything on the page is read from committed files: each model's evaluation
(``training/shipped/<recipe>/evaluation/results.json``, written by ``robustdeq evaluate``
through ``training/evaluate_shipped.sh``), its training summary and its recipe
(``config.yaml``). The papers' figures are quoted with their table numbers. The page also
exports each model's headline in RobustBench's model-info layout
(``docs/robustbench/<recipe>.json``); a defense whose adaptive chain was weaker than the
suite's current one is named so and exported as ``unreliable``.

Regenerate with ``python -m robustdeq.evaluation.results_page``; ``tests/test_results_page.py``
fails when the committed page or exports differ from what the committed results give.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..data import PROJECT_ROOT
from ..stats import Proportion, mcnemar, parse_correct_string
from .compare import chain_gaps, chain_name

__all__ = ["MODELS", "PAIRS", "Evaluated", "read_evaluations", "render_page", "robustbench_entries", "write_page"]


@dataclass(frozen=True)
class Model:
    recipe: str  # training/shipped/<recipe>
    role: str


#: the models on the page, in its order (a model without a committed evaluation shows as pending)
MODELS: Tuple[Model, ...] = (
    Model("deq-small-nfgsm-rs-long", "default DEQ: PGD-AT (N-FGSM) + Sec. 3.3, its own long run of 9.1 CPU-h"),
    Model("deq-small-nfgsm-rs-100", "the default's recipe, full-length schedule: the 50-epoch run continued to 100"),
    Model("resnet-peer-nfgsm-long", "explicit peer on the same CPU-hours as the 100-epoch DEQ (175 epochs)"),
    Model("deq-small-nfgsm-rs", "the same recipe on budget B (the paired comparisons)"),
    Model("deq-small-nfgsm", "its baseline: the same without Sec. 3.3, budget B"),
    Model("lyadeq-small-nfgsm-rs", "LyaDEQ of the same size, same recipe, budget B"),
    Model("resnet-peer-nfgsm", "explicit peer (ResNet-20, +3.5% parameters), same recipe, budget B"),
    Model("deq-small-clean", "plain-trained DEQ (paper 2's baseline)"),
    Model("lyadeq-small-clean", "plain-trained LyaDEQ (paper 2's claim)"),
    Model("deq-tiny-trades-rs", "previous default: TRADES + Sec. 3.3, 25 CPU-minutes (fast lane)"),
    Model("deq-tiny-trades", "previous baseline: TRADES"),
    Model("lyadeq-tiny-trades", "previous LyaDEQ: TRADES"),
)

#: paired questions: (A, B, the question); B is the model the question is about
PAIRS: Tuple[Tuple[str, str, str], ...] = (
    ("deq-small-nfgsm", "deq-small-nfgsm-rs", "Does Sec. 3.3 help? (paper 1 Table 1)"),
    ("deq-small-nfgsm-rs", "deq-small-nfgsm-rs-long", "What does the default's longer run buy?"),
    ("deq-small-nfgsm-rs-long", "deq-small-nfgsm-rs-100", "What do 100 epochs buy over 50?"),
    ("resnet-peer-nfgsm-long", "deq-small-nfgsm-rs-100", "The DEQ against the explicit peer at equal long budget"),
    ("deq-small-nfgsm-rs", "lyadeq-small-nfgsm-rs", "LyaDEQ against the DEQ, same recipe and budget"),
    ("resnet-peer-nfgsm", "deq-small-nfgsm-rs", "Does the DEQ buy anything over an explicit network of its size?"),
    ("deq-small-clean", "lyadeq-small-clean", "Plain-trained LyaDEQ against the plain DEQ (paper 2 Table 1)"),
    ("deq-tiny-trades", "deq-tiny-trades-rs", "Sec. 3.3 on the previous tiny models"),
)

#: paper 1 Table 1, CIFAR-10, DEQ-Large (about 10M parameters) on GPUs: clean, PGD-10, AutoAttack, min
PAPER1_TABLE1 = (
    ("PGD-AT", "Yang et al. (2022), reproduced", 77.89, 49.45, 47.58, 47.58),
    ("PGD-AT", "+ Sec. 3.2 (defense)", 77.51, 51.62, 49.31, 49.31),
    ("PGD-AT", "+ Sec. 3.3 (random intermediates)", 78.93, 48.18, 48.09, 48.09),
    ("PGD-AT", "+ Secs. 3.2 & 3.3", 80.63, 49.22, 43.79, 43.79),
    ("TRADES", "Yang et al. (2022), reproduced", 74.92, 50.46, 50.33, 50.33),
    ("TRADES", "+ Sec. 3.2 (defense)", 73.80, 51.41, 50.52, 50.52),
    ("TRADES", "+ Sec. 3.3 (random intermediates)", 77.64, 51.10, 49.64, 49.64),
    ("TRADES", "+ Secs. 3.2 & 3.3", 78.89, 55.18, 51.50, 51.50),
)

#: paper 2 Table 1, CIFAR-10, plain-trained models: clean, then (attack, accuracy at eps 2, 4, 6, 8 /255)
PAPER2_TABLE1 = (
    ("DEQ (baseline)", 87.71, (("I-FGSM", (34.25, 23.00, 16.65, 12.36)), ("PGD", (33.37, 22.87, 16.81, 11.12)))),
    (
        "LyaDEQ w/o orthogonal FC",
        87.80,
        (("I-FGSM", (43.80, 43.99, 43.75, 43.45)), ("PGD", (47.09, 46.94, 46.70, 46.12))),
    ),
    (
        "LyaDEQ w/ orthogonal FC",
        87.87,
        (("I-FGSM", (47.38, 47.31, 46.71, 45.80)), ("PGD", (45.04, 44.81, 44.50, 43.96))),
    ),
)
#: the row of PAPER2_TABLE1 that matches the LyaDEQ shipped here (it has the orthogonal FC layer)
PAPER2_SHIPPED_ROW = "LyaDEQ w/ orthogonal FC"
#: paper 2 Sec. 5.2.1: training epochs on CIFAR-10
PAPER2_CIFAR_EPOCHS = 50
RADII = (2, 4, 6, 8)
_AA = ("attack/apgd-ce", "attack/apgd-t", "attack/square")
#: the reference AutoAttack, version 'standard' (``--attacks autoattack``): RobustBench's autoattack_acc
AA_STANDARD = "attack/autoattack-standard"


# ---- reading ------------------------------------------------------------------------------
def _load(root: Path, recipe: str, folder: str = "evaluation", name: str = "results.json") -> Optional[dict]:
    path = root / "training" / "shipped" / recipe / folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _summary(root: Path, recipe: str) -> dict:
    path = root / "training" / "shipped" / recipe / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _config(root: Path, recipe: str) -> dict:
    path = root / "training" / "shipped" / recipe / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _bits(r: dict, key: str) -> Optional[List[bool]]:
    s = r["per_sample"].get(key)
    return parse_correct_string(s) if s else None


def _all_of(r: dict, keys: Sequence[str]) -> Optional[Proportion]:
    """Accuracy under the per-sample worst of several attacks (None when one is missing)."""
    vectors = [_bits(r, k) for k in keys]
    if any(v is None for v in vectors):
        return None
    robust = [all(col) for col in zip(*vectors)]
    return Proportion.of(sum(robust), len(robust))


def _acc(r: dict, key: str) -> Optional[Proportion]:
    v = _bits(r, key)
    return None if v is None else Proportion.of(sum(v), len(v))


def _pct(p: Optional[Proportion], interval: bool = True) -> str:
    if p is None:
        return "–"
    return f"{100 * p.value:.1f} [{100 * p.low:.1f}, {100 * p.high:.1f}]" if interval else f"{100 * p.value:.1f}"


def _defended(r: dict) -> Optional[dict]:
    """The first defense setting that ran adaptive attacks (its name and worst case)."""
    for s in r["settings"][1:]:
        if s["chain"]:
            return s
    return None


#: adaptive attack names in a setting's ``chain`` -> how the page names them
_CHAIN_LABELS = {
    "bpda": "BPDA",
    "unroll": "the unroll of Algorithm 1",
    "apgd-t-bpda": "APGD-T via BPDA",
    "apgd-t-unroll": "APGD-T via the unroll",
    "gate-aware": "the gate-aware attack",
    "square": "Square",
}
#: where the page explains the chains (a heading of the page)
CHAINS_HEADING = "The adaptive chains behind the defense figures"
CHAINS_ANCHOR = "#the-adaptive-chains-behind-the-defense-figures"


def _chain_steps(setting: dict) -> List[str]:
    """The attacks through the defense that a setting's worst case survived, in the order they ran."""
    out = []
    for step in setting["chain"]:
        label = _CHAIN_LABELS.get(step["attack"], step["attack"])
        if "targets" in step and "iterations" in step:
            label += f" ({step['targets']} targets x {step['iterations']} iterations)"
        if step["attack"] == "square" and "queries" in step:
            queried = step.get("queried", step["attacked"])
            on = "every survivor" if queried >= step["attacked"] else f"{queried} of its {step['attacked']} survivors"
            label += f" ({step['queries']} queries on {on})"
        out.append(label)
    return out


#: where a recipe's defense was evaluated on the first images only (``robustdeq combine-cards``)
DEFENDED_FOLDER = "evaluation-defended"
#: paper 2's PGD at 8/255 counted on the final iterate only, as paper 2 counts ('robustdeq accuracy
#: --step-size 1/255 --out', written next to the evaluation by training/evaluate_shipped.sh)
FINAL_ITERATE_FILE = "final-iterate-pgd.json"


@dataclass(frozen=True)
class Evaluated:
    """One model's committed evaluations, read once per page."""

    main: Optional[dict]  # evaluation/results.json
    defense: Optional[dict]  # the run that holds its defense: evaluation-defended/ when there is one, else main
    defense_folder: str
    full: Optional[dict]  # evaluation-full/: the full test set, sharded (training/evaluate_full_test.sh)
    summary: dict  # the training summary
    config: dict = field(default_factory=dict)  # the training recipe (config.yaml), as resolved by the run
    final_iterate: Optional[dict] = None  # evaluation/final-iterate-pgd.json: paper 2's PGD, final iterate


def read_evaluations(root: Path = PROJECT_ROOT) -> Dict[str, Evaluated]:
    """recipe -> its committed evaluations, for every model on the page."""
    out = {}
    for m in MODELS:
        main, prefix = _load(root, m.recipe), _load(root, m.recipe, DEFENDED_FOLDER)
        out[m.recipe] = Evaluated(
            main=main,
            defense=prefix if prefix is not None else main,
            defense_folder=DEFENDED_FOLDER if prefix is not None else "evaluation",
            full=_load(root, m.recipe, "evaluation-full"),
            summary=_summary(root, m.recipe),
            config=_config(root, m.recipe),
            final_iterate=_load(root, m.recipe, name=FINAL_ITERATE_FILE),
        )
    return out


# ---- the page -----------------------------------------------------------------------------
def render_page(root: Path = PROJECT_ROOT, evaluated: Optional[Dict[str, Evaluated]] = None) -> str:
    evaluated = read_evaluations(root) if evaluated is None else evaluated
    results = {recipe: e.main for recipe, e in evaluated.items()}
    L: List[str] = []
    add = L.append
    add("# Results: both papers' claims on this machine's models\n")
    add(
        "Generated by `python -m robustdeq.evaluation.results_page` from the committed evaluations "
        "(`training/shipped/<recipe>/evaluation/results.json`, made by `bash training/evaluate_shipped.sh`) "
        "and training summaries; `tests/test_results_page.py` checks that this page is current. Accuracies "
        "in % on CIFAR-10 test images (the same seeded subset for every model, n given per row), l_inf "
        "eps = 8/255 unless a column says otherwise, with Wilson 95% intervals in brackets.\n"
    )
    _headline(L, evaluated)
    _paper1(L, results)
    _paper2(L, evaluated)
    _comparisons(L, evaluated)
    _chains(L, evaluated)
    _transfer(L, results)
    _checks(L, results)
    add("\n## RobustBench model-info export\n")
    add(
        "Each evaluated model's headline in RobustBench's `model_info` layout: `docs/robustbench/<recipe>.json`. "
        "`autoattack_acc` holds the reference AutoAttack standard where it ran (`robustdeq evaluate --attacks "
        "autoattack`; then `worst_case_acc` holds the suite's per-sample worst case, which includes it); elsewhere "
        "it holds the per-sample worst case, which runs APGD-CE, APGD-T and Square of the reference AutoAttack "
        "code plus PGD and paper 1's intermediate-state attacks, but not FAB-T. Each file's footnote says which "
        "and gives n. A defense's file names the attacks that ran through it; one whose chain was "
        f"weaker than the current one ([above]({CHAINS_ANCHOR})) has `unreliable` set.\n"
    )
    for name in robustbench_entries(root, evaluated):
        add(f"- [`{name}.json`](robustbench/{name}.json)")
    return "\n".join(L) + "\n"


def _headline(L: List[str], evaluated: Dict[str, Evaluated]) -> None:
    add = L.append
    add("## The models\n")
    add(
        "| model | role | CPU-h | clean | PGD-10 (ready-made) | APGD-CE, APGD-T, Square | AutoAttack standard | "
        "**worst case** | defense, worst case | n | source |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    for m in MODELS:
        e = evaluated[m.recipe]
        r, rd = e.main, e.defense
        cpu = e.summary.get("cpu_s")
        cpu_h = f"{cpu / 3600:.2f}" if cpu else "–"
        if r is None:
            add(f"| `{m.recipe}` | {m.role} | {cpu_h} | not evaluated yet | | | | | | | |")
            continue
        d = _defended(rd)
        defended = f"{d['name']}: {_pct(_from_dict(d['worst_case']))}" if d else "–"
        if d and rd is not r:
            defended += f" (first {rd['subset']['n']})"
        gaps = chain_gaps(rd, d) if d else []
        if gaps:
            defended += f" ([{chain_name(gaps)}, weaker than today's]({CHAINS_ANCHOR}))"
        add(_model_row(m.recipe, m.role, cpu_h, r, defended, "evaluation"))
        if e.full is not None:  # the full test set, sharded (training/evaluate_full_test.sh)
            role = f"the same, full test set (sharded; {', '.join(_attack_families(e.full, {}))})"
            add(_model_row(m.recipe, role, cpu_h, e.full, "–", "evaluation-full"))


def _model_row(recipe: str, role: str, cpu_h: str, r: dict, defended: str, folder: str) -> str:
    return (
        f"| `{recipe}` | {role} | {cpu_h} | {_pct(_acc(r, 'clean'))} | {_pct(_acc(r, 'attack/pgd-ready'))} | "
        f"{_pct(_all_of(r, _AA))} | {_pct(_acc(r, AA_STANDARD)) if AA_STANDARD in r['per_sample'] else 'not run'} | "
        f"**{_pct(_acc(r, 'worst/none'))}** | {defended} | {r['subset']['n']} | "
        f"[results](../training/shipped/{recipe}/{folder}/results.json) |"
    )


def _from_dict(d: dict) -> Proportion:
    return Proportion.of(int(round(d["acc"] * d["n"])), d["n"])


def _paper1(L: List[str], results: Dict[str, Optional[dict]]) -> None:
    add = L.append
    add("\n## Paper 1, Table 1, next to this machine\n")
    add(
        "Paper 1's DEQ-Large (about 10M parameters, 4 scales) trained for hundreds of GPU epochs, its PGD-10 "
        'and AutoAttack at the early state, and "all" = the lower of the two. Our rows: PGD-10 with the ready-made '
        '(phantom) gradient as in the paper, "AA" = the per-sample worst of APGD-CE, APGD-T and Square, and the '
        'per-sample worst case over every attack of the suite, which is lower than the paper\'s "all" by '
        "construction.\n"
    )
    add("| source | model / method | clean | PGD-10 | AA | all / worst case |")
    add("|---|---|---|---|---|---|")
    for framework, method, clean, pgd, aa, worst in PAPER1_TABLE1:
        add(f"| paper 1 Table 1, {framework} | DEQ-Large {method} | {clean:.2f} | {pgd:.2f} | {aa:.2f} | {worst:.2f} |")
    for m in MODELS:
        r = results[m.recipe]
        if r is None or not r["per_sample"].get("attack/pgd-ready"):
            continue
        add(
            f"| this machine, {r['subset']['n']} images | `{m.recipe}` | {_pct(_acc(r, 'clean'), False)} | "
            f"{_pct(_acc(r, 'attack/pgd-ready'), False)} | {_pct(_all_of(r, _AA), False)} | "
            f"{_pct(_acc(r, 'worst/none'), False)} |"
        )


def _paper2(L: List[str], evaluated: Dict[str, Evaluated]) -> None:
    add = L.append
    results = {recipe: e.main for recipe, e in evaluated.items()}
    add("\n## Paper 2, Table 1, under its own protocol and under ours\n")
    add(
        "Paper 2's protocol: I-FGSM (no random start) and PGD (uniform random start), step 1/255, "
        "n = floor(min(255 eps + 4, 1.25 * 255 eps)) steps (its Eq. 14), the gradient of the model's own training "
        "backward at the final state (`robustdeq evaluate --attacks radii`). Every LyaDEQ here has the orthogonal FC "
        f'layer, so its row in the paper is "{PAPER2_SHIPPED_ROW}"; the row without it is listed for completeness. '
        '"Protocol-exact" rows run the protocol\'s attacks but count as this suite does: an image is broken if any '
        "iterate, the random start included, fools the model, where paper 2 scores only the final iterate. They "
        'can therefore only be lower than the paper\'s own count would be. "Final iterate" rows count as '
        "paper 2 does, PGD at 8/255 only, read at the final state z[N] (and at the model's readout state in "
        'brackets). "Worst case" is this suite\'s per-sample worst at 8/255 on the same images.\n'
    )
    add("| source | model | clean | attack | 2/255 | 4/255 | 6/255 | 8/255 | worst case at 8/255 |")
    add("|---|---|---|---|---|---|---|---|---|")
    for model, clean, rows in PAPER2_TABLE1:
        label = f"{model} (the architecture here)" if model == PAPER2_SHIPPED_ROW else model
        for attack, accs in rows:
            add(
                f"| paper 2 Table 1 (GPU) | {label} | {clean:.2f} | {attack} | "
                + " | ".join(f"{a:.2f}" for a in accs)
                + " | |"
            )
    pending = []
    for m in MODELS:
        r = results[m.recipe]
        radii = ((r or {}).get("paper_tables") or {}).get("radii")
        if not radii:
            if m.recipe.endswith("-clean"):
                pending.append(m.recipe)
            continue
        cells = radii["cells"]
        for kind, name in (("ifgsm", "I-FGSM"), ("pgd", "PGD")):
            accs = [cells.get(f"{kind}@{e}/255") for e in RADII]
            add(
                f"| this machine, protocol-exact | `{m.recipe}` | {_pct(_acc(r, 'clean'), False)} | {name} | "
                + " | ".join("–" if a is None else f"{100 * a['acc']:.1f}" for a in accs)
                + f" | {_pct(_acc(r, 'worst/none'), False)} |"
            )
        final = evaluated[m.recipe].final_iterate
        if final is not None:
            add(
                f"| this machine, final iterate | `{m.recipe}` | {100 * final['clean_acc_final']:.1f} | PGD | – | – | "
                f"– | {100 * final['pgd_acc_final']:.1f} (z[{final['state']}]: {100 * final['pgd_acc']:.1f}) | |"
            )
    add("")
    scale = _paper2_scale(evaluated)
    if scale:
        add(scale + "\n")
    add("**Verdict.** " + _paper2_verdict(results, pending))


#: the plain-trained pair that paper 2's claim is tested on: (recipe here, its row in PAPER2_TABLE1)
PAPER2_PAIR = (("lyadeq-small-clean", PAPER2_SHIPPED_ROW), ("deq-small-clean", "DEQ (baseline)"))


def _paper2_scale(evaluated: Dict[str, Evaluated]) -> str:
    """How the plain-trained pair here differs in scale from paper 2's, and what counting the final
    iterate, as paper 2 does, changes."""
    paper_clean = {name: clean for name, clean, _ in PAPER2_TABLE1}
    parts = []
    for recipe, row in PAPER2_PAIR:
        r = evaluated[recipe].main if recipe in evaluated else None
        if r is None:
            continue
        epochs = evaluated[recipe].config.get("optim", {}).get("epochs")
        trained = f"{epochs} epochs" if epochs else "its recipe's epochs"
        parts.append(
            f"`{recipe}` ({r['model']}, N = {r['n_steps']}) trained {trained} and reaches "
            f"{_pct(_acc(r, 'clean'), False)}% clean, against {paper_clean[row]:.2f} for paper 2's {row}"
        )
    if not parts:
        return ""
    return (
        f"**Differences of scale.** Paper 2 trains for {PAPER2_CIFAR_EPOCHS} epochs on the original CIFAR-10 "
        "(its Sec. 5.2.1), with standard ResNet-20 features and up to 50 Anderson iterations. The "
        "plain pair here trained on 2 CPU cores, on CIFAR-10 re-encoded as JPEG at quality 75 (its pixels differ "
        "slightly from the original's): "
        + "; ".join(parts)
        + ". Models this much weaker on clean images start from a different place, so the comparison tests "
        "the direction of the claim more than its size.\n\n" + _final_iterate_note(evaluated)
    )


def _final_iterate_note(evaluated: Dict[str, Evaluated]) -> str:
    """The final-iterate count of paper 2's PGD at 8/255 beside the any-iterate count, or how to get it."""
    command = (
        "`robustdeq accuracy --checkpoint training/shipped/<recipe>/model.pt --n 1000 --step-size 1/255 "
        f"--out training/shipped/<recipe>/evaluation/{FINAL_ITERATE_FILE}`"
    )
    parts = []
    for recipe, _ in PAPER2_PAIR:
        e = evaluated.get(recipe)
        protocol = _radii_pgd(e.main if e else None)
        if e is None or e.final_iterate is None or protocol is None:
            return (
                "**The final iterate is not measured yet** for every model of the pair. Paper 2's PGD at 8/255 is "
                "10 steps of 1/255 from a uniform random start; its final-iterate accuracy on the same 1,000 images "
                f"comes from {command}, which `training/evaluate_shipped.sh` runs for the plain pair."
            )
        f = e.final_iterate
        parts.append(
            f"`{recipe}` {100 * f['pgd_acc_final']:.1f}% at z[N] and {100 * f['pgd_acc']:.1f}% at its readout "
            f"z[{f['state']}] (any iterate: {100 * protocol[1]:.1f}%)"
        )
    return (
        "**The final iterate.** Counted as paper 2 counts, on the final iterate of PGD-10 (step 1/255, uniform "
        "random start) at 8/255 on the same 1,000 images: "
        + "; ".join(parts)
        + f". Paper 2's figures for these rows are {_paper2_pgd(PAPER2_SHIPPED_ROW)[1]:.2f} and "
        f"{_paper2_pgd('DEQ (baseline)')[1]:.2f}. Reproduce with {command}."
    )


def _paper2_pgd(model: str) -> Tuple[float, float]:
    """Paper 2 Table 1's PGD accuracy of ``model`` at 2/255 and 8/255 (from ``PAPER2_TABLE1``)."""
    rows = next(rows for name, _, rows in PAPER2_TABLE1 if name == model)
    accs = dict(rows)["PGD"]
    return accs[0], accs[-1]


def _radii_pgd(r: Optional[dict]) -> Optional[Tuple[float, float]]:
    """Protocol-exact PGD accuracy at 2/255 and 8/255 (``--attacks radii``), or None."""
    cells = ((r or {}).get("paper_tables") or {}).get("radii", {}).get("cells")
    if not cells or "pgd@2/255" not in cells or "pgd@8/255" not in cells:
        return None
    return cells["pgd@2/255"]["acc"], cells["pgd@8/255"]["acc"]


def _strongest_attack(r: dict) -> Tuple[str, float]:
    """The single attack (``attack/*`` or ``cross-model/*``) that leaves the fewest images correct."""
    accs = {
        key.split("/", 1)[1]: _acc(r, key).value
        for key in r["per_sample"]
        if key.startswith(("attack/", "cross-model/")) and r["per_sample"][key]
    }
    name = min(accs, key=accs.get)
    return name, accs[name]


def _paper2_verdict(results: Dict[str, Optional[dict]], pending: List[str]) -> str:
    """Paper 2's claim (Table 1: a plain-trained LyaDEQ keeps ~46% under PGD at 8/255 where the
    plain DEQ keeps 11%) set against the protocol-exact run and this suite's worst case."""
    lya, deq = results.get("lyadeq-small-clean"), results.get("deq-small-clean")
    lya_pgd, deq_pgd = _radii_pgd(lya), _radii_pgd(deq)
    if lya_pgd is None or deq_pgd is None:
        return (
            "Pending: the plain-trained LyaDEQ and DEQ ("
            + ", ".join(f"`{p}`" for p in pending or ["lyadeq-small-clean", "deq-small-clean"])
            + ") have not both been evaluated yet."
        )
    (l2, l8), (d2, d8) = lya_pgd, deq_pgd
    lw, dw = _acc(lya, "worst/none").value, _acc(deq, "worst/none").value
    name, strongest = _strongest_attack(lya)
    pl2, pl8 = _paper2_pgd(PAPER2_SHIPPED_ROW)
    pd2, pd8 = _paper2_pgd("DEQ (baseline)")
    parts = [
        f"Under paper 2's own PGD at 8/255 the plain LyaDEQ keeps {100 * l8:.1f}% and the plain DEQ "
        f"{100 * d8:.1f}% (paper 2: {pl8:.2f} for its LyaDEQ with the orthogonal FC layer, {pd8:.2f} for its DEQ; "
        "counted here on any iterate, there on the final one). From 2/255 to 8/255 the LyaDEQ loses "
        f"{100 * (l2 - l8):.1f} points (paper 2: {pl2 - pl8:.2f}) and the DEQ {100 * (d2 - d8):.1f} "
        f"(paper 2: {pd2 - pd8:.2f}).",
        f"Under this suite's per-sample worst case at 8/255 the LyaDEQ keeps {100 * lw:.1f}% and the DEQ "
        f"{100 * dw:.1f}%; the strongest single attack on the LyaDEQ is `{name}` ({100 * strongest:.1f}%).",
    ]
    transfer = _acc(lya, "cross-model/deq-small-clean")
    if transfer is not None:
        parts.append(f"The DEQ's adversarial inputs alone leave the LyaDEQ {100 * transfer.value:.1f}%.")
    if l8 - lw > 0.05:
        parts.append(
            f"The protocol's attack overstates the LyaDEQ's robustness by {100 * (l8 - lw):.1f} points: "
            "stronger attacks find what it misses."
        )
    if lw - dw >= 0.05:
        parts.append(
            f"**The claim holds in direction on this machine:** the LyaDEQ stays {100 * (lw - dw):.1f} points "
            "more robust than the DEQ under every attack this suite has."
        )
    elif l8 - d8 >= 0.05:
        parts.append(
            "**The claim holds only under the protocol's attack:** the LyaDEQ's lead at 8/255 "
            f"({100 * (l8 - d8):.1f} points) is gone under attacks that are not limited to the protocol's "
            f"({100 * lw:.1f}% against {100 * dw:.1f}%)."
        )
    else:
        parts.append(
            "**The claim does not hold on this machine, not even under the protocol's own attack:** "
            f"the plain LyaDEQ is no more robust than the plain DEQ at 8/255 ({100 * l8:.1f}% against "
            f"{100 * d8:.1f}% under the protocol, {100 * lw:.1f}% against {100 * dw:.1f}% under the worst case)."
        )
    return " ".join(parts)


def _comparisons(L: List[str], evaluated: Dict[str, Evaluated]) -> None:
    results = {recipe: e.main for recipe, e in evaluated.items()}
    add = L.append
    add("\n## Paired comparisons\n")
    add(
        'Exact McNemar tests on per-sample correctness, same images. "A only" counts images A gets right and B wrong.\n'
    )
    add("| question | A | B | metric | A | B | B - A (points) | A only | B only | McNemar p |")
    add("|---|---|---|---|---|---|---|---|---|---|")
    for a_name, b_name, question in PAIRS:
        a, b = results.get(a_name), results.get(b_name)
        if a is None or b is None or a["subset"]["id"] != b["subset"]["id"]:
            add(
                f"| {question} | `{a_name}` | `{b_name}` | pending: not both evaluated on the same images | | | | | | |"
            )
            continue
        for key in ("clean", "worst/none"):
            r = mcnemar(_bits(a, key), _bits(b, key))
            add(_mcnemar_row(question, f"`{a_name}`", f"`{b_name}`", key, r))
    for m in MODELS:
        r = evaluated[m.recipe].defense
        d = _defended(r) if r else None
        if d is None:
            continue
        gaps = chain_gaps(r, d)
        question = "Does the defense help?" + (f" ({chain_name(gaps)})" if gaps else "")
        for key in ("clean", "worst"):
            base, other = ("clean", f"clean/{d['name']}") if key == "clean" else ("worst/none", f"worst/{d['name']}")
            res = mcnemar(_bits(r, base), _bits(r, other))
            add(_mcnemar_row(question, f"`{m.recipe}` plain", d["name"], base, res))


def _chains(L: List[str], evaluated: Dict[str, Evaluated]) -> None:
    """Which adaptive attacks each defense figure survived, and which evaluations ran a weaker
    chain than the suite's current one (their gains are quoted with the chain that made them)."""
    rows = []
    for m in MODELS:
        r = evaluated[m.recipe].defense
        d = _defended(r) if r else None
        if d is not None:
            res = mcnemar(_bits(r, "worst/none"), _bits(r, f"worst/{d['name']}"))
            rows.append((m.recipe, r, d, chain_gaps(r, d), res))
    if not rows:
        return
    add = L.append
    add(f"\n### {CHAINS_HEADING}\n")
    add(
        "A defense's worst case counts the attacks on the undefended model, transferred, and then the attacks "
        "through the defense listed here, in the order they ran, each on the images that everything before it "
        "left correct. The suite's current chain runs APGD-T through the defense (via BPDA and via the unroll) "
        "and Square with the full query budget on every survivor ([evaluation.md](evaluation.md)).\n"
    )
    current = [(recipe, res) for recipe, _, _, gaps, res in rows if not gaps]
    for recipe, r, d, gaps, res in rows:
        line = (
            f"- `{recipe}` {d['name']} ({r['subset']['n']} images, evaluated {r['date'][:10]}): "
            + ", ".join(_chain_steps(d))
            + f". Worst case {100 * res.b_correct / res.n:.1f} with the defense against "
            f"{100 * res.a_correct / res.n:.1f} without ({100 * res.difference:+.1f} points, McNemar p = "
            f"{res.p_value:.3g})."
        )
        if gaps:
            line += f" **This is the {chain_name(gaps)}, weaker than today's:** " + "; ".join(gaps) + "."
            if current:
                line += (
                    " Its gain has not been rechecked with today's chain, which finds "
                    + ", ".join(
                        f"{100 * c.difference:+.1f} points (p = {c.p_value:.3g}) on `{rec}`" for rec, c in current
                    )
                    + "."
                )
            else:
                line += " Its gain has not been rechecked with today's chain."
        add(line)


def _mcnemar_row(question: str, a: str, b: str, metric: str, r) -> str:
    return (
        f"| {question} | {a} | {b} | {metric} | {100 * r.a_correct / r.n:.1f} | {100 * r.b_correct / r.n:.1f} | "
        f"{100 * r.difference:+.1f} | {r.a_only} | {r.b_only} | {r.p_value:.3g} |"
    )


def _transfer(L: List[str], results: Dict[str, Optional[dict]]) -> None:
    rows = [
        (m.recipe, label, rec)
        for m in MODELS
        if results[m.recipe]
        for label, rec in (results[m.recipe].get("cross_model") or {}).items()
    ]
    L.append("\n## Cross-model transfer\n")
    if not rows:
        L.append("Pending: no evaluation with `--transfer-from` is committed yet.")
        return
    L.append("| evaluated model | inputs made on | undefended | with the defense |")
    L.append("|---|---|---|---|")
    for recipe, label, rec in rows:
        defended = [f"{k}: {100 * v['acc']:.1f}" for k, v in rec.items() if k not in ("source", "none")]
        L.append(f"| `{recipe}` | {label} | {100 * rec['none']['acc']:.1f} | {', '.join(defended) or '–'} |")


def _checks(L: List[str], results: Dict[str, Optional[dict]]) -> None:
    L.append("\n## Gradient-masking checks\n")
    L.append(
        "docs/design.md §6, run by `robustdeq evaluate --attacks checks` on the first 200 images of each evaluation.\n"
    )
    for m in MODELS:
        r = results[m.recipe]
        if r is None:
            continue
        verdicts = (r.get("checks") or {}).get("verdicts")
        if not verdicts:
            L.append(f"- `{m.recipe}`: not run (its evaluation did not include the checks)")
            continue
        failed = [k for k, ok in verdicts.items() if not ok]
        L.append(
            f"- `{m.recipe}`: {len(verdicts) - len(failed)} of {len(verdicts)} pass"
            + (f"; FAIL: {'; '.join(failed)}" if failed else "")
        )


# ---- RobustBench export -------------------------------------------------------------------
def robustbench_entries(root: Path = PROJECT_ROOT, evaluated: Optional[Dict[str, Evaluated]] = None) -> Dict[str, dict]:
    """name -> RobustBench ``model_info`` entry: ``<recipe>`` for each evaluated model without
    its defense (from the full test set where that was evaluated), and ``<recipe>-<setting>`` for
    a defense setting that was attacked adaptively."""
    evaluated = read_evaluations(root) if evaluated is None else evaluated
    out = {}
    for m in MODELS:
        e = evaluated[m.recipe]
        r = e.main
        if r is None:
            continue
        rd, folder = e.defense, e.defense_folder
        d = _defended(rd)
        headline, headline_folder = (e.full, "evaluation-full") if e.full is not None else (r, "evaluation")
        pgd = _acc(headline, "attack/pgd-ready")
        out[m.recipe] = _robustbench(
            headline, m, headline["settings"][0], passes=1, reported=None if pgd is None else pgd.value,
            note="reported is PGD-10 with the ready-made gradient (paper 1's protocol).", folder=headline_folder,
        )  # fmt: skip
        if d is not None:
            cost = d.get("cost_vs_plain") or 1.0
            gaps = chain_gaps(rd, d)
            chain = f"Adaptive attacks through it, in order: {', '.join(_chain_steps(d))}."
            if gaps:
                chain += (
                    f" This is the project's {chain_name(gaps)}, weaker than the current one "
                    f"({'; '.join(gaps)}), so the entry is marked unreliable until it is rerun."
                )
            out[f"{m.recipe}-{d['name']}"] = _robustbench(
                rd, m, d, passes=max(1, math.ceil(cost)), folder=folder,
                reported=(d.get("non_adaptive") or {}).get("acc"),
                note=f"Test-time defense {d['name']} (paper 1 Algorithm 1). {chain} reported is the attacks on the "
                f"undefended model transferred (the paper's number). number_forward_passes is its measured cost, "
                f"{cost:.1f}x a plain prediction, rounded up.",
                unreliable=bool(gaps),
            )  # fmt: skip
    return out


#: attack name prefix in results.json -> how the export names the family
_FAMILIES = (
    ("pgd-ready", "PGD-10"), ("ifgsm", "I-FGSM"), ("eq11-", "paper 1's intermediate-state attacks (Eq. 11)"),
    ("apgd-ce", "APGD-CE"), ("apgd-t", "APGD-T"), ("square", "Square"),
    ("autoattack-standard", "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square 5,000)"),
)  # fmt: skip


def _attack_families(r: dict, setting: dict) -> List[str]:
    """The attack families an evaluation ran, in the suite's order, plus the setting's adaptive chain."""
    names = [a["name"] for a in r.get("attacks", [])]
    found = [label for prefix, label in _FAMILIES if any(n.startswith(prefix) for n in names)]
    if setting.get("chain"):
        found.append("adaptive attacks through the defense")
    if r.get("cross_model"):
        found.append("transfers from other models")
    return found


def _evaluated_on(r: dict) -> str:
    n = r["subset"]["n"]
    if n >= 10000:
        return f"Evaluated on the full CIFAR-10 test set ({n} images, sharded)."
    return f"Evaluated on {n} CIFAR-10 test images (seeded subset {r['subset']['id']}), not the full test set."


def _autoattack_fields(r: dict, setting: dict, note: str) -> dict:
    """``autoattack_acc`` (and the footnote): the reference AutoAttack standard where it ran on this
    setting (the undefended readout), next to the suite's per-sample worst case, which includes it;
    otherwise the worst case, named for what it is."""
    worst = f"{100 * setting['worst_case']['acc']:.2f}"
    families = ", ".join(_attack_families(r, setting))
    if setting["name"] == "none" and AA_STANDARD in r.get("per_sample", {}):
        return {
            "autoattack_acc": f"{100 * _acc(r, AA_STANDARD).value:.2f}",
            "worst_case_acc": worst,
            "footnote": f"{_evaluated_on(r)} autoattack_acc is AutoAttack standard (pyautoattack, version "
            "'standard', through the suite's differentiable surrogate and judged by the real forward); "
            f"worst_case_acc is the per-sample worst case of every attack here ({families}), AutoAttack included. "
            f"{note}",
        }
    return {
        "autoattack_acc": worst,
        "footnote": f"{_evaluated_on(r)} autoattack_acc is the per-sample worst case of robustdeq's attacks here "
        f"({families}), not AutoAttack standard (no FAB-T). {note}",
    }


def _robustbench(
    r: dict,
    m: Model,
    setting: dict,
    passes: int,
    reported: Optional[float],
    note: str,
    folder: str = "evaluation",
    unreliable: bool = False,
) -> dict:
    return {
        "link": f"training/shipped/{m.recipe}/{folder}/results.json",
        "name": f"RobustDEQ Serve {m.recipe}: {m.role}",
        "authors": "RobustDEQ Serve team",
        "additional_data": False,
        "number_forward_passes": passes,
        "dataset": "cifar10",
        "venue": "unpublished",
        "architecture": f"{r['model']} (readout z[{r['early_state']}] of N={r['n_steps']})"
        + ("" if setting["name"] == "none" else f" + {setting['name']}"),
        "eps": "8/255",
        "clean_acc": f"{100 * setting['clean']['acc']:.2f}",
        "reported": None if reported is None else f"{100 * reported:.2f}",
        **_autoattack_fields(r, setting, note),
        "unreliable": unreliable,
    }


def write_page(root: Path = PROJECT_ROOT) -> List[Path]:
    docs = root / "docs"
    page = docs / "results.md"
    evaluated = read_evaluations(root)
    page.write_text(render_page(root, evaluated))
    written = [page]
    rb = docs / "robustbench"
    rb.mkdir(exist_ok=True)
    entries = robustbench_entries(root, evaluated)
    for stale in rb.glob("*.json"):
        if stale.stem not in entries:
            stale.unlink()
    for recipe, entry in entries.items():
        path = rb / f"{recipe}.json"
        path.write_text(json.dumps(entry, indent=2) + "\n")
        written.append(path)
    return written


def add_results_page_arguments(parser: argparse.ArgumentParser) -> None:
    """``robustdeq results-page`` (also ``python -m robustdeq.evaluation.results_page``): no options."""
    parser.description = "Regenerate docs/results.md and docs/robustbench/*.json from the committed evaluations."


def run_results_page(args: argparse.Namespace) -> int:
    for path in write_page():
        print(f"wrote {path.relative_to(PROJECT_ROOT)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m robustdeq.evaluation.results_page")
    add_results_page_arguments(parser)
    return run_results_page(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
