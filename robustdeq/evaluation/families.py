"""The registry of evaluation families (docs/design.md §6): each family of jobs declared once, with
its jobs, whether a shard may run it and whether it attacks through the surrogate of paper 1
Eq. 11 chosen on validation. The registry's order is the order a run takes them; ``--attacks``
selects among them by name, and without it every ``default`` family runs (the shape of the
solver registry, :data:`robustdeq.solvers.SOLVERS`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, List

from .analyses import analyses_jobs, masking_checks, radii
from .context import FamilyJobs, Job
from .defended import adaptive_jobs
from .transfer import cross_model_jobs
from .undefended import (
    apgd_adv,
    autoattack_adv,
    ifgsm_adv,
    intermediate_jobs,
    ready_made_adv,
    square_adv,
    undefended_jobs,
)

if TYPE_CHECKING:  # pragma: no cover
    from .context import EvaluationContext

__all__ = [
    "Family",
    "REGISTRY",
    "FAMILIES",
    "DEFAULT_FAMILIES",
    "DEFAULT_SHARD_FAMILIES",
    "SURROGATE_FAMILIES",
    "SHARDABLE_FAMILIES",
    "select",
]


@dataclass(frozen=True)
class Family:
    """One family of evaluation jobs.

    ``jobs(ctx)`` yields (job name, make the record) pairs, one job after the other, so that a
    job may depend on the ones before it. A ``shardable`` family keeps per-sample results that
    merge exactly across shards; the others summarise the whole subset. A ``surrogate`` family
    attacks through the Eq. 11 surrogate: the run chooses it, as its own saved step, before the
    family. An ``undefended`` family attacks the undefended model, and its inputs are transferred
    to every defense: the non-adaptive summary (job ``transfer``) follows these families."""

    name: str
    jobs: FamilyJobs
    shardable: bool = True
    surrogate: bool = False
    undefended: bool = False
    default: bool = True  # run when --attacks names no family


def single_job(name: str, make: Callable[["EvaluationContext"], dict]) -> FamilyJobs:
    """The jobs of a family of one job, ``name``, made by ``make(ctx)``."""

    def jobs(ctx: "EvaluationContext") -> Iterator[Job]:
        yield name, lambda: make(ctx)

    return jobs


REGISTRY: Dict[str, Family] = {
    f.name: f
    for f in (
        Family("pgd", undefended_jobs("pgd-ready", ready_made_adv), undefended=True),
        Family("ifgsm", undefended_jobs("ifgsm", ifgsm_adv), undefended=True),
        Family("intermediate", intermediate_jobs, surrogate=True, undefended=True),
        Family("apgd-ce", undefended_jobs("apgd-ce", apgd_adv("ce")), surrogate=True, undefended=True),
        Family("apgd-t", undefended_jobs("apgd-t", apgd_adv("t")), surrogate=True, undefended=True),
        Family("square", undefended_jobs("square", square_adv), undefended=True),
        # the reference AutoAttack as RobustBench runs it; hours on a CPU, so only when asked for
        Family(
            "autoattack",
            undefended_jobs("autoattack-standard", autoattack_adv),
            surrogate=True,
            undefended=True,
            default=False,
        ),
        Family("adaptive", adaptive_jobs, surrogate=True),
        Family("cross-model", cross_model_jobs),
        Family("radii", single_job("radii", radii)),
        Family("analyses", analyses_jobs, shardable=False, surrogate=True),
        # the checks ask for the surrogate inside their job, on first use (no step of its own before them)
        Family("checks", single_job("checks", masking_checks), shardable=False),
    )
}

#: every family's name, in run order
FAMILIES = tuple(REGISTRY)
#: the families a run takes when --attacks names none
DEFAULT_FAMILIES = tuple(name for name, f in REGISTRY.items() if f.default)
#: the families that attack through the Eq. 11 surrogate chosen on validation (job ``surrogate``)
SURROGATE_FAMILIES = frozenset(name for name, f in REGISTRY.items() if f.surrogate)
#: the families a shard may run: per-sample results that merge exactly (the analyses and the
#: checks summarise the whole subset; run them in one process, e.g. on the merged folder)
SHARDABLE_FAMILIES = tuple(name for name, f in REGISTRY.items() if f.shardable)
#: the families a shard takes when --attacks names none
DEFAULT_SHARD_FAMILIES = tuple(name for name in SHARDABLE_FAMILIES if REGISTRY[name].default)


def select(names: Iterable[str]) -> List[Family]:
    """The registry's families named in ``names`` (checked by ``EvalConfig``), in run order."""
    chosen = set(names)
    return [f for f in REGISTRY.values() if f.name in chosen]
