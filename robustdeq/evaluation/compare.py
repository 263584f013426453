"""``robustdeq compare``: paired McNemar tests between evaluations on the same images.

Two results files (two models, or two runs) are compared metric by metric on the per-sample
correctness they store; one file compares its defense settings with the undefended model.
Pairing requires the same test subset, which the files identify by ``subset.id``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple

from ..stats import McNemarResult, mcnemar, parse_correct_string

__all__ = [
    "load_results",
    "evaluation_name",
    "compare_results",
    "compare_within",
    "chain_gaps",
    "chain_name",
    "chain_notes",
    "format_comparison",
]


def load_results(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.exists():
        raise FileNotFoundError(f"no evaluation results at {path} (expected results.json from robustdeq evaluate)")
    data = json.loads(p.read_text())
    if data.get("format") != "robustdeq.evaluation/1" or "per_sample" not in data:
        raise ValueError(f"{p} is not a robustdeq evaluation results file")
    data["_path"] = str(p)
    return data


def evaluation_name(results: dict) -> str:
    """The name a results file goes by in a comparison: its folder's (``runs/eval/<name>``), or, for
    a copy committed next to a checkpoint (``training/shipped/<recipe>/evaluation[-defended]``), the
    recipe's with the copy's suffix, so that both places give the same heading."""
    folder = Path(results["_path"]).parent
    if folder.name.startswith("evaluation") and folder.parent.name:
        return folder.parent.name + folder.name.removeprefix("evaluation")
    return folder.name or "results"


def _pair(a: dict, ka: str, b: dict, kb: str) -> McNemarResult:
    return mcnemar(parse_correct_string(a["per_sample"][ka]), parse_correct_string(b["per_sample"][kb]))


def compare_results(a: dict, b: dict, metrics: Optional[List[str]] = None) -> List[Tuple[str, McNemarResult]]:
    """McNemar per metric present in both files (e.g. ``clean``, ``worst/none``)."""
    if a["subset"]["id"] != b["subset"]["id"]:
        raise ValueError(
            f"the two evaluations used different test subsets ({a['subset']['id']} vs {b['subset']['id']}); "
            "paired tests need the same images: rerun with the same --n and --seed"
        )
    keys = metrics or [k for k in a["per_sample"] if k in b["per_sample"]]
    missing = [k for k in keys if k not in a["per_sample"] or k not in b["per_sample"]]
    if missing:
        raise ValueError(f"metrics {missing} are not in both files; available: {sorted(a['per_sample'])}")
    return [(k, _pair(a, k, b, k)) for k in keys if a["per_sample"][k] and b["per_sample"][k]]


def compare_within(a: dict) -> List[Tuple[str, McNemarResult]]:
    """Each defense setting against the undefended model, clean and worst case."""
    out = []
    for key in a["per_sample"]:
        for kind, base in (("clean/", "clean"), ("worst/", "worst/none")):
            if key.startswith(kind) and key != base and a["per_sample"][key]:
                out.append((f"{base} -> {key}", _pair(a, base, a, key)))
    return out


def chain_gaps(r: dict, setting: dict) -> List[str]:
    """What a setting's adaptive chain lacks against the suite's current one: APGD-T through
    the defense, and Square with the evaluation's full query budget on every survivor. An
    empty list means the current chain ran."""
    steps = setting["chain"]
    gaps = []
    if not any(step["attack"].startswith("apgd-t") for step in steps):
        gaps.append("no APGD-T through the defense")
    budget = r.get("config", {}).get("square_queries")
    for step in (s for s in steps if s["attack"] == "square"):
        queries, queried = step.get("queries"), step.get("queried", step["attacked"])
        few = budget is not None and queries is not None and queries < budget
        if few or queried < step["attacked"]:
            gap = f"Square with {queries} queries" + (f" instead of {budget}" if few else "")
            if queried < step["attacked"]:
                gap += f", on {queried} of the {step['attacked']} survivors"
            gaps.append(gap)
    return gaps


def chain_name(gaps: List[str]) -> str:
    """The first evaluations ran no APGD-T through the defense; later ones may only be cut short."""
    return "first chain" if "no APGD-T through the defense" in gaps else "reduced chain"


def chain_notes(results: dict) -> List[str]:
    """One line per defense setting whose adaptive chain is weaker than today's, naming what it
    lacks, so that a gain quoted from it says which chain produced it."""
    notes = []
    for setting in results["settings"][1:]:
        gaps = chain_gaps(results, setting) if setting["chain"] else []
        if gaps:
            notes.append(
                f"{setting['name']} was evaluated with the {chain_name(gaps)}, weaker than today's "
                f"({results['date'][:10]}): " + "; ".join(gaps) + "."
            )
    return notes


def format_comparison(rows: List[Tuple[str, McNemarResult]], name_a: str, name_b: str) -> str:
    lines = [f"| metric | {name_a} | {name_b} | difference (points) | {name_a} only | {name_b} only | McNemar p |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, r in rows:
        lines.append(
            f"| {key} | {100 * r.a_correct / r.n:.1f}% | {100 * r.b_correct / r.n:.1f}% | {100 * r.difference:+.1f} "
            f"| {r.a_only} | {r.b_only} | {r.p_value:.3g} |"
        )
    return "\n".join(lines)
