"""What every family of evaluation jobs works on (docs/design.md §6): :class:`EvaluationContext`.

It holds the model, the fixed seeded subset (or this shard's blocks of it) and the defense
settings; the job store with one best-input tracker per setting (the strongest input found so
far: largest margin of the real prediction); batching; and the PGD engine whose every iterate
updates a tracker, so a fooling iterate counts. The families (``undefended``, ``defended``,
``transfer``, ``analyses``) are functions of a context; the registry in ``families`` orders them.

Scale-out: every batch stays inside one block of ``config.block`` images and is seeded by its
first image's position in the whole subset, so a shard of whole blocks computes exactly what one
process computes for those images (:mod:`.shards`).
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from ..attacks import margin, pgd_linf
from ..data.run_splits import materialised, split_of_run
from ..defense import DefenseSetting
from ..dynamics import phantom_forward
from ..stats import Proportion
from .adaptive import defended_logits, readout_logits
from .best_input import BestInput
from .job_ids import seed_of
from .job_store import STATE_FORMAT, JobStore
from .measures import median_ratio, per_sample_ce
from .shards import Shard

#: one job of a family: its name and the function that makes its record
Job = Tuple[str, Callable[[], dict]]
#: a family's jobs: ``jobs(ctx)`` yields them in run order
FamilyJobs = Callable[["EvaluationContext"], Iterable[Job]]
#: the image pools an evaluation can draw its subset from
SPLITS = ("test", "val")

__all__ = ["EvaluationContext", "Job", "FamilyJobs", "SPLITS", "evaluation_subset", "proportion"]


def evaluation_subset(split, n: int, seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The fixed test subset: a seeded permutation of the test split (the archive stores it
    grouped by class), first ``n``. Returns (indices into the split, images uint8, labels)."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]
    sub = materialised(split, order)  # a streaming split (your own images) decodes only the subset
    return order, sub.images, sub.labels


def proportion(correct: Tensor) -> dict:
    """The accuracy of a per-sample bool mask with its 95% interval, as the results store it."""
    return Proportion.of(int(correct.sum()), int(correct.numel())).to_dict()


class EvaluationContext:
    """The state one evaluation's jobs share; see the module docstring. ``config`` is an
    :class:`~robustdeq.evaluation.suite.EvalConfig`."""

    def __init__(
        self,
        checkpoint: str,
        out_dir: str,
        config: Any,
        device: Optional[str] = None,
        data: Optional[str] = None,
        progress: bool = True,
        restart: bool = False,
        shard: Optional[Shard] = None,
    ):
        from ..checkpoint import file_sha256, load_checkpoint

        self.config = config
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
        self._val = None
        pool = (
            split_of_run(self.ckpt.data, "test", data, progress) if config.split == "test" else self.validation_split()
        )
        order, images, labels = evaluation_subset(pool, config.n, config.seed)
        self._pool_identity = (pool.fingerprint, len(pool))
        # the identity of the whole subset, whichever shard of it this process evaluates
        self.subset_id = self.subset_id_of(config.n)
        self.shard = shard
        start, stop = (0, len(order)) if shard is None else shard.bounds(len(order), config.block)
        self.offset = start  # global position of this process's first image (a block boundary)
        self.indices = order[start:stop]
        self.x = images[start:stop].float().div(255.0)
        self.y = labels[start:stop].clone()
        self.n = len(self.y)
        self.defenses = [DefenseSetting.parse(s) for s in config.defenses]
        self.defenses = [d for d in self.defenses if not d.is_plain]
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.store = JobStore.open(self.out, self._identity(), self.checkpoint_path, data, restart)
        if self.jobs.get("gate"):
            self.apply_threshold(self.jobs["gate"]["threshold"])

    def subset_id_of(self, n: int) -> str:
        """The identity of the first ``n`` images of this evaluation's seeded order. Subsets of one
        seed and split are prefixes of each other: a larger evaluation holds this one's images first."""
        fingerprint, size = self._pool_identity
        order = torch.randperm(size, generator=torch.Generator().manual_seed(self.config.seed))[:n]
        return hashlib.sha256(fingerprint.encode() + order.numpy().tobytes()).hexdigest()[:16]

    def _identity(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "checkpoint_sha256": self.checkpoint_sha256,
            "subset_id": self.subset_id,
            "config": self.config.to_dict(),
            "shard": None if self.shard is None else self.shard.to_dict(self.offset, self.offset + self.n),
        }

    # ---- the job store -----------------------------------------------------------------
    @property
    def jobs(self) -> Dict[str, dict]:
        """Every finished job's record, by job name, in the order they ran."""
        return self.store.jobs

    @property
    def best(self) -> Dict[str, BestInput]:
        """The per-sample best input of each setting (``none``, or a defense's name)."""
        return self.store.best

    def job(self, name: str, fn: Callable[[], dict]) -> dict:
        """The record of job ``name``, made by ``fn()`` unless the store already holds it."""
        return self.store.job(name, fn)

    def save(self) -> None:
        self.store.save()

    # ---- batching ----------------------------------------------------------------------
    def bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="img", leave=False, disable=not self.progress)

    def chunks(self, idx: Tensor, batch: Optional[int] = None) -> List[Tensor]:
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

    def seed(self, name: str, chunk: Tensor) -> int:
        """The seed of one batch of one job: by its first image's position in the whole subset."""
        return seed_of(self.config.seed, name, self.offset + int(chunk[0]))

    def map(
        self,
        fn: Callable[[Tensor, Tensor, Tensor], Tensor],
        x_all: Tensor,
        idx: Tensor,
        desc: str,
        batch=None,
        resumable: bool = False,
    ):
        """Apply ``fn(idx_chunk, x, y) -> per-sample tensor`` over ``idx`` in batches. With
        ``resumable`` (the attacks of hours, whose every batch is seeded on its own, and whose ``fn``
        changes nothing but its output) each finished batch is saved, and a rerun after an
        interruption takes the saved batches instead of computing them again: the same result,
        batch for batch."""
        outs = []
        saved = self.store.saved_batches(desc) if resumable else {}
        with self.bar(len(idx), desc) as bar:
            for chunk in self.chunks(idx, batch):
                done = saved.get(int(chunk[0]))
                if done is not None and torch.equal(done[0], chunk):
                    outs.append(done[1])
                else:
                    x = x_all[chunk].to(self.device)
                    y = self.y[chunk].to(self.device)
                    outs.append(fn(chunk, x, y).detach().cpu())
                    if resumable:
                        self.store.save_batch(desc, chunk, outs[-1])
                        self._log_batch(desc, sum(len(o) for o in outs), len(idx))
                bar.update(len(chunk))
        return torch.cat(outs) if outs else torch.empty(0)

    def _log_batch(self, desc: str, done: int, total: int) -> None:
        """Without progress bars (a log), one line per saved batch of a long job but its last
        (the job's own line follows)."""
        if not self.progress and done < total:
            print(f"evaluate: {time.strftime('%H:%M:%S')} {desc}: {done} of {total} images (saved)",
                  file=sys.stderr, flush=True)  # fmt: skip

    def all_images(self) -> Tensor:
        """The indices of every image of this process."""
        return torch.arange(self.n)

    # ---- predictions and the per-setting best inputs -----------------------------------
    def logits(self, setting: Optional[DefenseSetting], x: Tensor) -> Tensor:
        """The real prediction of ``setting`` (``None``: the undefended model) at the early state."""
        return readout_logits(self.model, x) if setting is None else defended_logits(self.model, x, setting)

    @staticmethod
    def key(setting: Optional[DefenseSetting]) -> str:
        """The tracker of ``setting``: ``none`` or the defense's name."""
        return "none" if setting is None else setting.name

    def evaluate_candidates(
        self, setting: Optional[DefenseSetting], x_cand: Tensor, idx: Tensor, desc: str, batch: Optional[int] = None
    ):
        """Real predictions of ``setting`` on candidate inputs for samples ``idx`` (in batches of
        ``batch``); updates that setting's per-sample best. Returns the margins."""
        key = self.key(setting)

        def fn(chunk, x, y):
            return margin(self.logits(setting, x), y)

        m = self.map(fn, x_cand, idx, desc, batch) if len(idx) else torch.empty(0)
        if len(idx):
            self.best[key].update(idx, x_cand[idx], m)
        return m

    def robust(self, setting: Optional[DefenseSetting]) -> Tensor:
        """Which images every input tried so far has left correct under ``setting``."""
        return self.best[self.key(setting)].robust

    def timed_defense(self, d: DefenseSetting, x_all: Tensor, desc: str) -> Tuple[Tensor, Optional[float]]:
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

        return self.map(fn, x_all, self.all_images(), desc), median_ratio(t_def, t_plain)

    # ---- the validation split and the gate ---------------------------------------------
    def validation_split(self):
        """The held-out validation split of the checkpoint's training run (never the test set)."""
        if self._val is None:
            self._val = split_of_run(self.ckpt.data, "val", self.data_arg, self.progress)
        return self._val

    def gate_state(self) -> int:
        """The gate reads the entropy at the early state unless a setting names another."""
        states = {d.gate_state for d in self.defenses if d.gated and d.gate_state is not None}
        return (states.pop() % (self.N + 1)) if states else self.k

    def apply_threshold(self, threshold: float) -> None:
        """Give every gated setting the chosen entropy threshold (job ``gate``)."""
        gate = self.gate_state()
        for i, d in enumerate(self.defenses):
            if d.gated:
                self.defenses[i] = replace(d, threshold=threshold, gate_state=gate)

    # ---- the PGD engine ----------------------------------------------------------------
    def pgd(self, loss_fn, x, y, gen, steps=None, step_size=None, eps=None, random_start=True, x_init=None):
        """l_inf PGD on ``loss_fn``, at the configured budget unless told otherwise."""
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

    def tracked_pgd(self, name, surrogate, setting=None, idx=None, steps=None, eps=None, step_size=None,
                    random_start=True, x_start=None, batch=None):  # fmt: skip
        """PGD ascending ``surrogate(x, y) -> (real logits, per-sample loss)``; every iterate's real
        prediction updates the setting's per-sample best (so a fooling iterate counts)."""
        idx = self.all_images() if idx is None else idx
        key = self.key(setting)
        last: Dict[str, Tensor] = {}

        def fn(chunk, x, y):
            gen = torch.Generator().manual_seed(self.seed(name, chunk))

            def loss_fn(xa):
                real, loss = surrogate(xa, y)
                self.best[key].update(chunk, xa.detach().cpu(), margin(real.detach(), y).cpu())
                return loss

            x_init = None if x_start is None else x_start[chunk].to(self.device)
            x_adv = self.pgd(loss_fn, x, y, gen, steps, step_size, eps, random_start, x_init)
            with torch.no_grad():
                real = self.logits(setting, x_adv)
            m = margin(real, y)
            self.best[key].update(chunk, x_adv.cpu(), m.cpu())
            last.setdefault("x", []).append(x_adv.cpu())
            return m

        self.map(fn, self.x, idx, name, batch)
        return torch.cat(last["x"]) if last else self.x[idx]

    def isolated_pgd(self, label: str, surrogate, idx: Optional[Tensor] = None, **kw) -> Tensor:
        """Run a tracked PGD on the undefended model with its own tracker, so that it does not
        enter the evaluation's worst case; returns the per-sample robust mask."""
        saved = self.best["none"]
        self.best["none"] = BestInput(self.x, torch.tensor(self.jobs["clean"]["margin"]))
        try:
            self.tracked_pgd(label, surrogate, idx=idx, **kw)
            return self.best["none"].robust
        finally:
            self.best["none"] = saved

    def plain_surrogate(self, logits_fn: Callable[[Tensor], Tensor]):
        """(real early-state logits, CE of ``logits_fn``) for attacks on the undefended model."""

        def surrogate(xa, y):
            return readout_logits(self.model, xa), per_sample_ce(logits_fn(xa), y)

        return surrogate

    def ready_made_surrogate(self, n_steps: Optional[int] = None):
        """The ready-made gradient (paper 1 Sec. 4): phantom gradient of z[n_steps] (default z[N])."""
        return self.plain_surrogate(lambda xa: phantom_forward(self.model, xa, n_steps=n_steps).logits)
