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
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attacks import (
    IntermediateAttack,
    ifgsm_steps,
    intermediate_grid,
    margin,
    pgd_linf,
)
from ..defense import DefenseSetting
from ..dynamics import phantom_forward
from ..stats import Proportion, correct_string
from .adaptive import (
    defended_logits,
    defended_surrogate_logits,
    gate_aware_loss,
    readout_logits,
    surrogate_logits,
)

FAMILIES = (
    "pgd",
    "ifgsm",
    "intermediate",
    "apgd-ce",
    "apgd-t",
    "square",
    "adaptive",
    "radii",
    "analyses",
    "checks",
)
STATE_FORMAT = 1
# The full unroll keeps a second-order graph of all N / T_f * R entropy steps alive (about
# 100 MB per image for deq-tiny at T_f = 2, R = 10), so it runs in small batches.
UNROLL_BATCH = 25

__all__ = ["EvalConfig", "Evaluator", "FAMILIES", "evaluation_subset"]


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
    apgd_iters: int = 100
    apgd_targets: int = 3
    square_queries: int = 1000
    defended_square_queries: int = 100
    defended_square_n: int = 100
    adaptive_steps: int = 10
    radii: Tuple[float, ...] = (2 / 255, 4 / 255, 6 / 255, 8 / 255)
    check_n: int = 200
    sweep_eps: Tuple[float, ...] = (8 / 255, 16 / 255, 32 / 255, 64 / 255)
    grid_T_f: Tuple[int, ...] = (1, 2, 4)
    grid_R: Tuple[int, ...] = (1, 5, 10)

    def __post_init__(self):
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown attack families {unknown}; choose from {', '.join(FAMILIES)}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.n < 1 or self.batch_size < 1:
            raise ValueError("n and batch_size must be >= 1")
        if not 0.0 < self.eps <= 1.0:
            raise ValueError(f"eps must be in (0, 1], got {self.eps}")
        if not 0.0 < self.gate_quantile < 1.0:
            raise ValueError("gate_quantile must be in (0, 1)")
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


def _seed_of(*parts) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


class _Best:
    """Per-sample strongest input so far: largest margin of the real prediction (margin > 0
    means fooled). Updating with any batch of candidates keeps the elementwise best."""

    def __init__(self, x: Tensor, margins: Tensor):
        self.x, self.margin = x.clone(), margins.clone()

    def update(self, idx: Tensor, x_cand: Tensor, m_cand: Tensor) -> None:
        better = m_cand > self.margin[idx]
        if bool(better.any()):
            sel = idx[better]
            self.x[sel] = x_cand[better].to(self.x.device, self.x.dtype)
            self.margin[sel] = m_cand[better].to(self.margin.dtype)

    @property
    def robust(self) -> Tensor:
        return self.margin <= 0


