"""The training loop behind ``robustdeq train`` (paper 1 Sec. 3.3 and Appendix A).

Per step: the learning rate of the schedule, this process's share of the batch
(augmented), one :func:`training_step` of the objective (clean pretraining, PGD-AT or
TRADES through the phantom gradient, on a random intermediate state n ~ U{1..N} under
Sec. 3.3), the weight average. Per epoch: clean and PGD validation of every state on the
held-out split, and the collapse watch. At the end: the early state is chosen on that split
(paper 1 Sec. 4) and ``model.pt`` is written.

Every random choice derives from (seed, step) or (seed, epoch), so a resumed run sees the
same batches, augmentations, depths and attack starts as an uninterrupted one. The files of
a run are described in :mod:`robustdeq.training.run_folder`; the processes of a ``torchrun``
launch (DDP) in :mod:`robustdeq.training.distributed`.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import __version__
from ..checkpoint import Checkpoint, CheckpointError
from ..data import augment, batches_per_epoch, epoch_batches
from ..data.run_splits import IMAGEFOLDER
from ..models import create_model
from ..readout import choose_readout_state
from ..state_accuracy import state_accuracies
from .collapse import CollapseWatch
from .config import TrainConfig
from .distributed import Processes
from .objectives import Objective, ObjectiveModule, training_step
from .optim import WeightEMA, build_optimizer, learning_rate
from .run_data import model_overrides_for, training_data
from .run_folder import RESUMABLE_CHANGES, RunClock, RunFolder

__all__ = ["Trainer", "TrainResult", "RESUMABLE_CHANGES"]


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    total_steps: int
    completed: bool
    model_path: Optional[Path]
    val_metrics: Dict[str, Any]


def _seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


class Trainer:
    """Train one recipe into ``out_dir`` (resuming from ``out_dir/last.pt`` when present)."""

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: os.PathLike,
        progress: bool = True,
        metrics_port: Optional[int] = None,
        restart: bool = False,
    ):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.procs = Processes(cfg.run.device)
        self.device = self.procs.device
        self.progress = progress and self.procs.main
        self.folder = RunFolder(self.out_dir, cfg.name, writes=self.procs.main)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        if cfg.optim.batch_size % self.procs.world_size:
            raise ValueError(
                f"optim.batch_size {cfg.optim.batch_size} is not divisible by the {self.procs.world_size} processes"
            )
        if restart:
            self.folder.clear()
        self.procs.barrier()

        self.train, self.val, self.data_record = training_data(cfg, self.progress)
        self.steps_per_epoch = batches_per_epoch(len(self.train), cfg.optim.batch_size, cfg.data.epoch_size)
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs

        torch.manual_seed(cfg.run.seed)
        overrides = {**model_overrides_for(self.data_record), **cfg.model.overrides}
        self.model = create_model(cfg.model.name, **overrides).to(self.device)
        self.objective = Objective(cfg.objective, cfg.attack, cfg.pretrain.depth)
        self.module = ObjectiveModule(self.model, self.objective)
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters())
        self.ema = WeightEMA(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        self.collapse = CollapseWatch(cfg.validation.collapse_drop, cfg.validation.on_collapse)
        self.step = 0
        self._resume()
        self.ddp = self.procs.wrap(self.module)
        self.metrics = None
        if metrics_port is not None and self.procs.main:
            from .monitor import TrainingMetrics

            self.metrics = TrainingMetrics(metrics_port, cfg.name, cfg.model.name, cfg.objective.kind)
            self.metrics.update({"total_steps": self.total_steps, "step": self.step})
        self._stop_reason: Optional[str] = None

    # ---- schedule ------------------------------------------------------------------------
    def learning_rate(self, step: int) -> float:
        return learning_rate(self.cfg.optim, step, self.total_steps)

    @property
    def eval_model(self):
        """The weights that are validated and shipped: the EMA when there is one."""
        return self.ema.model if self.ema is not None else self.model

    # ---- resume --------------------------------------------------------------------------
    def _resume(self) -> None:
        ckpt = self.folder.resume_checkpoint(self.cfg, self.device, self.data_record["train_fingerprint"])
        if ckpt is None:
            return
        state = ckpt.training_state
        self.model.load_state_dict(ckpt.state_dict)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.folder.clock = RunClock(float(state.get("wall_s", 0.0)), float(state.get("cpu_s", 0.0)))
        v = self.cfg.validation
        self.collapse = CollapseWatch(v.collapse_drop, v.on_collapse, state.get("best", {}), state.get("collapses", []))
        if self.ema is not None:
            if "ema" not in state:
                raise CheckpointError(f"{self.out_dir / 'last.pt'} holds no weight average but optim.ema_decay is set")
            self.ema.load_state_dict(state["ema"])
        self.folder.read_log(self.step)
        if self.procs.main:
            print(f"resuming {self.cfg.name} from {self.out_dir / 'last.pt'} at step {self.step}/{self.total_steps}")

    def _checkpoint(self, name: str, with_state: bool, val_metrics=None, early_state=None, config=None) -> None:
        """Write ``name`` into the run folder: the raw weights with the training state (``last.pt``,
        to resume) or the weights that are shipped (``best.pt``, ``model.pt``)."""
        if not self.procs.main:
            return
        weights = self.model if with_state else self.eval_model
        training_state = None
        if with_state:
            training_state = {
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "total_steps": self.total_steps,
                "wall_s": self.folder.clock.wall(),
                "cpu_s": self.folder.clock.cpu(),
                "best": self.collapse.best,
                "collapses": self.collapse.collapses,
                **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            }
        ckpt = Checkpoint(
            model_name=self.cfg.model.name,
            model_config=config or weights.config(),
            state_dict={k: v.detach().cpu() for k, v in weights.state_dict().items()},
            recipe=self.cfg.to_dict(),
            val_metrics=val_metrics or {},
            early_state=early_state or {},
            data=self.data_record,
            library_version=__version__,
            training_state=training_state,
        )
        self.folder.save(name, ckpt)

    # ---- validation ----------------------------------------------------------------------
    def validate(self, n_clean: int, n_robust: int, desc: str = "validating"):
        """Clean and ready-made PGD accuracy of every state z[1..N] on the validation split."""
        v = self.cfg.validation
        self.procs.share_buffers(self.eval_model)
        return state_accuracies(
            self.eval_model,
            self.val.images,
            self.val.labels,
            n_clean,
            n_robust,
            eps=v.eps,
            step_size=v.pgd_step_size,
            pgd_steps=v.pgd_steps,
            batch_size=v.batch_size,
            device=self.device,
            seed=self.cfg.run.seed,
            rank=self.procs.rank,
            world_size=self.procs.world_size,
            progress=self.progress,
            desc=desc,
        )

    # ---- the loop ------------------------------------------------------------------------
    def _batch(self, index: Tensor, decoded: Optional[Tuple[Tensor, Tensor]] = None) -> tuple:
        """This process's share of the batch ``index`` (augmented), or of ``decoded`` (uint8
        images and labels a streaming split's workers already read)."""
        cfg = self.cfg
        idx = self.procs.local_slice(index)
        x = self.train.float_images(idx) if decoded is None else decoded[0].float().div_(255.0)
        if cfg.data.augment:
            x = augment(x, torch.Generator().manual_seed(_seed(cfg.run.seed, 1, self.step, self.procs.rank)))
        return x.to(self.device, non_blocking=True), self.train.labels[idx].to(self.device, non_blocking=True)

    def _handle_signal(self, signum, frame) -> None:  # pragma: no cover - exercised manually
        self._stop_reason = f"signal {signum}"

    def _catch_signals(self) -> Dict[int, Any]:
        """SIGINT / SIGTERM stop the run resumably at the end of the step (main process)."""
        old_handlers = {}
        if self.procs.main:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    old_handlers[sig] = signal.signal(sig, self._handle_signal)
                except ValueError:  # not the main thread
                    pass
        return old_handlers

    def _data_summary(self) -> Dict[str, Any]:
        """What a run on your own images reports of them: classes, size, splits, files left out."""
        r = self.data_record
        keys = ("root", "classes", "input_size", "split_sizes", "bad_files", "bad_file_paths", "ignored_files")
        return {k: r[k] for k in keys if k in r}

    def run(self, max_steps: Optional[int] = None, time_limit_s: Optional[float] = None) -> TrainResult:
        """Train until the schedule ends (then choose the early state and write ``model.pt``) or until
        ``max_steps`` steps / ``time_limit_s`` seconds of this call, a signal or a collapse."""
        started = self.folder.clock.start()
        first_step = self.step
        old_handlers = self._catch_signals()
        self.folder.write_config(self.cfg)
        if self.data_record.get("dataset") == IMAGEFOLDER and self.step == 0 and self.procs.main:
            self.folder.log({"type": "data", "step": 0, **self._data_summary()})  # the bad files, in the log

        def stop_reason() -> Optional[str]:
            if time_limit_s is not None and time.monotonic() - started > time_limit_s:
                return "--time-limit"
            if max_steps is not None and self.step - first_step >= max_steps:
                return f"--max-steps {max_steps}"
            return None

        try:
            if self.step >= self.total_steps and self.folder.finished():
                return self._already_finished()
            while self.step < self.total_steps and self._stop_reason is None:
                epoch = self.step // self.steps_per_epoch
                self._train_epoch(epoch, stop_reason)
                if self.step % self.steps_per_epoch == 0:
                    self._end_epoch(epoch)
            if self._stop_reason == "collapse":
                self.procs.barrier()  # rank 0 wrote best.pt
                self.eval_model.load_state_dict(self.folder.load("best.pt", map_location=self.device).state_dict)
                return self._finish()
            if self.step >= self.total_steps:
                return self._finish()
            return self._stop_chunk(self.step - first_step)
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            if self.metrics is not None:
                self.metrics.close()
            self.procs.close()

    def _train_epoch(self, epoch: int, stop_reason) -> None:
        """The steps of ``epoch`` from the current one to its end, or to a stop (``stop_reason()``,
        a signal); logged every ``run.log_every`` steps, ``last.pt`` every ``run.checkpoint_every``."""
        cfg = self.cfg
        batches = epoch_batches(len(self.train), cfg.optim.batch_size, epoch, cfg.run.seed, cfg.data.epoch_size)
        decoded = None
        if cfg.data.workers and hasattr(self.train, "batches"):  # a streaming split: decode ahead in workers
            ahead = [self.procs.local_slice(b) for b in batches[self.step % self.steps_per_epoch :]]
            decoded = iter(self.train.batches(ahead, cfg.data.workers))
        bar = self._progress_bar(epoch)
        interval: List[dict] = []
        t_interval = time.perf_counter()
        while self.step < (epoch + 1) * self.steps_per_epoch:
            lr = self.learning_rate(self.step)
            stats = self._train_step(batches[self.step % self.steps_per_epoch], lr, next(decoded) if decoded else None)
            interval.append(stats)
            if bar is not None:
                shown = {k: f"{stats[k]:.3f}" for k in ("loss", "train_acc", "train_adv_acc") if k in stats}
                bar.set_postfix(lr=f"{lr:.2e}", depth=stats["depth"], **shown)
                bar.update(1)
            if self.step % cfg.run.log_every == 0 or self.step % self.steps_per_epoch == 0:
                self._log_interval(interval, epoch, lr, time.perf_counter() - t_interval)
                interval, t_interval = [], time.perf_counter()
            if self.step % cfg.run.checkpoint_every == 0:
                self._checkpoint("last.pt", with_state=True)
            self._stop_reason = stop_reason() or self._stop_reason
            if self._stop_reason is not None:
                break
        if bar is not None:
            bar.close()

    def _train_step(self, index: Tensor, lr: float, decoded=None) -> Dict[str, Any]:
        """One optimiser step of the objective on this process's share of the batch ``index``:
        clean pretraining for the first ``pretrain.steps``, then the recipe's (paper 1 Sec. 3.3)."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self._batch(index, decoded)
        pretrain = self.step < cfg.pretrain.steps
        stats = training_step(
            self.ddp,
            self.objective,
            self.optimizer,
            x,
            y,
            generator=torch.Generator().manual_seed(_seed(cfg.run.seed, 2, self.step, self.procs.rank)),
            depth_generator=torch.Generator().manual_seed(_seed(cfg.run.seed, 3, self.step)),
            pretrain=pretrain,
            use_jacobian=self.step % cfg.objective.jacobian_every == 0,
            grad_clip=cfg.optim.grad_clip,
        )
        if self.ema is not None:
            self.ema.update(self.model)
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(
                f"training loss became {stats['loss']} at step {self.step}; lower optim.lr or set optim.grad_clip"
            )
        self.step += 1
        stats["phase"] = "pretrain" if pretrain else "train"
        return stats

    def _already_finished(self) -> TrainResult:
        done = self.folder.load("model.pt")
        if self.procs.main:
            print(f"{self.out_dir} already holds the finished run ({self.step} steps); raise optim.epochs to extend")
        return TrainResult(self.out_dir, self.step, self.total_steps, True, self.out_dir / "model.pt", done.val_metrics)

    def _progress_bar(self, epoch: int):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.steps_per_epoch,
            initial=self.step % self.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{self.cfg.optim.epochs}",
            unit="step",
            dynamic_ncols=True,
        )

    def _stop_chunk(self, steps_this_call: int) -> TrainResult:
        """The end of a call before the end of the schedule: ``last.pt`` to resume from, and a
        ``chunk`` record (what this call trained, for the chunk-by-chunk account of long runs)."""
        self.folder.log({"type": "chunk", "step": self.step, "total_steps": self.total_steps,
                   "steps_this_call": steps_this_call, "reason": self._stop_reason})  # fmt: skip
        self._checkpoint("last.pt", with_state=True)
        if self.procs.main:
            print(
                f"stopped ({self._stop_reason}) at step {self.step}/{self.total_steps}; "
                f"run the same command again to resume from {self.out_dir / 'last.pt'}"
            )
        return TrainResult(self.out_dir, self.step, self.total_steps, False, None, {})

    def _log_interval(self, interval: List[dict], epoch: int, lr: float, elapsed: float) -> None:
        if not interval:
            return
        rec = self.folder.interval_record(interval, self.step, epoch, lr, self.cfg.optim.batch_size, elapsed)
        self.folder.log(rec)
        if self.metrics is not None:
            self.metrics.update(
                {
                    "step": self.step,
                    "epoch": epoch + 1,
                    "learning_rate": lr,
                    "samples_per_second": rec["samples_per_s"],
                    **{f"loss_{k}": rec.get(k) for k in ("loss", "ce", "kl", "jacobian")},
                    **{f"acc_{k[6:]}": rec.get(k) for k in ("train_acc", "train_adv_acc")},
                }
            )

    def _end_epoch(self, epoch: int) -> None:
        v = self.cfg.validation
        rec: Dict[str, Any] = {"type": "epoch", "epoch": epoch + 1, "step": self.step}
        if (epoch + 1) % v.every == 0 or self.step >= self.total_steps:
            acc = self.validate(v.n_clean, v.n_robust, desc=f"validating epoch {epoch + 1}")
            k = self.eval_model.readout_state
            rec.update(
                val_clean_acc=acc.clean(k),
                val_pgd_acc=acc.robust(k) if acc.robust_n else None,
                val_clean_acc_final=acc.clean(-1),
                val_pgd_acc_final=acc.robust(-1) if acc.robust_n else None,
                readout_state=self.eval_model.readout_index(),
                **acc.to_dict(),
            )
            if self.procs.main and self.progress:
                pgd = f", PGD-{v.pgd_steps} {100 * rec['val_pgd_acc']:.1f}%" if acc.robust_n else ""
                print(f"epoch {epoch + 1}: validation clean {100 * rec['val_clean_acc']:.1f}%{pgd}")
            if self.metrics is not None:
                self.metrics.update({"val_clean": rec["val_clean_acc"], "val_pgd": rec["val_pgd_acc"]})
            if acc.robust_n:
                seen = self.collapse.observe(rec, announce=self.procs.main)
                if seen == "best":
                    self._checkpoint("best.pt", with_state=False)
                elif seen == "stop":
                    self._stop_reason = "collapse"
        self.folder.log(rec)
        self._checkpoint("last.pt", with_state=True)

    def _finish(self) -> TrainResult:
        """Choose the early state on the validation split (paper 1 Sec. 4) and write ``model.pt``."""
        v = self.cfg.validation
        replicas_identical = self.procs.replicas_identical(self.model, buffers_of=self.eval_model)
        config = self.eval_model.config()
        early: Dict[str, Any] = {"index": None, "method": "preset readout (selection disabled)"}
        val_metrics: Dict[str, Any] = {}
        if v.selection_n > 0:
            acc = self.validate(v.selection_n, v.selection_n, desc="choosing the readout state")
            k = choose_readout_state(acc, v.select)
            method = {
                "robust": f"highest ready-made PGD-{v.pgd_steps} accuracy on the validation split (paper 1 Sec. 4)",
                "clean": "highest clean accuracy on the validation split",
                "final": "the final state z[N] (validation.select: final)",
            }[v.select]
            early = {
                "index": k,
                "method": method,
                "eps": v.eps,
                "n": acc.robust_n,
                **acc.to_dict(),
            }
            config["readout_state"] = k
            val_metrics = {
                "n": acc.clean_n,
                "clean_acc": acc.clean(k),
                "pgd_acc": acc.robust(k),
                "clean_acc_final": acc.clean(-1),
                "pgd_acc_final": acc.robust(-1),
                "state": k,
                "attack": f"ready-made PGD-{v.pgd_steps}, eps {v.eps:.5f}, step {v.pgd_step_size:.5f}",
            }
            self.eval_model.readout_state = k
            self.eval_model._config = config
        path = self.out_dir / "model.pt"
        self._checkpoint("model.pt", with_state=False, val_metrics=val_metrics, early_state=early, config=config)
        self._checkpoint("last.pt", with_state=True, val_metrics=val_metrics, early_state=early)
        self.folder.write_summary(
            {
                "name": self.cfg.name,
                "model": self.cfg.model.name,
                "steps": self.step,
                "val_metrics": val_metrics,
                "early_state": early.get("index"),
                "world_size": self.procs.world_size,
                "ddp_replicas_identical": replicas_identical,
                "wall_s": round(self.folder.clock.wall(), 1),
                "cpu_s": round(self.folder.clock.cpu(), 1),
                "threads": torch.get_num_threads(),
                "best_epoch": self.collapse.best or None,
                "collapses": self.collapse.collapses,
                "stopped_early": self._stop_reason == "collapse",
                "train_samples_per_s_median": self.folder.median_train_samples_per_s(),
                **({"data": self._data_summary()} if self.data_record.get("dataset") == IMAGEFOLDER else {}),
            }
        )
        if self.procs.main and val_metrics:
            print(
                f"done: early state z[{early['index']}] — validation clean {100 * val_metrics['clean_acc']:.1f}%, "
                f"PGD-{v.pgd_steps} {100 * val_metrics['pgd_acc']:.1f}% (n={val_metrics['n']}); wrote {path}"
            )
        return TrainResult(self.out_dir, self.step, self.total_steps, True, path, val_metrics)
