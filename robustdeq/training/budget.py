"""The training-budget study: rank recipes by robust accuracy per CPU-hour.

Each pilot is a complete (short) training run in its own folder, ranked on the
validation split (never the test set) by the worst of ready-made PGD-10 and APGD-CE at
its readout state (``robustdeq evaluate --split val --attacks pgd apgd-ce``). This module
reads the pilot folders and writes the table and the plot of ``docs/training-budget.md``:

    python -m robustdeq.training.budget training/budget --doc docs/training-budget.md

The table sits between the markers ``<!-- budget-table:start -->`` and
``<!-- budget-table:end -->`` of the document; the prose around it is kept.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import yaml

__all__ = [
    "Pilot",
    "read_pilot",
    "read_pilots",
    "markdown_table",
    "plot_pilots",
    "update_document",
    "add_budget_arguments",
    "run_budget",
    "main",
]

START, END = "<!-- budget-table:start -->", "<!-- budget-table:end -->"


@dataclass
class Pilot:
    name: str
    model: str
    recipe: str  # a one-line description of objective, attack and optimiser
    params: Optional[int]
    cpu_hours: float  # CPU time of the training process, all threads (validation included)
    threads: int
    samples_per_s: Optional[float]  # median training throughput (adversarial phase)
    samples: int
    curve: List[tuple]  # (cpu_hours, val clean, val PGD-10) per epoch, 1,000 / 500 validation images
    collapses: int
    clean: Optional[float]  # 500 validation images at the readout state
    pgd: Optional[float]
    apgd: Optional[float]
    readout: Optional[int]
    command: str
    worst: Optional[float] = None  # the ranking metric: per-sample worst of PGD-10 and APGD-CE


def _describe(cfg: dict) -> str:
    o, a, opt = cfg["objective"], cfg["attack"], cfg["optim"]
    obj = {"pgd_at": "PGD-AT", "trades": "TRADES", "clean": "clean"}[o["kind"]]
    if o.get("random_depth"):
        obj += " + Sec. 3.3"
    if o["kind"] == "clean":
        atk = ""
    elif a.get("kind", "pgd") == "pgd":
        atk = f", PGD-{a['steps']} step {a['step_size'] * 255:.3g}/255"
    else:
        atk = f", {'N-FGSM' if a['kind'] == 'nfgsm' else 'FGSM-RS'} step {a['step_size'] * 255:.3g}/255"
    name = opt.get("name", "adam")
    sched = opt.get("schedule", "cosine")
    optim = f"{'Adam' if name == 'adam' else 'SGD-N'} {opt['lr']:g} {sched}"
    if opt.get("ema_decay"):
        optim += f" + EMA {opt['ema_decay']:g}"
    # the speed levers of issue 30, where a pilot sets them
    levers = []
    if o.get("attack_unroll") is not None and o["attack_unroll"] != o.get("unroll", 5):
        levers.append(f"attack unroll K = {o['attack_unroll']}")
    if o.get("jacobian_weight") and o.get("jacobian_fraction", 1.0) < 1.0:
        levers.append(f"Jacobian on {o['jacobian_fraction']:g} of the batch")
    if o.get("jacobian_weight") and o.get("jacobian_every", 1) > 1:
        levers.append(f"Jacobian every {o['jacobian_every']} steps")
    return f"{obj}{atk}; {optim}" + (f"; {', '.join(levers)}" if levers else "")


def _measured_cpu(folder: Path) -> Optional[float]:
    """``cpu_seconds.txt``: the CPU time of a run measured from outside (``ps``), if any."""
    path = folder / "cpu_seconds.txt"
    return float(path.read_text().split()[0]) if path.is_file() else None


def _parameter_count(path: Path, cfg: Optional[dict] = None) -> Optional[int]:
    """Trainable tensors' entries of the pilot's checkpoint, or of its model built from the recorded
    config when the checkpoint is not kept (the study commits logs, not weights)."""
    if path.is_file():
        from ..checkpoint import load_checkpoint

        state = load_checkpoint(path).state_dict
    elif cfg is not None:
        from ..models import create_model

        state = create_model(cfg["model"]["name"], **(cfg["model"].get("overrides") or {})).state_dict()
    else:
        return None
    return int(sum(v.numel() for k, v in state.items() if v.is_floating_point() and "running_" not in k))


def read_pilot(folder: Path) -> Optional[Pilot]:
    """One pilot folder (None when it holds no finished run)."""
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    threads = int(summary.get("threads") or cfg["run"].get("threads") or 1)
    epochs = [r for r in records if r["type"] == "epoch" and r.get("val_pgd_acc") is not None]
    wall, cpu = float(summary.get("wall_s", 0.0)), summary.get("cpu_s") or _measured_cpu(folder)
    # runs that predate the CPU clock in the log: epochs placed by wall-clock x the run's CPU / wall ratio
    per_wall = (cpu / wall) if cpu and wall else threads
    curve = [
        ((r["cpu_s"] if "cpu_s" in r else r["wall_s"] * per_wall) / 3600.0, r["val_clean_acc"], r["val_pgd_acc"])
        for r in epochs
        if "wall_s" in r or "cpu_s" in r
    ]
    steps = int(summary["steps"])
    pilot = Pilot(
        name=folder.name,
        model=cfg["model"]["name"],
        recipe=_describe(cfg),
        params=_parameter_count(folder / "model.pt", cfg),
        cpu_hours=(cpu if cpu else wall * threads) / 3600.0,
        threads=threads,
        samples_per_s=summary.get("train_samples_per_s_median"),
        samples=steps * int(cfg["optim"]["batch_size"]),
        curve=curve,
        collapses=len(summary.get("collapses") or []),
        clean=None,
        pgd=None,
        apgd=None,
        readout=summary.get("early_state"),
        command=(folder / "command.txt").read_text().strip() if (folder / "command.txt").is_file() else "",
    )
    results_path, state_path = folder / "val-eval" / "results.json", folder / "val-eval" / "state.json"
    if not results_path.is_file() and state_path.is_file():  # a ranking run stopped early: its finished jobs
        jobs = json.loads(state_path.read_text())["jobs"]
        pilot.clean = (jobs.get("clean") or {}).get("acc", {}).get("acc")
        pilot.pgd = (jobs.get("pgd-ready") or {}).get("acc", {}).get("acc")
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        pilot.clean = results["clean"]["acc"]["acc"]
        attacks = {a["name"]: a["acc"]["acc"] for a in results["attacks"]}
        pilot.pgd, pilot.apgd = attacks.get("pgd-ready"), attacks.get("apgd-ce")
        none = [s for s in results["settings"] if s["name"] == "none"]
        pilot.worst = none[0]["worst_case"]["acc"] if none else None
    return pilot


def read_pilots(root: Path) -> List[Pilot]:
    pilots = [p for p in (read_pilot(d) for d in sorted(Path(root).iterdir()) if d.is_dir()) if p is not None]
    return sorted(pilots, key=lambda p: -1.0 if p.worst is None else p.worst, reverse=True)


def _pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def markdown_table(pilots: List[Pilot]) -> str:
    lines = [
        "| rank | pilot | model | parameters | recipe | CPU-h | samples | samples/s | collapses | val clean | "
        "val PGD-10 | val APGD-CE | **val worst** |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, p in enumerate(pilots, 1):
        sps = "–" if p.samples_per_s is None else f"{p.samples_per_s:.0f}"
        params = "–" if p.params is None else f"{p.params / 1e6:.3f}M"
        lines.append(
            f"| {i} | `{p.name}` | {p.model} | {params} | {p.recipe} | {p.cpu_hours:.2f} | "
            f"{p.samples / 1000:.0f}k | {sps} | {p.collapses} | {_pct(p.clean)} | {_pct(p.pgd)} | {_pct(p.apgd)} | "
            f"**{_pct(p.worst)}** |"
        )
    lines += ["", "Commands (each run with `bash training/budget_study.sh <pilot>`, which also runs the ranking):", ""]
    lines += [f"- `{p.name}`: `{p.command}`" for p in pilots if p.command]
    return "\n".join(lines) + "\n"


def plot_pilots(pilots: List[Pilot], path: Path) -> Path:
    series = [(p.name, p.curve, None if p.worst is None else (p.cpu_hours, p.worst)) for p in pilots]
    return plot_curves(series, path, "robust accuracy per CPU-hour (stars: final worst of PGD-10 / APGD-CE)")


def plot_curves(series, path: Path, title: str) -> Path:
    """Validation PGD-10 (left) and clean accuracy (right) against CPU-hours; ``series`` holds
    (label, [(cpu_hours, clean, pgd), ...], optional (cpu_hours, final worst) star)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rob, ax_clean) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, curve, star in series:
        if not curve:
            continue
        hours = [c[0] for c in curve]
        (line,) = ax_rob.plot(hours, [100 * c[2] for c in curve], marker="o", ms=3, label=label)
        ax_clean.plot(hours, [100 * c[1] for c in curve], marker="o", ms=3, color=line.get_color())
        if star is not None:
            ax_rob.scatter([star[0]], [100 * star[1]], marker="*", s=120, color=line.get_color(), zorder=3)
    ax_rob.set(xlabel="CPU-hours (process CPU time, all threads)", ylabel="validation PGD-10 accuracy (%)")
    ax_rob.set_title(title, fontsize=9)
    ax_clean.set(xlabel="CPU-hours (process CPU time, all threads)", ylabel="validation clean accuracy (%)")
    for ax in (ax_rob, ax_clean):
        ax.grid(alpha=0.3)
    ax_rob.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def update_document(doc: Path, table: str, start: str = START, end: str = END) -> None:
    """Replace the text between the ``start`` and ``end`` markers of ``doc`` (which must have them)."""
    text = doc.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{doc} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{start}\n{table}{end}{tail}")


def add_budget_arguments(ap: argparse.ArgumentParser) -> None:
    """``robustdeq training-budget`` (also ``python -m robustdeq.training.budget``)."""
    ap.description = "Rank the pilots of the training-budget study and write the table and plot."
    ap.add_argument("root", type=Path, help="folder of pilot run folders (training/budget)")
    ap.add_argument("--doc", type=Path, default=None, help="Markdown document whose table markers to refresh")
    ap.add_argument("--plot", type=Path, default=Path("docs/img/training-budget.png"))


def run_budget(args: argparse.Namespace) -> int:
    pilots = read_pilots(args.root)
    if not pilots:
        raise SystemExit(f"no finished pilot under {args.root}")
    table = markdown_table(pilots)
    print(table)
    print(f"wrote {plot_pilots(pilots, args.plot)}")
    if args.doc is not None:
        update_document(args.doc, table)
        print(f"updated {args.doc}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m robustdeq.training.budget")
    add_budget_arguments(ap)
    return run_budget(ap.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
