"""``robustdeq evaluate``: the honest robustness evaluation of one checkpoint (docs/design.md §6).

The evaluation is a sequence of named jobs (clean accuracy, each attack, the adaptive
attacks per defense, the analyses, the gradient-masking checks), grouped in families that
the registry of :mod:`.families` declares and orders; each family is a function of the
shared :class:`~.context.EvaluationContext`. Each finished job is saved at once
(``state.json`` plus ``state.pt`` for tensors), so an interrupted run continues where it
stopped. Every attack works on one fixed, seeded test subset shared by every model;
choices (the gate threshold) use the checkpoint's validation split.

Per-sample bookkeeping: for the undefended model and for each defense setting the
evaluator keeps a "still robust" mask and the strongest adversarial input found so far
(largest margin of the real prediction). Attacks made on the undefended model are
transferred to every defense lazily (only where it is still robust), which yields the
non-adaptive number the paper reports; the adaptive attacks then run on the survivors,
and the headline is the per-sample worst case over everything.

Scale-out: the subset is cut into blocks of ``EvalConfig.block`` images. Every batch stays
inside one block and is seeded by its global position, and every choice the attacks make
(the gate threshold, the Eq. 11 surrogate) is taken on the validation split, so a shard of
whole blocks (``shard=``, :mod:`.shards`) computes exactly what one process computes for
those images, and merged shards equal a single run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

from ..attacks import IntermediateAttack
from .adaptive import UNROLL_BATCH
from .clean import choose_gate, clean_accuracy, seed_best_inputs
from .context import SPLITS, EvaluationContext, evaluation_subset
from .families import DEFAULT_FAMILIES, DEFAULT_SHARD_FAMILIES, FAMILIES, SHARDABLE_FAMILIES, SURROGATE_FAMILIES, select
from .shards import Shard
from .surrogate import choose_surrogate, strongest_intermediate
from .transfer import parse_source
from .undefended import transfer_summary

__all__ = [
    "EvalConfig",
    "Evaluator",
    "FAMILIES",
    "DEFAULT_FAMILIES",
    "DEFAULT_SHARD_FAMILIES",
    "SHARDABLE_FAMILIES",
    "SURROGATE_FAMILIES",
    "evaluation_subset",
    "UNROLL_BATCH",
]


@dataclass
class EvalConfig:
    """Every knob of an evaluation; stored with the results and checked on resume."""

    n: int = 1000
    seed: int = 0
    split: str = "test"  # test | val (the checkpoint's own validation split: for model selection)
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    batch_size: int = 200
    families: Tuple[str, ...] = DEFAULT_FAMILIES
    full_grid: bool = False  # paper 1: i in 1..N x K_a in 1..9 x lambda {0.5, 1}
    states: Optional[Tuple[int, ...]] = None  # default: 1, ~3N/8, the early state, N
    unrolls: Tuple[int, ...] = (2, 5)
    lams: Tuple[float, ...] = (0.5, 1.0)
    defenses: Tuple[str, ...] = ("2,10", "2,10,gated")
    gate_quantile: float = 0.95
    val_n: int = 1000
    select_n: int = 200  # validation images on which the Eq. 11 grid chooses the surrogate
    apgd_iters: int = 100
    apgd_targets: int = 3
    square_queries: int = 1000
    defended_square_queries: int = 1000  # the full budget, on every survivor of the white-box attacks
    defended_square_n: Optional[int] = None  # at most this many survivors (None: all)
    defended_apgd_iters: int = 20  # APGD-T through BPDA and through the unroll, per target class
    defended_apgd_targets: int = 9
    adaptive_steps: int = 10
    radii: Tuple[float, ...] = (2 / 255, 4 / 255, 6 / 255, 8 / 255)
    check_n: int = 200
    sweep_eps: Tuple[float, ...] = (8 / 255, 16 / 255, 32 / 255, 64 / 255)
    grid_T_f: Tuple[int, ...] = (1, 2, 4)
    grid_R: Tuple[int, ...] = (1, 5, 10)
    block: int = 1000  # batches never cross a block; shards are whole blocks
    transfer_from: Tuple[str, ...] = ()  # LABEL=FOLDER of finished evaluations of the same subset

    def __post_init__(self):
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown attack families {unknown}; choose from {', '.join(FAMILIES)}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.n < 1 or self.batch_size < 1 or self.block < 1:
            raise ValueError("n, batch_size and block must be >= 1")
        if not 0.0 < self.eps <= 1.0:
            raise ValueError(f"eps must be in (0, 1], got {self.eps}")
        if not 0.0 < self.gate_quantile < 1.0:
            raise ValueError("gate_quantile must be in (0, 1)")
        for source in self.transfer_from:
            parse_source(source)
        if self.full_grid:
            self.unrolls = tuple(range(1, 10))
            self.lams = (0.5, 1.0)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


class Evaluator(EvaluationContext):
    """Runs the jobs of one evaluation into ``out_dir``; see the module docstring.

    The evaluator is the :class:`~.context.EvaluationContext` every family works on, plus the
    order of the run: the clean jobs, then the selected families of :data:`.families.REGISTRY`."""

    def __init__(
        self,
        checkpoint: str,
        out_dir: str,
        config: Optional[EvalConfig] = None,
        device: Optional[str] = None,
        data: Optional[str] = None,
        progress: bool = True,
        restart: bool = False,
        shard: Optional[Shard] = None,
    ):
        config = config or EvalConfig()
        if shard is not None:
            shard.check_families(config, SHARDABLE_FAMILIES)
        super().__init__(checkpoint, out_dir, config, device, data, progress, restart, shard)

    def run(self) -> dict:
        """Run (or continue) every selected job; returns the results dictionary."""
        self.job("clean", lambda: clean_accuracy(self))
        if any(d.gated for d in self.defenses):
            self.job("gate", lambda: choose_gate(self))
        seed_best_inputs(self)
        chosen = select(self.config.families)
        surrogate_due = any(f.surrogate for f in chosen)
        for family in chosen:
            # the surrogate is chosen before the first family that needs it, at the latest when the
            # undefended families are done; the non-adaptive summary closes the undefended families
            if surrogate_due and (family.surrogate or not family.undefended):
                self.job("surrogate", lambda: choose_surrogate(self))
            if not family.undefended:
                self.job("transfer", lambda: transfer_summary(self))
            for name, make in family.jobs(self):
                self.job(name, make)
        self.job("transfer", lambda: transfer_summary(self))
        return self.results()

    def strongest_intermediate(self) -> IntermediateAttack:
        """The Eq. 11 surrogate chosen on validation (:func:`.surrogate.strongest_intermediate`)."""
        return strongest_intermediate(self)

    def results(self) -> dict:
        from .report import assemble_results

        return assemble_results(self)
