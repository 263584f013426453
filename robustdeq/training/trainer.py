"""The training loop behind ``robustdeq train``.

A run directory holds:

* ``config.yaml``: the resolved recipe;
* ``log.jsonl``: one record per log interval (``type: step``) and per epoch (``type: epoch``);
* ``epochs.csv``: the epoch records as a table;
* ``curves.png``: loss and clean / PGD-10 validation accuracy (paper 1 Fig. 4);
* ``last.pt``: the resume checkpoint (weights + optimizer + position), rewritten every
  ``run.checkpoint_every`` steps and at every epoch end;
* ``model.pt``: the final checkpoint, written when the schedule completes, with the
  early state chosen by ready-made PGD-10 on the validation split (paper 1 Sec. 4).

Every random choice derives from (seed, step) or (seed, epoch), so a resumed run sees the
same batches, augmentations, depths and attack starts as an uninterrupted one.
Under ``torchrun`` each process takes a slice of every global batch (DDP).
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import yaml
from torch import Tensor

from .. import __version__
from ..checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from ..data import augment, batches_per_epoch, epoch_batches, load_cifar10, train_val_split
from ..models import create_model
from ..readout import choose_readout_state
from ..state_accuracy import state_accuracies
from .config import TrainConfig, config_diff
from .objectives import Objective, ObjectiveModule, training_step
from .optim import WeightEMA, build_optimizer, learning_rate

__all__ = ["Trainer", "TrainResult", "RESUMABLE_CHANGES"]

#: config sections that may change when a run is resumed (they do not alter the steps already taken)
RESUMABLE_CHANGES = ("optim.epochs", "run.", "validation.", "data.source", "description")


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    total_steps: int
    completed: bool
    model_path: Optional[Path]
    val_metrics: Dict[str, Any]


class _Dist:
    """Process-group facts (a single process when not launched by torchrun)."""

    def __init__(self, device: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and self.world_size > 1:
            device = f"cuda:{self.local_rank}"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("run.device asks for CUDA but no GPU is visible")
            torch.cuda.set_device(self.device)
        self.initialised_here = False
        if self.world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
                self.initialised_here = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.initialised_here:
            import torch.distributed as dist

            # every process waits for rank 0's final writes; exiting while a peer still
            # talks to gloo aborts the process ("terminate called without an active exception")
            dist.barrier()
            dist.destroy_process_group()
            self.initialised_here = False


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
        self.dist = _Dist(cfg.run.device)
        self.device = self.dist.device
        self.progress = progress and self.dist.main
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        if cfg.optim.batch_size % self.dist.world_size:
            raise ValueError(
                f"optim.batch_size {cfg.optim.batch_size} is not divisible by the {self.dist.world_size} processes"
            )
        if restart and self.dist.main and self.out_dir.exists():
            for name in ("last.pt", "model.pt", "log.jsonl", "epochs.csv", "curves.png", "summary.json"):
                (self.out_dir / name).unlink(missing_ok=True)
        self.dist.barrier()

        # data: the held-out validation split is carved from the training set
        full = load_cifar10("train", cfg.data.source, progress=self.progress)
        self.train, self.val, val_idx = train_val_split(full, cfg.data.val_size, cfg.data.split_seed)
        if cfg.data.train_subset is not None:
            keep = torch.arange(min(cfg.data.train_subset, len(self.train)))
            self.train = self.train.subset(keep, f"{self.train.source}[:{len(keep)}]")
        self.data_record = {
            "dataset": "cifar10",
            "source": full.source,
            "train_fingerprint": full.fingerprint,
            "val_size": cfg.data.val_size,
            "split_seed": cfg.data.split_seed,
            "val_fingerprint": self.val.fingerprint,
        }
        self.steps_per_epoch = batches_per_epoch(len(self.train), cfg.optim.batch_size, cfg.data.epoch_size)
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs

        torch.manual_seed(cfg.run.seed)
        self.model = create_model(cfg.model.name, **cfg.model.overrides).to(self.device)
        self.objective = Objective(cfg.objective, cfg.attack, cfg.pretrain.depth)
        self.module = ObjectiveModule(self.model, self.objective)
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters())
        self.ema = WeightEMA(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        self.best: Dict[str, Any] = {}  # the epoch with the best validation PGD accuracy
        self.collapses: List[Dict[str, Any]] = []  # catastrophic-overfitting events seen
        self.step = 0
        self.wall_s = 0.0  # training wall-clock so far, across resumed chunks
        self.cpu_s = 0.0  # CPU time of this process (all threads) so far: the CPU-hours axis
        self.records: List[dict] = []
        self._resume()
        self.ddp = self.module
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.module, device_ids=ids)
        self.metrics = None
        if metrics_port is not None and self.dist.main:
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
        path = self.out_dir / "last.pt"
        if not path.is_file():
            return
        ckpt = load_checkpoint(path, map_location=self.device, expect_model=self.cfg.model.name)
        if ckpt.training_state is None:
            raise CheckpointError(f"{path} holds no training state; remove it or pass --restart")
        try:  # fill in fields added to the config since the checkpoint was written
            saved = TrainConfig.from_dict(ckpt.recipe).to_dict()
        except ValueError as exc:
            raise CheckpointError(f"{path} records a recipe this version cannot read: {exc}") from None
        diff = [
            k
            for k in config_diff(saved, self.cfg.to_dict())
            if not any(k == p or k.startswith(p) for p in RESUMABLE_CHANGES)
        ]
        if diff:
            raise ValueError(
                f"{self.out_dir} holds a run with a different recipe (differs in: {', '.join(diff)}); "
                "pass --restart to start over there, or choose another --out"
            )
        ckpt.check_dataset(self.data_record["train_fingerprint"])
        self.model.load_state_dict(ckpt.state_dict)
        self.optimizer.load_state_dict(ckpt.training_state["optimizer"])
        self.step = int(ckpt.training_state["step"])
        self.wall_s = float(ckpt.training_state.get("wall_s", 0.0))
        self.cpu_s = float(ckpt.training_state.get("cpu_s", 0.0))
        self.best = dict(ckpt.training_state.get("best", {}))
        self.collapses = list(ckpt.training_state.get("collapses", []))
        if self.ema is not None:
            if "ema" not in ckpt.training_state:
                raise CheckpointError(f"{path} holds no weight average but optim.ema_decay is set")
            self.ema.load_state_dict(ckpt.training_state["ema"])
        log = self.out_dir / "log.jsonl"
        if log.is_file():
            kept = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            self.records = [r for r in kept if r.get("step", 0) <= self.step]
            if self.dist.main and len(self.records) != len(kept):  # drop records past the checkpoint
                log.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        if self.dist.main:
            print(f"resuming {self.cfg.name} from {path} at step {self.step}/{self.total_steps}")

    def _training_state(self) -> Dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "total_steps": self.total_steps,
            "wall_s": self._wall_now(),
            "cpu_s": self._cpu_now(),
            "best": self.best,
            "collapses": self.collapses,
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
        }

    def _cpu_now(self) -> float:
        """CPU seconds (user + system, every thread): earlier chunks plus this call so far.
        Unlike wall-clock, it does not grow when another job shares the cores."""
        started = getattr(self, "_call_cpu_started", None)
        return self.cpu_s + (time.process_time() - started if started is not None else 0.0)

    def _wall_now(self) -> float:
        """Training wall-clock seconds: earlier chunks plus this call so far."""
        started = getattr(self, "_call_started", None)
        return self.wall_s + (time.monotonic() - started if started is not None else 0.0)

    def _sync_buffers(self) -> None:
        """Give every process rank 0's BatchNorm statistics before evaluating or saving."""
        if self.dist.world_size > 1:
            import torch.distributed as dist

            for buf in self.eval_model.buffers():
                dist.broadcast(buf, 0)

    def _checkpoint(self, path: Path, with_state: bool, val_metrics=None, early_state=None, config=None) -> None:
        if not self.dist.main:
            return
        weights = self.model if with_state else self.eval_model  # last.pt resumes the raw weights
        ckpt = Checkpoint(
            model_name=self.cfg.model.name,
            model_config=config or weights.config(),
            state_dict={k: v.detach().cpu() for k, v in weights.state_dict().items()},
            recipe=self.cfg.to_dict(),
            val_metrics=val_metrics or {},
            early_state=early_state or {},
            data=self.data_record,
            library_version=__version__,
            training_state=self._training_state() if with_state else None,
        )
        save_checkpoint(ckpt, path)

    # ---- logging -------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        record["wall_s"] = round(self._wall_now(), 2)
        record["cpu_s"] = round(self._cpu_now(), 2)
        self.records.append(record)
        if not self.dist.main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "log.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if record["type"] == "epoch":
            self._write_csv()
            from .monitor import plot_training_curves

            plot_training_curves(self.records, self.out_dir / "curves.png", title=self.cfg.name)

    def _write_csv(self) -> None:
        rows = [r for r in self.records if r["type"] == "epoch"]
        keys: List[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys and k != "type" and not isinstance(r[k], list)]
        with open(self.out_dir / "epochs.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    # ---- validation ----------------------------------------------------------------------
    def validate(self, n_clean: int, n_robust: int, desc: str = "validating"):
        v = self.cfg.validation
        self._sync_buffers()
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
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            progress=self.progress,
            desc=desc,
        )

    # ---- the loop ------------------------------------------------------------------------
    def _batch(self, index: Tensor) -> tuple:
        cfg = self.cfg
        idx = index[self.dist.rank :: self.dist.world_size]
        x = self.train.float_images(idx)
        if cfg.data.augment:
            x = augment(x, torch.Generator().manual_seed(_seed(cfg.run.seed, 1, self.step, self.dist.rank)))
        return x.to(self.device, non_blocking=True), self.train.labels[idx].to(self.device, non_blocking=True)

    def _handle_signal(self, signum, frame) -> None:  # pragma: no cover - exercised manually
        self._stop_reason = f"signal {signum}"

    def run(self, max_steps: Optional[int] = None, time_limit_s: Optional[float] = None) -> TrainResult:
        cfg = self.cfg
        started = self._call_started = time.monotonic()
        self._call_cpu_started = time.process_time()
        old_handlers = {}
        if self.dist.main:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    old_handlers[sig] = signal.signal(sig, self._handle_signal)
                except ValueError:  # not the main thread
                    pass
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        steps_this_call = 0
        if self.step >= self.total_steps and (self.out_dir / "model.pt").is_file():
            done = load_checkpoint(self.out_dir / "model.pt")
            if self.dist.main:
                print(
                    f"{self.out_dir} already holds the finished run ({self.step} steps); raise optim.epochs to extend"
                )
            self.dist.close()
            return TrainResult(
                self.out_dir, self.step, self.total_steps, True, self.out_dir / "model.pt", done.val_metrics
            )
        try:
            while self.step < self.total_steps and self._stop_reason is None:
                epoch = self.step // self.steps_per_epoch
                batches = epoch_batches(len(self.train), cfg.optim.batch_size, epoch, cfg.run.seed, cfg.data.epoch_size)
                bar = None
                if self.progress:
                    from tqdm import tqdm

                    bar = tqdm(
                        total=self.steps_per_epoch,
                        initial=self.step % self.steps_per_epoch,
                        desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
                        unit="step",
                        dynamic_ncols=True,
                    )
                interval: List[dict] = []
                t_interval = time.perf_counter()
                while self.step < (epoch + 1) * self.steps_per_epoch:
                    lr = self.learning_rate(self.step)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    x, y = self._batch(batches[self.step % self.steps_per_epoch])
                    pretrain = self.step < cfg.pretrain.steps
                    stats = training_step(
                        self.ddp,
                        self.objective,
                        self.optimizer,
                        x,
                        y,
                        generator=torch.Generator().manual_seed(_seed(cfg.run.seed, 2, self.step, self.dist.rank)),
                        depth_generator=torch.Generator().manual_seed(_seed(cfg.run.seed, 3, self.step)),
                        pretrain=pretrain,
                        use_jacobian=self.step % cfg.objective.jacobian_every == 0,
                        grad_clip=cfg.optim.grad_clip,
                    )
                    if self.ema is not None:
                        self.ema.update(self.model)
                    if not math.isfinite(stats["loss"]):
                        raise FloatingPointError(
                            f"training loss became {stats['loss']} at step {self.step}; "
                            "lower optim.lr or set optim.grad_clip"
                        )
                    self.step += 1
                    steps_this_call += 1
                    stats["phase"] = "pretrain" if pretrain else "train"
                    interval.append(stats)
                    if bar is not None:
                        shown = {k: f"{stats[k]:.3f}" for k in ("loss", "train_acc", "train_adv_acc") if k in stats}
                        bar.set_postfix(lr=f"{lr:.2e}", depth=stats["depth"], **shown)
                        bar.update(1)
                    if self.step % cfg.run.log_every == 0 or self.step % self.steps_per_epoch == 0:
                        elapsed = time.perf_counter() - t_interval
                        self._log_interval(interval, epoch, lr, elapsed)
                        interval, t_interval = [], time.perf_counter()
                    if self.step % cfg.run.checkpoint_every == 0:
                        self._checkpoint(self.out_dir / "last.pt", with_state=True)
                    if max_steps is not None and steps_this_call >= max_steps:
                        self._stop_reason = f"--max-steps {max_steps}"
                    if time_limit_s is not None and time.monotonic() - started > time_limit_s:
                        self._stop_reason = "--time-limit"
                    if self._stop_reason is not None:
                        break
                if bar is not None:
                    bar.close()
                if self.step % self.steps_per_epoch == 0:
                    self._end_epoch(epoch)
            if self._stop_reason == "collapse":
                self.dist.barrier()  # rank 0 wrote best.pt
                self._restore_best()
                return self._finish()
            completed = self.step >= self.total_steps
            if not completed:
                # the end of a chunk: what this call trained, for the chunk-by-chunk account of long runs
                self._log({"type": "chunk", "step": self.step, "total_steps": self.total_steps,
                           "steps_this_call": steps_this_call, "reason": self._stop_reason})  # fmt: skip
                self._checkpoint(self.out_dir / "last.pt", with_state=True)
                if self.dist.main:
                    print(
                        f"stopped ({self._stop_reason}) at step {self.step}/{self.total_steps}; "
                        f"run the same command again to resume from {self.out_dir / 'last.pt'}"
                    )
                return TrainResult(self.out_dir, self.step, self.total_steps, False, None, {})
            return self._finish()
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            if self.metrics is not None:
                self.metrics.close()
            self.dist.close()

    def _log_interval(self, interval: List[dict], epoch: int, lr: float, elapsed: float) -> None:
        if not interval:
            return
        rec: Dict[str, Any] = {"type": "step", "step": self.step, "epoch": epoch + 1, "lr": lr}
        keys = {k for s in interval for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for k in sorted(keys):
            vals = [s[k] for s in interval if k in s]
            rec[k] = sum(vals) / len(vals)
        rec["depths"] = [s["depth"] for s in interval]
        rec["phase"] = interval[-1]["phase"]
        rec["samples_per_s"] = len(interval) * self.cfg.optim.batch_size / max(elapsed, 1e-9)
        self._log(rec)
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
            if self.dist.main and self.progress:
                pgd = f", PGD-{v.pgd_steps} {100 * rec['val_pgd_acc']:.1f}%" if acc.robust_n else ""
                print(f"epoch {epoch + 1}: validation clean {100 * rec['val_clean_acc']:.1f}%{pgd}")
            if self.metrics is not None:
                self.metrics.update({"val_clean": rec["val_clean_acc"], "val_pgd": rec["val_pgd_acc"]})
            if acc.robust_n:
                self._watch_collapse(rec)
        self._log(rec)
        self._checkpoint(self.out_dir / "last.pt", with_state=True)

    def _watch_collapse(self, rec: Dict[str, Any]) -> None:
        """Keep ``best.pt`` (the best validation PGD epoch) and detect catastrophic
        overfitting: validation PGD accuracy ``validation.collapse_drop`` below the best.
        With ``on_collapse: stop`` the run ends from the best epoch's weights."""
        v, pgd = self.cfg.validation, rec["val_pgd_acc"]
        if not self.best or pgd >= self.best["val_pgd_acc"]:
            self.best = {
                "epoch": rec["epoch"],
                "step": rec["step"],
                "val_pgd_acc": pgd,
                "val_clean_acc": rec["val_clean_acc"],
            }
            self._checkpoint(self.out_dir / "best.pt", with_state=False)
            return
        drop = self.best["val_pgd_acc"] - pgd
        if drop < v.collapse_drop:
            return
        event = {
            "epoch": rec["epoch"],
            "step": rec["step"],
            "val_pgd_acc": pgd,
            "best": dict(self.best),
            "action": v.on_collapse,
        }
        self.collapses.append(event)
        rec["collapse"] = True
        if self.dist.main:
            print(
                f"catastrophic overfitting at epoch {rec['epoch']}: validation PGD {100 * pgd:.1f}% against "
                f"{100 * self.best['val_pgd_acc']:.1f}% at epoch {self.best['epoch']}"
                + ("; stopping from the best epoch's weights" if v.on_collapse == "stop" else "")
            )
        if v.on_collapse == "stop":
            self._stop_reason = "collapse"

    def _check_replicas(self) -> Optional[bool]:
        """Under DDP, confirm that every process ends with identical weights."""
        if self.dist.world_size == 1:
            return None
        import torch.distributed as dist

        self._sync_buffers()
        checksum = torch.stack([p.detach().double().sum() for p in self.model.parameters()]).sum().reshape(1)
        gathered = [torch.zeros_like(checksum) for _ in range(self.dist.world_size)]
        dist.all_gather(gathered, checksum)
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        if not same:
            raise RuntimeError(f"DDP replicas diverged: parameter checksums {[float(g) for g in gathered]}")
        return same

    def _restore_best(self) -> None:
        best = load_checkpoint(self.out_dir / "best.pt", map_location=self.device)
        self.eval_model.load_state_dict(best.state_dict)

    def _finish(self) -> TrainResult:
        """Choose the early state on the validation split and write ``model.pt``."""
        v = self.cfg.validation
        replicas_identical = self._check_replicas()
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
        self._checkpoint(path, with_state=False, val_metrics=val_metrics, early_state=early, config=config)
        self._checkpoint(self.out_dir / "last.pt", with_state=True, val_metrics=val_metrics, early_state=early)
        if self.dist.main:
            summary = {
                "name": self.cfg.name,
                "model": self.cfg.model.name,
                "steps": self.step,
                "val_metrics": val_metrics,
                "early_state": early.get("index"),
                "world_size": self.dist.world_size,
                "ddp_replicas_identical": replicas_identical,
                "wall_s": round(self._wall_now(), 1),
                "cpu_s": round(self._cpu_now(), 1),
                "threads": torch.get_num_threads(),
                "best_epoch": self.best or None,
                "collapses": self.collapses,
                "stopped_early": self._stop_reason == "collapse",
                "train_samples_per_s_median": _median(
                    [r["samples_per_s"] for r in self.records if r["type"] == "step" and r.get("phase") == "train"]
                ),
            }
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            if val_metrics:
                print(
                    f"done: early state z[{early['index']}] — validation clean {100 * val_metrics['clean_acc']:.1f}%, "
                    f"PGD-{v.pgd_steps} {100 * val_metrics['pgd_acc']:.1f}% (n={val_metrics['n']}); wrote {path}"
                )
        return TrainResult(self.out_dir, self.step, self.total_steps, True, path, val_metrics)


def _median(values: List[float]) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])