class Evaluator:
    """Runs the jobs of one evaluation into ``out_dir``; see the module docstring."""

    def __init__(
        self,
        checkpoint: str,
        out_dir: str,
        config: Optional[EvalConfig] = None,
        device: Optional[str] = None,
        data: Optional[str] = None,
        progress: bool = True,
        restart: bool = False,
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
        self.indices, images, labels = evaluation_subset(pool, self.config.n, self.config.seed)
        self.x = images.float().div(255.0)
        self.y = labels.clone()
        self.n = len(self.y)
        self.subset_id = hashlib.sha256(pool.fingerprint.encode() + self.indices.numpy().tobytes()).hexdigest()[:16]
        self.defenses = [DefenseSetting.parse(s) for s in self.config.defenses]
        self.defenses = [d for d in self.defenses if not d.is_plain]
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.jobs: Dict[str, dict] = {}
        self.best: Dict[str, _Best] = {}
        self._load_state(restart)

    # ---- persistence -------------------------------------------------------------------
    def _identity(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "checkpoint_sha256": self.checkpoint_sha256,
            "subset_id": self.subset_id,
            "config": self.config.to_dict(),
        }

    def _load_state(self, restart: bool) -> None:
        path = self.out / "state.json"
        if restart or not path.exists():
            return
        saved = json.loads(path.read_text())
        if _without_families(saved.get("identity")) != _without_families(self._identity()):
            raise ValueError(
                f"{self.out} holds an evaluation of another checkpoint or with other settings; "
                "use another --out, or --restart to discard it"
            )
        self.jobs = saved["jobs"]
        tensors = torch.load(self.out / "state.pt", map_location="cpu", weights_only=True)
        self.best = {k: _Best(tensors[f"{k}/x"], tensors[f"{k}/margin"]) for k in saved["best"]}
        if self.jobs.get("gate"):
            self._apply_threshold(self.jobs["gate"]["threshold"])

    def _save(self) -> None:
        tensors = {}
        for k, b in self.best.items():
            tensors[f"{k}/x"], tensors[f"{k}/margin"] = b.x, b.margin
        tmp = self.out / "state.pt.tmp"
        torch.save(tensors, tmp)
        os.replace(tmp, self.out / "state.pt")
        state = {"identity": self._identity(), "jobs": self.jobs, "best": sorted(self.best)}
        tmp = self.out / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.out / "state.json")

    def _job(self, name: str, fn: Callable[[], dict]) -> dict:
        if name not in self.jobs:
            t0 = time.perf_counter()
            result = fn()
            result["seconds"] = round(time.perf_counter() - t0, 2)
            self.jobs[name] = result
            self._save()
        return self.jobs[name]

    # ---- batching ----------------------------------------------------------------------
    def _bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="img", leave=False, disable=not self.progress)

    def _chunks(self, idx: Tensor, batch: Optional[int] = None) -> List[Tensor]:
        b = batch or self.config.batch_size
        return [idx[i : i + b] for i in range(0, len(idx), b)]

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
                if d.gated:
                    self._job(f"{d.name}/gate-aware", lambda d=d: self._gate_aware(d))
                self._job(f"{d.name}/square", lambda d=d: self._defended_square(d))
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

        return self._map(fn, x_all, self._all(), desc), _median_ratio(t_def, t_plain)

    def _ensure_best(self) -> None:
        """Initialise the per-setting bests from the clean inputs (and clean defended results)."""
        if "none" not in self.best:
            self.best["none"] = _Best(self.x, torch.tensor(self.jobs["clean"]["margin"]))
        changed = False
        for d in self.defenses:
            if d.name in self.best:
                continue
            out, cost = self._timed_defense(d, self.x, f"clean, {d.name}")
            self.best[d.name] = _Best(self.x, out[:, 0])
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

    # ---- jobs: attacks on the undefended model ------------------------------------------
    def _grid(self) -> List[IntermediateAttack]:
        c = self.config
        states = c.states
        if states is None and not c.full_grid:
            states = sorted({1, max(1, round(3 * self.N / 8)), self.k if self.k >= 1 else self.N, self.N})
        return intermediate_grid(self.N, states, c.unrolls, c.lams)

    def strongest_intermediate(self) -> IntermediateAttack:
        """The grid attack with the lowest accuracy at the early state (ties: first)."""
        grid = [a for a in self._grid() if a.name in self.jobs]
        if not grid:
            return IntermediateAttack(max(1, round(3 * self.N / 8)), 5, 0.5)
        return min(grid, key=lambda a: self.jobs[a.name]["acc"]["acc"])

    def _pgd(self, loss_fn, x, y, gen, steps=None, step_size=None, eps=None, random_start=True, x_init=None):
        c = self.config
        return pgd_linf(
            loss_fn,
            x,
            c.eps if eps is None else eps,
            c.step_size if step_size is None else step_size,
            c.steps if steps is None else steps,
            random_start=random_start,
            generator=gen,
            x_init=x_init,
        )

    def _tracked_pgd(self, name, surrogate, setting=None, idx=None, steps=None, eps=None, step_size=None,
                     random_start=True, x_start=None, batch=None):  # fmt: skip
        """PGD ascending ``surrogate(x, y) -> (real logits, per-sample loss)``; every iterate's real
        prediction updates the setting's per-sample best (so a fooling iterate counts)."""
        idx = self._all() if idx is None else idx
        key = self._key(setting)
        last: Dict[str, Tensor] = {}

        def fn(chunk, x, y):
            gen = torch.Generator().manual_seed(_seed_of(self.config.seed, name, int(chunk[0])))

            def loss_fn(xa):
                real, loss = surrogate(xa, y)
                self.best[key].update(chunk, xa.detach().cpu(), margin(real.detach(), y).cpu())
                return loss

            x_init = None if x_start is None else x_start[chunk].to(self.device)
            x_adv = self._pgd(loss_fn, x, y, gen, steps, step_size, eps, random_start, x_init)
            with torch.no_grad():
                real = self._logits(setting, x_adv)
            m = margin(real, y)
            self.best[key].update(chunk, x_adv.cpu(), m.cpu())
            last.setdefault("x", []).append(x_adv.cpu())
            return m

        self._map(fn, self.x, idx, name, batch)
        return torch.cat(last["x"]) if last else self.x[idx]

    def _plain_surrogate(self, logits_fn: Callable[[Tensor], Tensor]):
        """(real early-state logits, CE of ``logits_fn``) for attacks on the undefended model."""

        def surrogate(xa, y):
            return readout_logits(self.model, xa), _ce(logits_fn(xa), y)

        return surrogate

    def _ready_made_surrogate(self, n_steps: Optional[int] = None):
        """The ready-made gradient (paper 1 Sec. 4): phantom gradient of z[n_steps] (default z[N])."""
        return self._plain_surrogate(lambda xa: phantom_forward(self.model, xa, n_steps=n_steps).logits)

    def _isolated_pgd(self, label: str, surrogate, idx: Optional[Tensor] = None, **kw) -> Tensor:
        """Run a tracked PGD on the undefended model with its own tracker, so that it does not
        enter the evaluation's worst case; returns the per-sample robust mask."""
        saved = self.best["none"]
        self.best["none"] = _Best(self.x, torch.tensor(self.jobs["clean"]["margin"]))
        try:
            self._tracked_pgd(label, surrogate, idx=idx, **kw)
            return self.best["none"].robust
        finally:
            self.best["none"] = saved

    def _ready_made_adv(self, name: str) -> Tensor:
        """Ready-made PGD (paper 1 Sec. 4): the phantom gradient of z[N]."""
        return self._tracked_pgd(name, self._ready_made_surrogate())

    def _ifgsm_adv(self, name: str) -> Tensor:
        """I-FGSM of paper 2 (Eq. 13-14): no random start, step 1/255, n from Eq. 14."""
        return self._tracked_pgd(
            name, self._ready_made_surrogate(), steps=ifgsm_steps(self.config.eps), step_size=1 / 255,
            random_start=False,
        )  # fmt: skip

    def _intermediate_adv(self, attack: IntermediateAttack) -> Callable[[str], Tensor]:
        def make(name: str) -> Tensor:
            return self._tracked_pgd(name, self._plain_surrogate(lambda xa: attack.logits(self.model, xa)))

        return make

    def _apgd_adv(self, kind: str) -> Callable[[str], Tensor]:
        """APGD-CE / APGD-T of the reference AutoAttack code (``pyautoattack``), attacking the
        real early-state prediction through the strongest Eq. 11 gradient."""

        def make(name: str) -> Tensor:
            from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

            attack = self.strongest_intermediate()

            def predict(xa):
                return surrogate_logits(self.model, xa, attack)

            c = self.config
            if kind == "ce":
                apgd = APGDAttack(predict, n_iter=c.apgd_iters, eps=c.eps, seed=c.seed, loss="ce", device=self.device)
            else:
                apgd = APGDAttack_targeted(
                    predict, n_iter=c.apgd_iters, eps=c.eps, seed=c.seed, n_target_classes=c.apgd_targets,
                    device=self.device,
                )  # fmt: skip

            def fn(chunk, x, y):
                return apgd.perturb(x, y)

            return self._map(fn, self.x, self._all(), name)

        return make

    def _square_adv(self, name: str) -> Tensor:
        """Square (black box, margin loss) on the real early-state prediction."""
        from pyautoattack.square import SquareAttack

        c = self.config

        def predict(xa):
            return readout_logits(self.model, xa)

        sq = SquareAttack(predict, n_queries=c.square_queries, eps=c.eps, seed=c.seed, device=self.device)

        def fn(chunk, x, y):
            with torch.no_grad():
                return sq.perturb(x, y)

        return self._map(fn, self.x, self._all(), name)

    def _undefended_attack(self, name: str, make_adv: Callable[[str], Tensor], attack=None) -> dict:
        """Make adversarial inputs on the undefended model, score them at every state, and
        transfer them to every defense where it is still robust."""
        x_adv = make_adv(name)
        k, N = self.k, self.N
        per_state = torch.zeros(N, dtype=torch.long)
        entropies = torch.zeros(N)
        h_clean = torch.tensor(self.jobs["clean"]["entropy_final"])
        m_all, h_all = [], []
        for chunk in self._chunks(self._all()):
            x, y = x_adv[chunk].to(self.device), self.y[chunk].to(self.device)
            with torch.no_grad():
                traj = self.model.trajectory(x)
                per_state += (traj.all_logits(1).argmax(-1) == y.view(-1, 1)).sum(0).cpu()
                entropies += traj.entropies(1).sum(0).cpu()
                m_all.append(margin(traj.logits(k), y).cpu())
                h_all.append(traj.entropy(-1).cpu())
        m, h_adv = torch.cat(m_all), torch.cat(h_all)
        self.best["none"].update(self._all(), x_adv, m)
        transfer = {}
        for d in self.defenses:
            idx = self._robust(d).nonzero().squeeze(1)
            before = len(idx)
            self._evaluate_candidates(d, x_adv, idx, f"{name} -> {d.name}")
            transfer[d.name] = {"attacked": before, "still_robust": int(self._robust(d).sum())}
        correct = m <= 0
        return {
            "attack": attack.name if attack is not None else name,
            "surrogate": None if attack is None else asdict(attack),
            "acc": self._prop(correct),
            "correct": correct_string(correct.tolist()),
            "acc_per_state": (per_state.float() / self.n).tolist(),
            "mean_entropy_per_state": (entropies / self.n).tolist(),
            # paper 1 Eq. 12-13 at z* = z[N]: clean entropy lower than perturbed, and the mean gap
            "P": float((h_clean < h_adv).float().mean()),
            "delta_H": float((h_clean - h_adv).mean()),
            "max_perturbation": float((x_adv - self.x).abs().amax()),
            "worst_case_so_far": self._prop(self._robust(None)),
            "transfer": transfer,
        }

    def _transfer_summary(self) -> dict:
        """The non-adaptive numbers: each defense under every attack made on the undefended model."""
        out = {"none": self._prop(self._robust(None))}
        for d in self.defenses:
            out[d.name] = {**self._prop(self._robust(d)), "correct": correct_string(self._robust(d).tolist())}
        out["none"]["correct"] = correct_string(self._robust(None).tolist())
        return out

    # ---- jobs: adaptive attacks on the defenses -----------------------------------------
    def _adaptive_pgd(self, d: DefenseSetting, mode: str) -> dict:
        attack = self.strongest_intermediate()
        idx = self._robust(d).nonzero().squeeze(1)
        before = len(idx)
        if before:

            def surrogate(xa, y):
                real, surr = defended_surrogate_logits(self.model, xa, d, attack, mode)
                return real, _ce(surr, y)

            self._tracked_pgd(
                f"{d.name}/{mode}", surrogate, setting=d, idx=idx, steps=self.config.adaptive_steps,
                x_start=self.best[d.name].x, batch=UNROLL_BATCH if mode == "unroll" else None,
            )  # fmt: skip
        return self._adaptive_record(d, mode, before, attack)

    def _gate_aware(self, d: DefenseSetting) -> dict:
        attack = self.strongest_intermediate()
        idx = self._robust(d).nonzero().squeeze(1)
        before = len(idx)
        if before:

            def surrogate(xa, y):
                return defended_logits(self.model, xa, d), gate_aware_loss(self.model, xa, y, d, attack)

            self._tracked_pgd(
                f"{d.name}/gate-aware", surrogate, setting=d, idx=idx, steps=self.config.adaptive_steps,
            )  # fmt: skip
        return self._adaptive_record(d, "gate-aware", before, attack)

    def _defended_square(self, d: DefenseSetting) -> dict:
        from pyautoattack.square import SquareAttack

        c = self.config
        idx = self._robust(d).nonzero().squeeze(1)[: c.defended_square_n]
        before = int(self._robust(d).sum())
        if len(idx):

            def predict(xa):
                return defended_logits(self.model, xa, d)

            sq = SquareAttack(predict, n_queries=c.defended_square_queries, eps=c.eps, seed=c.seed, device=self.device)

            def fn(chunk, x, y):
                with torch.no_grad():
                    adv = sq.perturb(x, y)
                    m = margin(predict(adv), y)
                self.best[d.name].update(chunk, adv.cpu(), m.cpu())
                return m

            self._map(fn, self.x, idx, f"{d.name}/square")
        rec = self._adaptive_record(d, "square", before, None)
        rec["queried"] = len(idx)
        rec["queries"] = c.defended_square_queries
        return rec

    def _adaptive_record(self, d: DefenseSetting, mode: str, before: int, attack) -> dict:
        robust = self._robust(d)
        return {
            "defense": d.name,
            "attack": mode,
            "surrogate": None if attack is None else attack.name,
            "attacked": before,
            "flipped": before - int(robust.sum()),
            "worst_case_so_far": {**self._prop(robust), "correct": correct_string(robust.tolist())},
        }

    # ---- jobs: analyses ----------------------------------------------------------------
    def _radii(self) -> dict:
        """Paper 2 Table 1: I-FGSM and PGD (ready-made gradient) at several radii, step 1/255
        and the number of steps of paper 2 Eq. 14."""
        out = {}
        for eps in self.config.radii:
            steps = ifgsm_steps(eps)
            for kind in ("ifgsm", "pgd"):
                robust = self._isolated_pgd(
                    f"{kind}@{eps * 255:.0f}", self._ready_made_surrogate(), steps=steps, eps=eps,
                    step_size=1 / 255, random_start=kind == "pgd",
                )  # fmt: skip
                out[f"{kind}@{eps * 255:g}/255"] = {"eps": eps, "steps": steps, **self._prop(robust)}
        return {"cells": out}

    def _dynamics_analysis(self) -> dict:
        """Fig. 2c/3b (entropy along the dynamics, with and without the defense) and Fig. 3c
        (relative deviation of the perturbed states from the clean ones), on the strongest
        per-sample adversarial inputs found for the undefended model."""
        x_adv = self.best["none"].x
        d = next((d for d in self.defenses if not d.gated), None)
        sums: Dict[str, Tensor] = {}
        dh_adv = []

        def add(key, v):
            sums[key] = sums.get(key, 0) + v.sum(0).cpu()

        with self._bar(self.n, "dynamics analysis") as bar:
            for chunk in self._chunks(self._all()):
                xc, xa = self.x[chunk].to(self.device), x_adv[chunk].to(self.device)
                with torch.no_grad():
                    tc, ta = self.model.trajectory(xc), self.model.trajectory(xa)
                    add("entropy/clean", tc.entropies(1))
                    add("entropy/adversarial", ta.entropies(1))
                    add("deviation/plain", _relative_deviation(ta, tc))
                if d is not None:
                    rc, ra = d.run(self.model, xc), d.run(self.model, xa)
                    with torch.no_grad():
                        add("entropy/clean+defense", rc.trajectory.entropies(1))
                        add("entropy/adversarial+defense", ra.trajectory.entropies(1))
                        dh_adv.append((ra.trajectory.entropies(1) - ta.entropies(1)).cpu())
                        add("deviation/defense", _relative_deviation(ra.trajectory, rc.trajectory))
                bar.update(len(chunk))
        out = {k: (v / self.n).tolist() for k, v in sums.items()}
        out["defense"] = d.name if d is not None else None
        if dh_adv:
            dh = torch.cat(dh_adv)
            q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
            out["delta_H_defense_quantiles"] = torch.quantile(dh, q, dim=0).T.tolist()  # [N][5]
            out["delta_H_defense_mean"] = dh.mean(0).tolist()
        return out

    def _transfer_matrix(self) -> dict:
        """Paper 1 Table 3 within one model: the accuracy of each setting (rows) on the
        strongest inputs found against each setting (columns)."""
        settings: List[Optional[DefenseSetting]] = [None] + list(self.defenses)
        names = [self._key(s) for s in settings]
        matrix: Dict[str, Dict[str, dict]] = {}
        for row in settings:
            matrix[self._key(row)] = {}
            for col in names:
                x_col = self.best[col].x

                def fn(chunk, x, y, row=row):
                    return (self._logits(row, x).argmax(-1) == y).float()

                correct = self._map(fn, x_col, self._all(), f"transfer {col} -> {self._key(row)}") > 0.5
                matrix[self._key(row)][col] = self._prop(correct)
        return {"rows_evaluated_on": names, "columns_attacks_against": names, "matrix": matrix}

    def _tf_r_grid(self) -> dict:
        """Paper 1 Table 5: robust accuracy of Algorithm 1 over T_f x R on the strongest
        inputs found against the undefended model (non-adaptive, as in the paper), with
        each setting's cost measured against plain inference in the same loop."""
        c = self.config
        x_adv = self.best["none"].x
        cells = []
        for T_f in c.grid_T_f:
            for R in c.grid_R:
                s = DefenseSetting(T_f=T_f, R=R)
                out, cost = self._timed_defense(s, x_adv, f"T_f={T_f} R={R}")
                cells.append({"T_f": T_f, "R": R, **self._prop(out[:, 0] <= 0), "cost_vs_plain": cost})
        return {"inputs": "strongest per-sample attack on the undefended model (non-adaptive)", "cells": cells}

    def _masking_checks(self) -> dict:
        """DESIGN.md §6 sanity checks against gradient masking, on the first ``check_n`` images."""
        c = self.config
        n = min(c.check_n, self.n)
        idx = torch.arange(n)
        attack = self.strongest_intermediate()

        def run(label, surrogate, **kw) -> float:
            return float(self._isolated_pgd(label, surrogate, idx=idx, **kw)[:n].float().mean())

        eq11 = self._plain_surrogate(lambda xa: attack.logits(self.model, xa))
        ready, ready_2n = self._ready_made_surrogate(), self._ready_made_surrogate(2 * self.N)

        out: Dict[str, object] = {"n": n, "surrogate": attack.name}
        sweep = {f"{e * 255:g}/255": run(f"sweep eps {e * 255:g}", eq11, eps=e, step_size=e / 4) for e in c.sweep_eps}
        out["eps_sweep"] = sweep
        base = run("steps x1", eq11)
        double = run("steps x2", eq11, steps=2 * c.steps)
        out["steps"] = {"x1": base, "x2": double, "change": double - base}
        r1, r2 = run("ready-made N", ready), run("ready-made 2N", ready_2n)
        out["solver_steps"] = {"N": r1, "2N": r2, "change": r2 - r1}
        # input gradients of the attack losses, per sample
        grads = {}
        for label, logits_fn in [("undefended (Eq. 11)", lambda xa: attack.logits(self.model, xa))] + [
            (f"{d.name} (unroll)", lambda xa, d=d: defended_surrogate_logits(self.model, xa, d, attack, "unroll")[1])
            for d in self.defenses
        ]:

            def grad_l1(chunk, x, y, logits_fn=logits_fn):
                xa = x.clone().requires_grad_(True)
                with torch.enable_grad():
                    (g,) = torch.autograd.grad(F.cross_entropy(logits_fn(xa), y, reduction="sum"), xa)
                return g.abs().flatten(1).sum(1)

            norms = self._map(grad_l1, self.x, idx, f"input gradient, {label}", UNROLL_BATCH)
            grads[label] = {"zero_fraction": float((norms == 0).float().mean()), "median_l1": float(norms.median())}
        out["input_gradients"] = grads
        wb = self.jobs.get("transfer", {}).get("none", {}).get("acc")
        sq = self.jobs.get("square", {}).get("acc", {}).get("acc")
        out["verdicts"] = {
            "accuracy falls to ~0 at the largest eps": sweep[list(sweep)[-1]] <= 0.05,
            "doubling PGD steps changes accuracy by < 2 points": abs(double - base) < 0.02,
            "doubling solver steps changes accuracy by < 2 points": abs(r2 - r1) < 0.02,
            "input gradients are non-zero": all(v["zero_fraction"] == 0 for v in grads.values()),
        }
        if wb is not None and sq is not None:
            out["square_vs_white_box"] = {"square": sq, "white_box_worst": wb}
            out["verdicts"]["Square alone is not stronger than the white-box worst case"] = sq >= wb
        for d in self.defenses:
            rec = self.jobs.get(f"{d.name}/square")
            if rec:
                out["verdicts"][f"Square flips no {d.name} survivor of the white-box attacks"] = rec["flipped"] == 0
        return out

    # ---- results -----------------------------------------------------------------------
    def results(self) -> dict:
        from .report import assemble_results

        return assemble_results(self)


def _relative_deviation(perturbed, clean) -> Tensor:
    """[B, N] ||z~[t] - z[t]|| / ||z[t]|| for t = 1..N (paper 1 Fig. 3c)."""
    return torch.stack(
        [(p - c).norm(dim=1) / c.norm(dim=1).clamp_min(1e-12) for p, c in zip(perturbed.states[1:], clean.states[1:])],
        1,
    )


def _without_families(identity: Optional[dict]) -> Optional[dict]:
    """Resume compatibility ignores the attack families: adding one to a finished
    evaluation runs just the new jobs (each job is named and seeded on its own)."""
    if not identity:
        return identity
    config = {"split": "test", **identity["config"]}  # evaluations from before --split were on the test set
    return {**identity, "config": {k: v for k, v in config.items() if k != "families"}}


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _median_ratio(num: Sequence[float], den: Sequence[float]) -> Optional[float]:
    if not num or not den:
        return None
    ratios = sorted(a / b for a, b in zip(num, den) if b > 0)
    return ratios[len(ratios) // 2] if ratios else None
