"""``robustdeq evaluate``: the honest robustness evaluation of one checkpoint (DESIGN.md §6).

The evaluation is a sequence of named jobs (clean accuracy, each attack, the adaptive
attacks per defense, the analyses, the gradient-masking checks). Each finished job is
saved at once (``state.json`` plus ``state.pt`` for tensors), so an interrupted run
continues where it stopped. Every attack works on one fixed, seeded test subset shared
by every model; choices (the gate threshold) use the checkpoint's validation split.

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

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..attacks import (
    margin,
)
from ..defense import DefenseSetting
from ..stats import Proportion, correct_string
from .adaptive import defended_logits, readout_logits
from .analyses import PaperAnalyses
from .common import BestInput, median_ratio, seed_of, utc_now
from .defended import UNROLL_BATCH, DefenseAttacks
from .shards import Shard
from .transfer import CrossModelTransfer, parse_source
from .undefended import UndefendedAttacks

FAMILIES = (
    "pgd",
    "ifgsm",
    "intermediate",
    "apgd-ce",
    "apgd-t",
    "square",
    "adaptive",
    "cross-model",
    "radii",
    "analyses",
    "checks",
)
#: the families that attack through the Eq. 11 surrogate chosen on validation (job ``surrogate``):
#: ``run`` makes the choice before them, as its own logged and saved step; any other caller of
#: ``strongest_intermediate`` makes it on first use, so no selection of families gets a weaker gradient
SURROGATE_FAMILIES = frozenset({"intermediate", "apgd-ce", "apgd-t", "adaptive", "analyses"})
STATE_FORMAT = 2  # 2: surrogate chosen on validation, block-aligned batches, shards
#: the families a shard may run: per-sample results that merge exactly (the analyses and the
#: checks summarise the whole subset; run them in one process, e.g. on the merged folder)
SHARDABLE_FAMILIES = tuple(f for f in FAMILIES if f not in ("analyses", "checks"))

__all__ = ["EvalConfig", "Evaluator", "FAMILIES", "SURROGATE_FAMILIES", "evaluation_subset", "UNROLL_BATCH"]


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
    families: Tuple[str, ...] = FAMILIES
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


#: the image pools an evaluation can draw its subset from
SPLITS = ("test", "val")


def evaluation_subset(split, n: int, seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The fixed test subset: a seeded permutation of the test split (the archive stores it
    grouped by class), first ``n``. Returns (indices into the split, images uint8, labels)."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]
    return order, split.images[order], split.labels[order]


class Evaluator(UndefendedAttacks, DefenseAttacks, CrossModelTransfer, PaperAnalyses):
    """Runs the jobs of one evaluation into ``out_dir``; see the module docstring.

    This class holds the shared state (model, subset, per-sample best inputs, saved jobs) and
    the order of the jobs; each family of jobs lives in its own module: ``undefended``,
    ``defended``, ``transfer`` and ``analyses``."""

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
        from ..checkpoint import file_sha256, load_checkpoint
        from ..data import load_cifar10

        self.config = config or EvalConfig()
        self.progress = progress
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.checkpoint_path = str(checkpoint)
        self.ckpt = load_checkpoint(checkpoint, map_location="cpu")
        self.checkpoint_sha256 = file_sha256(self.checkpoint_path)
        self.model = self.ckpt.build_model(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.k = self.model.readout_index()
        self.N = self.model.n_steps
        self.data_arg = data
        pool = (
            load_cifar10("test", data, progress=progress) if self.config.split == "test" else self._validation_split()
        )
        order, images, labels = evaluation_subset(pool, self.config.n, self.config.seed)
        self._pool_identity = (pool.fingerprint, len(pool))
        # the identity of the whole subset, whichever shard of it this process evaluates
        self.subset_id = self.subset_id_of(self.config.n)
        self.shard = shard
        start, stop = (0, len(order)) if shard is None else shard.bounds(len(order), self.config.block)
        if shard is not None:
            shard.check_families(self.config, SHARDABLE_FAMILIES)
        self.offset = start  # global position of this process's first image (a block boundary)
        self.indices = order[start:stop]
        self.x = images[start:stop].float().div(255.0)
        self.y = labels[start:stop].clone()
        self.n = len(self.y)
        self.defenses = [DefenseSetting.parse(s) for s in self.config.defenses]
        self.defenses = [d for d in self.defenses if not d.is_plain]
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.jobs: Dict[str, dict] = {}
        self.best: Dict[str, BestInput] = {}
        self._load_state(restart)

    def subset_id_of(self, n: int) -> str:
        """The identity of the first ``n`` images of this evaluation's seeded order. Subsets of one
        seed and split are prefixes of each other: a larger evaluation holds this one's images first."""
        fingerprint, size = self._pool_identity
        order = torch.randperm(size, generator=torch.Generator().manual_seed(self.config.seed))[:n]
        return hashlib.sha256(fingerprint.encode() + order.numpy().tobytes()).hexdigest()[:16]

    # ---- persistence -------------------------------------------------------------------
    def _identity(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "checkpoint_sha256": self.checkpoint_sha256,
            "subset_id": self.subset_id,
            "config": self.config.to_dict(),
            "shard": None if self.shard is None else self.shard.to_dict(self.offset, self.offset + self.n),
        }

    def _load_state(self, restart: bool) -> None:
        path = self.out / "state.json"
        if restart or not path.exists():
            return
        saved = json.loads(path.read_text())
        if (saved.get("identity") or {}).get("format") != STATE_FORMAT:
            raise ValueError(
                f"{self.out} holds an evaluation written by an older version of the evaluator "
                f"(state format {(saved.get('identity') or {}).get('format')}, now {STATE_FORMAT}); "
                "use another --out, or --restart to discard it"
            )
        if _without_families(saved.get("identity")) != _without_families(self._identity()):
            raise ValueError(
                f"{self.out} holds an evaluation of another checkpoint or with other settings; "
                "use another --out, or --restart to discard it"
            )
        self.jobs = saved["jobs"]
        self._date_undated_jobs()
        tensors = torch.load(self.out / "state.pt", map_location="cpu", weights_only=True)
        self.best = {k: BestInput(tensors[f"{k}/x"], tensors[f"{k}/margin"]) for k in saved["best"]}
        if self.jobs.get("gate"):
            self._apply_threshold(self.jobs["gate"]["threshold"])

    def _date_undated_jobs(self) -> None:
        """Jobs saved before jobs were dated get the date of the outputs they made, so that
        resuming such an evaluation keeps its date (the outputs are dated by the last job)."""
        undated = [job for job in self.jobs.values() if isinstance(job, dict) and "finished" not in job]
        results = self.out / "results.json"
        written = json.loads(results.read_text()).get("date") if undated and results.exists() else None
        for job in undated if written else []:
            job["finished"] = written

    def _save(self) -> None:
        tensors = {}
        for k, b in self.best.items():
            tensors[f"{k}/x"], tensors[f"{k}/margin"] = b.x, b.margin
        tmp = self.out / "state.pt.tmp"
        torch.save(tensors, tmp)
        os.replace(tmp, self.out / "state.pt")
        state = {
            "identity": self._identity(),
            "checkpoint": self.checkpoint_path,
            "data": self.data_arg,
            "jobs": self.jobs,
            "best": sorted(self.best),
        }
        tmp = self.out / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.out / "state.json")

    def _job(self, name: str, fn: Callable[[], dict]) -> dict:
        if name not in self.jobs:
            t0 = time.perf_counter()
            result = fn()
            result["seconds"] = round(time.perf_counter() - t0, 2)
            result["finished"] = utc_now()
            self.jobs[name] = result
            self._save()
            print(_job_line(name, result), file=sys.stderr, flush=True)
        return self.jobs[name]

    # ---- batching ----------------------------------------------------------------------
    def _bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="img", leave=False, disable=not self.progress)

    def _chunks(self, idx: Tensor, batch: Optional[int] = None) -> List[Tensor]:
        """Batches of at most ``batch`` of the (sorted) sample indices ``idx``, none crossing a
        block, so that each batch holds the same images in a single run and in a shard."""
        b = batch or self.config.batch_size
        out: List[Tensor] = []
        if not len(idx):
            return out
        blocks = (idx + self.offset) // self.config.block
        edges = [0] + (torch.nonzero(blocks[1:] != blocks[:-1]).squeeze(1) + 1).tolist() + [len(idx)]
        for lo, hi in zip(edges[:-1], edges[1:]):
            out += [idx[i : min(i + b, hi)] for i in range(lo, hi, b)]
        return out

    def _seed(self, name: str, chunk: Tensor) -> int:
        """The seed of one batch of one job: by its first image's position in the whole subset."""
        return seed_of(self.config.seed, name, self.offset + int(chunk[0]))

    def _map(self, fn: Callable[[Tensor, Tensor, Tensor], Tensor], x_all: Tensor, idx: Tensor, desc: str, batch=None):
        """Apply ``fn(idx_chunk, x, y) -> per-sample tensor`` over ``idx`` in batches."""
        outs = []
        with self._bar(len(idx), desc) as bar:
            for chunk in self._chunks(idx, batch):
                x = x_all[chunk].to(self.device)
                y = self.y[chunk].to(self.device)
                outs.append(fn(chunk, x, y).detach().cpu())
                bar.update(len(chunk))
        return torch.cat(outs) if outs else torch.empty(0)

    def _all(self) -> Tensor:
        return torch.arange(self.n)

    # ---- predictions -------------------------------------------------------------------
    def _logits(self, setting: Optional[DefenseSetting], x: Tensor) -> Tensor:
        return readout_logits(self.model, x) if setting is None else defended_logits(self.model, x, setting)

    def _key(self, setting: Optional[DefenseSetting]) -> str:
        return "none" if setting is None else setting.name

    def _evaluate_candidates(self, setting: Optional[DefenseSetting], x_cand: Tensor, idx: Tensor, desc: str):
        """Real predictions of ``setting`` on candidate inputs for samples ``idx``; updates
        that setting's per-sample best. Returns the margins."""
        key = self._key(setting)

        def fn(chunk, x, y):
            return margin(self._logits(setting, x), y)

        m = self._map(fn, x_cand, idx, desc) if len(idx) else torch.empty(0)
        if len(idx):
            self.best[key].update(idx, x_cand[idx], m)
        return m

    def _robust(self, setting: Optional[DefenseSetting]) -> Tensor:
        return self.best[self._key(setting)].robust

    def _prop(self, correct: Tensor) -> dict:
        return Proportion.of(int(correct.sum()), int(correct.numel())).to_dict()

    # ---- the run -----------------------------------------------------------------------
    def run(self) -> dict:
        """Run (or continue) every selected job; returns the results dictionary."""
        fam = set(self.config.families)
        self._job("clean", self._clean)
        if any(d.gated for d in self.defenses):
            self._job("gate", self._choose_gate)
        self._ensure_best()
        if "pgd" in fam:
            self._job("pgd-ready", lambda: self._undefended_attack("pgd-ready", self._ready_made_adv))
        if "ifgsm" in fam:
            self._job("ifgsm", lambda: self._undefended_attack("ifgsm", self._ifgsm_adv))
        if fam & SURROGATE_FAMILIES:
            self._job("surrogate", self._choose_surrogate)
        if "intermediate" in fam:
            for a in self._grid():
                self._job(a.name, lambda a=a: self._undefended_attack(a.name, self._intermediate_adv(a), attack=a))
        if "apgd-ce" in fam:
            self._job("apgd-ce", lambda: self._undefended_attack("apgd-ce", self._apgd_adv("ce")))
        if "apgd-t" in fam:
            self._job("apgd-t", lambda: self._undefended_attack("apgd-t", self._apgd_adv("t")))
        if "square" in fam:
            self._job("square", lambda: self._undefended_attack("square", self._square_adv))
        self._job("transfer", self._transfer_summary)
        if "adaptive" in fam:
            for d in self.defenses:
                self._job(f"{d.name}/bpda", lambda d=d: self._adaptive_pgd(d, "bpda"))
                self._job(f"{d.name}/unroll", lambda d=d: self._adaptive_pgd(d, "unroll"))
                for mode in ("bpda", "unroll"):
                    self._job(f"{d.name}/apgd-t-{mode}", lambda d=d, mode=mode: self._adaptive_apgd_t(d, mode))
                if d.gated:
                    self._job(f"{d.name}/gate-aware", lambda d=d: self._gate_aware(d))
                self._job(f"{d.name}/square", lambda d=d: self._defended_square(d))
        if "cross-model" in fam:
            for label, folder in map(parse_source, self.config.transfer_from):
                self._job(f"cross-model/{label}", lambda label=label, folder=folder: self._transfer_in(label, folder))
        if "radii" in fam:
            self._job("radii", self._radii)
        if "analyses" in fam:
            self._job("dynamics", self._dynamics_analysis)
            self._job("transfer-matrix", self._transfer_matrix)
            if self.defenses:
                self._job("tf-r-grid", self._tf_r_grid)
        if "checks" in fam:
            self._job("checks", self._masking_checks)
        return self.results()

    # ---- jobs: clean and gate ----------------------------------------------------------
    def _clean(self) -> dict:
        N, k = self.N, self.k
        per_state = torch.zeros(N, dtype=torch.long)
        entropies = torch.zeros(N)
        correct_k, margins, h_final, h_k = [], [], [], []
        with self._bar(self.n, "clean") as bar:
            for chunk in self._chunks(self._all()):
                x, y = self.x[chunk].to(self.device), self.y[chunk].to(self.device)
                with torch.no_grad():
                    traj = self.model.trajectory(x)
                    logits = traj.all_logits(1)
                    per_state += (logits.argmax(-1) == y.view(-1, 1)).sum(0).cpu()
                    entropies += traj.entropies(1).sum(0).cpu()
                    margins.append(margin(traj.logits(k), y).cpu())
                    h_final.append(traj.entropy(-1).cpu())
                    h_k.append(traj.entropy(k).cpu())
                bar.update(len(chunk))
        m = torch.cat(margins)
        correct_k = m <= 0
        out = {
            "state": k,
            "acc": self._prop(correct_k),
            "correct": correct_string(correct_k.tolist()),
            "acc_per_state": (per_state.float() / self.n).tolist(),
            "mean_entropy_per_state": (entropies / self.n).tolist(),
            "entropy_final": torch.cat(h_final).tolist(),
            "entropy_readout": torch.cat(h_k).tolist(),
            "margin": m.tolist(),
            "defenses": {},
        }
        return out

    def _choose_gate(self) -> dict:
        """Gate threshold: the ``gate_quantile`` of clean validation entropy at the gate state."""
        val = self._validation_split()
        n = min(self.config.val_n, len(val))
        xv = val.images[:n].float().div(255.0)
        gate = self._gate_state()
        hs = []
        with self._bar(n, "gate threshold (validation)") as bar:
            for i in range(0, n, self.config.batch_size):
                with torch.no_grad():
                    hs.append(self.model.trajectory(xv[i : i + self.config.batch_size].to(self.device)).entropy(gate))
                bar.update(min(self.config.batch_size, n - i))
        h = torch.cat(hs).cpu()
        threshold = float(torch.quantile(h, self.config.gate_quantile))
        self._apply_threshold(threshold)
        return {
            "threshold": threshold,
            "gate_state": gate,
            "quantile": self.config.gate_quantile,
            "val_n": n,
            "split": "validation split of the checkpoint's training run",
        }

    def _validation_split(self):
        """The held-out validation split of the checkpoint's training run (never the test set)."""
        from ..data import load_cifar10, train_val_split

        if not getattr(self, "_val", None):
            full = load_cifar10("train", self.data_arg, progress=self.progress)
            self.ckpt.check_dataset(full.fingerprint)
            _, self._val, _ = train_val_split(full, int(self.ckpt.data["val_size"]), int(self.ckpt.data["split_seed"]))
        return self._val

    def _gate_state(self) -> int:
        """The gate reads the entropy at the early state unless a setting names another."""
        states = {d.gate_state for d in self.defenses if d.gated and d.gate_state is not None}
        return (states.pop() % (self.N + 1)) if states else self.k

    def _apply_threshold(self, threshold: float) -> None:
        gate = self._gate_state()
        for i, d in enumerate(self.defenses):
            if d.gated:
                self.defenses[i] = replace(d, threshold=threshold, gate_state=gate)

    def _timed_defense(self, d: DefenseSetting, x_all: Tensor, desc: str) -> Tuple[Tensor, Optional[float]]:
        """One pass of ``d`` over ``x_all``: [n, 3] (margin, ran, perturbation) per sample, and
        the median per-batch cost relative to plain inference timed in the same loop."""
        t_plain: List[float] = []
        t_def: List[float] = []

        def fn(chunk, x, y):
            t0 = time.perf_counter()
            readout_logits(self.model, x)
            t1 = time.perf_counter()
            res = d.run(self.model, x)
            t_def.append(time.perf_counter() - t1)
            t_plain.append(t1 - t0)
            return torch.stack([margin(res.trajectory.logits(self.k), y), res.ran.float(), res.perturbation], 1)

        return self._map(fn, x_all, self._all(), desc), median_ratio(t_def, t_plain)

    def _ensure_best(self) -> None:
        """Initialise the per-setting bests from the clean inputs (and clean defended results)."""
        if "none" not in self.best:
            self.best["none"] = BestInput(self.x, torch.tensor(self.jobs["clean"]["margin"]))
        changed = False
        for d in self.defenses:
            if d.name in self.best:
                continue
            out, cost = self._timed_defense(d, self.x, f"clean, {d.name}")
            self.best[d.name] = BestInput(self.x, out[:, 0])
            self.jobs["clean"]["defenses"][d.name] = {
                "setting": d.to_dict(),
                "acc": self._prop(out[:, 0] <= 0),
                "correct": correct_string((out[:, 0] <= 0).tolist()),
                "trigger_rate": float(out[:, 1].mean()),
                "mean_perturbation": float(out[:, 2].mean()),
                "cost_vs_plain": cost,
            }
            changed = True
        if changed:
            self._save()

    def results(self) -> dict:
        from .report import assemble_results

        return assemble_results(self)


