"""Which attacks set the per-sample worst case on the undefended model.

A worst case over many attacks is only as expensive as it has to be when one knows which
attacks it rests on. From a finished evaluation's per-sample results this module reports,
for every attack on the undefended model, how many clean-correct images it breaks, how many
no other attack breaks (its unique breaks), and its attack time; then a greedy cover: the
attacks in the order that adds the most newly broken images (the cheaper one on a tie), with
the accuracy and the attack time so far, until the union of all attacks is reached.

This is how to choose the attacks of a much larger run (``--attacks``, for example the full
test set in ``training/evaluate_full_test.sh``) from a 1,000-image evaluation: the cover's
first few rows reproduce the worst case on these images at a fraction of the time, and the
remaining rows show what leaving the rest out would have cost here. Transfers from other
models (``cross_model``) are outside the attack list and are reported as their own row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from ..stats import parse_correct_string

__all__ = ["AttackShare", "CoverStep", "Coverage", "attack_coverage", "attacks_with_results", "format_coverage"]


@dataclass(frozen=True)
class AttackShare:
    """One attack on the undefended model."""

    name: str
    accuracy: float
    breaks: int  # clean-correct images it makes wrong
    unique: int  # of those, images that no other attack in the list makes wrong
    seconds: Optional[float]


@dataclass(frozen=True)
class CoverStep:
    """One row of the greedy cover: the attack added and where the worst case stands after it."""

    name: str
    new: int  # images it breaks that the earlier rows left correct
    accuracy: float  # accuracy under the rows so far
    seconds: float  # attack time of the rows so far (attacks without a recorded time count 0)


@dataclass(frozen=True)
class Coverage:
    n: int
    clean_correct: int
    shares: List[AttackShare]
    cover: List[CoverStep]
    union_accuracy: float  # under every attack in the list
    worst_accuracy: float  # the evaluation's own worst case (transfers included)
    total_seconds: float


def attacks_with_results(results: dict) -> List[str]:
    """The attacks on the undefended model whose per-sample results the evaluation holds."""
    per = results["per_sample"]
    return [a["name"] for a in results["attacks"] if per.get(f"attack/{a['name']}")]


def attack_coverage(results: dict) -> Coverage:
    """The shares and the greedy cover of a finished evaluation's ``results.json``."""
    per = results["per_sample"]
    clean = parse_correct_string(per["clean"])
    n, clean_correct = len(clean), sum(clean)
    names = attacks_with_results(results)
    if not names:
        raise ValueError("the evaluation holds no per-sample attack results on the undefended model")
    seconds = {a["name"]: a.get("seconds") for a in results["attacks"]}
    # broken[name]: the clean-correct images the attack makes wrong
    broken: Dict[str, set] = {}
    for name in names:
        correct = parse_correct_string(per[f"attack/{name}"])
        broken[name] = {i for i in range(n) if clean[i] and not correct[i]}
    union = set().union(*broken.values())
    shares = []
    for name in names:
        others = set().union(*(b for k, b in broken.items() if k != name))
        accuracy = (clean_correct - len(broken[name])) / n
        shares.append(AttackShare(name, accuracy, len(broken[name]), len(broken[name] - others), seconds.get(name)))
    cover: List[CoverStep] = []
    covered: set = set()
    spent = 0.0
    left = list(names)
    while covered != union:
        best = max(left, key=lambda k: (len(broken[k] - covered), -(seconds.get(k) or 0.0)))
        new = len(broken[best] - covered)
        covered |= broken[best]
        spent += seconds.get(best) or 0.0
        left.remove(best)
        cover.append(CoverStep(best, new, (clean_correct - len(covered)) / n, spent))
    union_accuracy = (clean_correct - len(union)) / n
    worst = parse_correct_string(per["worst/none"]) if per.get("worst/none") else None
    return Coverage(
        n=n,
        clean_correct=clean_correct,
        shares=shares,
        cover=cover,
        union_accuracy=union_accuracy,
        worst_accuracy=sum(worst) / n if worst is not None else union_accuracy,
        total_seconds=sum(seconds.get(name) or 0.0 for name in names),
    )


def _time(s: Optional[float]) -> str:
    return "–" if s is None else f"{s:.0f}"


def format_coverage(c: Coverage) -> str:
    """Markdown: the per-attack table and the greedy cover."""
    L = [
        f"{c.n} images, {c.clean_correct} correct when clean. Breaks: clean-correct images the attack makes wrong; "
        "unique: images no other attack breaks.\n",
        "| attack | accuracy | breaks | unique | time (s) |",
        "|---|---|---|---|---|",
    ]
    for s in sorted(c.shares, key=lambda s: s.accuracy):
        L.append(f"| {s.name} | {100 * s.accuracy:.1f} | {s.breaks} | {s.unique} | {_time(s.seconds)} |")
    L += [
        "",
        "Greedy cover (the attack that breaks the most images not yet broken, the cheaper on a tie):\n",
        "| + attack | newly broken | accuracy so far | time so far (s) | share of the attack time |",
        "|---|---|---|---|---|",
    ]
    for step in c.cover:
        share = f"{100 * step.seconds / c.total_seconds:.0f}%" if c.total_seconds else "–"
        L.append(f"| {step.name} | {step.new} | {100 * step.accuracy:.1f} | {step.seconds:.0f} | {share} |")
    gap = round((c.union_accuracy - c.worst_accuracy) * c.n)
    L.append(
        f"\nAll {len(c.shares)} attacks: {100 * c.union_accuracy:.1f}%. "
        + (
            f"The evaluation's worst case, {100 * c.worst_accuracy:.1f}%, is lower by {gap} images that only "
            "transfers from other models or sources outside this list break."
            if gap > 0
            else "This is the evaluation's worst case on the undefended model."
        )
    )
    return "\n".join(L) + "\n"
