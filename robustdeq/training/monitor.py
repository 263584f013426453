"""Watching a training run: a Prometheus endpoint (``--metrics-port``) and the curve plot."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["TrainingMetrics", "plot_training_curves"]


class TrainingMetrics:
    """Gauges for a running training job, served by ``prometheus-client`` on loopback.

    Scrape ``http://127.0.0.1:PORT/metrics``; every series carries the ``run`` label.
    """

    def __init__(self, port: int, run: str, model: str, objective: str, addr: str = "127.0.0.1"):
        from prometheus_client import CollectorRegistry, Gauge, Info, start_http_server

        self.registry = CollectorRegistry()
        labels = ["run"]
        self.run = run

        def gauge(name: str, doc: str, extra: Sequence[str] = ()) -> "Gauge":
            return Gauge(name, doc, labels + list(extra), registry=self.registry)

        self.epoch = gauge("robustdeq_train_epoch", "Current epoch (1-based)")
        self.step = gauge("robustdeq_train_step", "Optimizer steps done")
        self.total_steps = gauge("robustdeq_train_total_steps", "Optimizer steps in the whole schedule")
        self.loss = gauge("robustdeq_train_loss", "Mean training loss over the last log interval", ["component"])
        self.accuracy = gauge("robustdeq_train_accuracy", "Training-batch accuracy (last log interval)", ["kind"])
        self.val_accuracy = gauge("robustdeq_train_val_accuracy", "Validation accuracy at the readout state", ["kind"])
        self.samples_per_second = gauge("robustdeq_train_samples_per_second", "Training throughput (all processes)")
        self.learning_rate = gauge("robustdeq_train_learning_rate", "Current learning rate")
        info = Info("robustdeq_train_run", "The run being trained", labels, registry=self.registry)
        info.labels(run=run).info({"model": model, "objective": objective})
        self.server, self.thread = start_http_server(port, addr=addr, registry=self.registry)

    def update(self, values: Dict[str, float]) -> None:
        for key, value in values.items():
            if value is None:
                continue
            if key in ("epoch", "step", "total_steps", "samples_per_second", "learning_rate"):
                getattr(self, key).labels(run=self.run).set(value)
            elif key.startswith("loss_"):
                self.loss.labels(run=self.run, component=key[5:]).set(value)
            elif key.startswith("acc_"):
                self.accuracy.labels(run=self.run, kind=key[4:]).set(value)
            elif key.startswith("val_"):
                self.val_accuracy.labels(run=self.run, kind=key[4:]).set(value)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def plot_training_curves(records: List[dict], path: Path, title: Optional[str] = None) -> Optional[Path]:
    """Loss per step and clean / PGD-10 validation accuracy per epoch (like paper 1 Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r.get("type") == "step"]
    epochs = [r for r in records if r.get("type") == "epoch" and r.get("val_clean_acc") is not None]
    if not steps and not epochs:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, color="tab:gray", label="loss")
        if any("ce" in r for r in steps):
            ax_loss.plot([r["step"] for r in steps], [r.get("ce") for r in steps], lw=1, color="tab:blue", label="CE")
        pre = [r["step"] for r in steps if r.get("phase") == "pretrain"]
        if pre:
            ax_loss.axvspan(0, max(pre), color="tab:orange", alpha=0.12, label="clean pretraining (unrolled)")
        ax_loss.set_xlabel("optimizer step")
        ax_loss.set_ylabel("training loss")
        ax_loss.legend(loc="upper right")
        ax_loss.grid(alpha=0.3)
    if epochs:
        xs = [r["epoch"] for r in epochs]
        ax_acc.plot(xs, [100 * r["val_clean_acc"] for r in epochs], "o-", label="clean (validation)")
        if any(r.get("val_pgd_acc") is not None for r in epochs):
            ax_acc.plot(xs, [100 * r["val_pgd_acc"] for r in epochs], "s-", label="PGD-10 (validation)")
        ax_acc.set_xlabel("epoch")
        ax_acc.set_ylabel("accuracy at the readout state (%)")
        ax_acc.legend(loc="lower right")
        ax_acc.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