def _job_line(name: str, result: dict) -> str:
    """One log line per finished job (stderr), so that a run without progress bars still says
    where it is: the job, its accuracy and the worst case so far where it has them, its time."""
    parts = [f"{time.strftime('%H:%M:%S')} {name}"]
    acc = result.get("acc")
    acc = acc.get("acc") if isinstance(acc, dict) else acc
    if isinstance(acc, (int, float)):
        parts.append(f"accuracy {100 * acc:.1f}%")
    if "attacked" in result:
        parts.append(f"attacked {result['attacked']}, flipped {result.get('flipped', 0)}")
    worst = result.get("worst_case_so_far") or result.get("after")
    if isinstance(worst, dict) and isinstance(worst.get("acc"), (int, float)):
        parts.append(f"worst case so far {100 * worst['acc']:.1f}%")
    return "evaluate: " + ", ".join(parts) + f" ({result['seconds']:.0f} s)"


def _without_families(identity: Optional[dict]) -> Optional[dict]:
    """Resume compatibility ignores the attack families and the transfer sources: adding one
    to a finished evaluation runs just the new jobs (each job is named and seeded on its own)."""
    if not identity:
        return identity
    return {
        **identity,
        "config": {k: v for k, v in identity["config"].items() if k not in ("families", "transfer_from")},
    }
