"""PNG plots of ``robustdeq bench`` (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..card import TRANSFER, setting_kind

__all__ = ["write_plots"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_plot(r: Dict[str, Any], path: Path) -> Path:
    """Samples/s against R, one line per T_f, one panel per batch size, plain as a horizontal
    line: paper 1 Table 10 as a picture."""
    plt = _pyplot()
    sizes = [p["batch_size"] for p in r["plain"]]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 4), squeeze=False)
    for ax, plain in zip(axes[0], r["plain"]):
        B = plain["batch_size"]
        rows = [d for d in r["defense"] if d["batch_size"] == B]
        for T_f in sorted({d["T_f"] for d in rows}):
            line = sorted((d["R"], d["samples_per_s"]) for d in rows if d["T_f"] == T_f)
            ax.plot([p[0] for p in line], [p[1] for p in line], "o-", label=f"T_f = {T_f}")
        ax.axhline(plain["samples_per_s"], color="k", ls="--", lw=1, label="plain (eager)")
        ax.set_xticks(sorted({d["R"] for d in rows}))
        ax.set(title=f"batch {B}", xlabel="R (entropy-descent steps per update)", ylabel="samples/s", yscale="log")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{r['model']}: defense throughput (paper 1 Table 10 grid), {r['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def robustness_cost_plot(settings: List[Dict[str, Any]], model: str, path: Path) -> Path:
    """Robust accuracy (95% CI) against cost vs plain (log x) for every setting of the card:
    the trade-off a user picks from. Adaptive and non-adaptive (transferred) results differ in marker."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {
        False: dict(fmt="o", color="tab:blue", label="adaptive attacks (card)"),
        True: dict(fmt="s", mfc="none", color="tab:gray", label="non-adaptive, transferred (card)"),
    }
    labelled = set()
    placed: List[tuple] = []  # (log10 cost, accuracy, vertical offset) of the labels so far
    for s in settings:
        robust, cost = s.get("robust"), s.get("cost_vs_plain")
        if not robust or cost is None:
            continue
        acc, (lo, hi) = 100 * robust["acc"], [100 * v for v in robust.get("ci95") or (robust["acc"],) * 2]
        transferred = setting_kind(s) == TRANSFER
        style = dict(styles[transferred])
        if transferred in labelled:
            style.pop("label")
        labelled.add(transferred)
        ax.errorbar(cost, acc, yerr=[[acc - lo], [hi - acc]], capsize=3, **style)
        name = s["name"].replace("defense-", "") if transferred else s["name"]
        dy = _free_label_offset(placed, math.log10(cost), acc)
        ax.annotate(name, (cost, acc), fontsize=7, xytext=(4, dy), textcoords="offset points", color=style["color"],
                    bbox=dict(boxstyle="square,pad=0.05", fc="white", ec="none", alpha=0.8), zorder=5)  # fmt: skip
    ax.legend(fontsize=8, loc="lower right")
    ax.set(xscale="log", xlabel="cost vs plain inference (card)", ylabel="robust accuracy (%)",
           title=f"{model}: robust accuracy vs cost (robustness card)")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _free_label_offset(placed: List[tuple], x: float, y: float, dx: float = 0.08, dy: float = 1.0) -> float:
    """A vertical text offset (points) for a label at (log10 cost ``x``, accuracy ``y``) that
    does not sit on a label already placed within ``dx`` decades and ``dy`` points: settings of
    nearly equal cost and accuracy (T2-R5 and T1-R5 at ~20x) stack their labels downwards."""
    offset = 3.0
    while any(abs(x - px) < dx and abs(y - py) < dy and abs(offset - po) < 8 for px, py, po in placed):
        offset -= 9.0
    placed.append((x, y, offset))
    return offset


def write_plots(r: Dict[str, Any], card: Optional[Dict[str, Any]], out: Path) -> Dict[str, str]:
    """Both plots beside ``out`` (a .json path); returns name -> file name."""
    files = {"throughput vs R": throughput_plot(r, out.with_name(out.stem + "-throughput.png"))}
    if card and card.get("settings"):
        path = out.with_name(out.stem + "-robust-vs-cost.png")
        files["robust accuracy vs cost"] = robustness_cost_plot(card["settings"], r["model"], path)
    return {name: path.name for name, path in files.items()}
