"""Results of an evaluation: one JSON with every number, a Markdown report, PNG plots of the
paper's analyses, and the robustness card (the summary a model archive ships)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol

from .. import __version__
from ..card import CARD_FILE, setting_name, validate_card
from ..card import SCHEMA_ID as CARD_SCHEMA_ID
from ..card import SCHEMA_PATH as CARD_SCHEMA_PATH
from ..stats import Proportion
from .coverage import attack_coverage, attacks_with_results, format_coverage
from .job_ids import utc_now


class FinishedEvaluation(Protocol):
    """What :func:`assemble_results` reads of a finished run (``suite.Evaluator`` is one);
    a protocol, so that this module does not import the suite that imports it."""

    checkpoint_path: str
    checkpoint_sha256: str
    ckpt: Any
    N: int
    k: int
    n: int
    device: Any
    config: Any
    subset_id: str
    jobs: Dict[str, dict]
    best: Dict[str, Any]
    defenses: List[Any]

    def strongest_intermediate(self) -> Any: ...


#: how each evaluation split is described in the results
SPLIT_NAMES = {
    "test": "CIFAR-10 test, seeded shuffle",
    "val": "validation split of the checkpoint's training run, seeded shuffle",
}


def split_name(split: str, data: Optional[dict]) -> str:
    """How the evaluated split is described: :data:`SPLIT_NAMES`, or for a checkpoint trained on an
    image folder, that folder's test split (its root, classes, size and fingerprint)."""
    if split == "test" and data and data.get("dataset") == "imagefolder":
        size, fingerprint = data.get("input_size"), data.get("fingerprints", {}).get("test")
        classes = len(data.get("classes", []))
        return (
            f"test split of the image folder {data.get('root')} ({classes} classes, {size}x{size}, "
            f"fingerprint {fingerprint}), seeded shuffle"
        )
    return SPLIT_NAMES[split]


# validate_card and CARD_SCHEMA_PATH are re-exported from card.py, the card's home, for old imports
__all__ = ["assemble_results", "write_outputs", "robustness_card", "validate_card", "CARD_SCHEMA_PATH"]


def assemble_results(ev: FinishedEvaluation) -> dict:
    """Everything the evaluator measured, organised for the report and for ``compare``."""
    jobs = ev.jobs
    clean = jobs["clean"]
    attacks = [dict(name=name, **{k: v for k, v in rec.items() if k != "correct"})
               for name, rec in jobs.items() if "P" in rec]  # fmt: skip
    grid = [a for a in attacks if a["name"].startswith("eq11-")]
    per_sample: Dict[str, str] = {"clean": clean["correct"]}
    per_sample.update({f"attack/{name}": rec["correct"] for name, rec in jobs.items() if "P" in rec})
    settings = []
    plain_worst = ev.best["none"].robust
    per_sample["worst/none"] = _bits(plain_worst)
    settings.append(
        {
            "name": "none",
            "setting": {"name": "none", "R": 0, "gated": False},
            "clean": clean["acc"],
            "non_adaptive": None,
            "worst_case": Proportion.of(int(plain_worst.sum()), ev.n).to_dict(),
            "cost_vs_plain": 1.0,
            "chain": [],
        }
    )
    for d in ev.defenses:
        c = clean["defenses"].get(d.name, {})
        per_sample[f"clean/{d.name}"] = c.get("correct", "")
        transfer = jobs.get("transfer", {}).get(d.name)
        if transfer:
            per_sample[f"non-adaptive/{d.name}"] = transfer["correct"]
        worst = ev.best[d.name].robust
        per_sample[f"worst/{d.name}"] = _bits(worst)
        chain = [
            {k: v for k, v in rec.items() if k != "worst_case_so_far"} | {"after": _strip(rec["worst_case_so_far"])}
            for name, rec in jobs.items()
            if name.startswith(d.name + "/")
        ]
        settings.append(
            {
                "name": d.name,
                "setting": d.to_dict(),
                "clean": c.get("acc"),
                "trigger_rate_clean": c.get("trigger_rate"),
                "non_adaptive": _strip(transfer) if transfer else None,
                "worst_case": Proportion.of(int(worst.sum()), ev.n).to_dict(),
                "cost_vs_plain": c.get("cost_vs_plain"),
                "chain": chain,
            }
        )
    cross_model = {}
    for name, rec in jobs.items():
        if name.startswith("cross-model/"):
            label = name.split("/", 1)[1]
            per_sample[name] = rec["correct"]
            per_sample.update({f"{name}/{d}": v["correct"] for d, v in rec["defenses"].items()})
            cross_model[label] = {
                "source": rec["source"],
                "none": _strip(rec["acc"]),
                **{d: _strip(v) for d, v in rec["defenses"].items()},
            }
    results = {
        "format": "robustdeq.evaluation/1",
        "library_version": __version__,
        # when the last job finished: resuming a finished evaluation rewrites the same outputs
        "date": max((j["finished"] for j in jobs.values() if "finished" in j), default=None) or utc_now(),
        "checkpoint": ev.checkpoint_path,
        "checkpoint_sha256": ev.checkpoint_sha256,
        "model": ev.ckpt.model_name,
        "n_steps": ev.N,
        "early_state": ev.k,
        "device": str(ev.device),
        "subset": {
            "n": ev.n,
            "seed": ev.config.seed,
            "id": ev.subset_id,
            "split": split_name(ev.config.split, getattr(ev.ckpt, "data", None)),
        },
        "config": ev.config.to_dict(),
        "seconds": round(sum(j.get("seconds", 0.0) for j in jobs.values()), 1),
        "clean": {k: v for k, v in clean.items() if k not in ("correct", "margin", "entropy_final", "entropy_readout")},
        "gate": jobs.get("gate"),
        "attacks": attacks,
        "strongest_intermediate": ev.strongest_intermediate().name if "surrogate" in jobs else None,
        "surrogate_choice": jobs.get("surrogate"),
        "settings": settings,
        "cross_model": cross_model,
        "paper_tables": {
            "table3_transfer": jobs.get("transfer-matrix"),
            "table5_tf_r_grid": jobs.get("tf-r-grid"),
            "table6_P": _stats([a["P"] for a in grid]),
            "table7_delta_H": _stats([a["delta_H"] for a in grid]),
            "radii": jobs.get("radii"),
        },
        "dynamics": jobs.get("dynamics"),
        "checks": jobs.get("checks"),
        "per_sample": per_sample,
    }
    return results


def _bits(mask) -> str:
    return "".join("1" if bool(v) else "0" for v in mask.tolist())


def _strip(d: Optional[dict]) -> Optional[dict]:
    return None if d is None else {k: v for k, v in d.items() if k != "correct"}


def _stats(values: List[float]) -> Optional[dict]:
    if not values:
        return None
    return {"avg": sum(values) / len(values), "min": min(values), "max": max(values), "attacks": len(values)}


# ---- robustness card ---------------------------------------------------------------------
def robustness_card(results: dict) -> dict:
    """The small per-checkpoint summary (``card.py`` reads it): clean and worst-case accuracy
    with n and interval, per defense setting its robust accuracy and cost."""
    settings = []
    for s in results["settings"]:
        entry = {
            "name": s["name"],
            "T_f": s["setting"].get("T_f"),
            "R": s["setting"].get("R", 0),
            "gated": bool(s["setting"].get("gated", False)),
            "clean": _interval(s["clean"]),
            "robust": _interval(s["worst_case"]),
            "robust_kind": "adaptive, per-sample worst case" if s["name"] != "none" else "per-sample worst case",
            "non_adaptive": _interval(s["non_adaptive"]),
            "cost_vs_plain": s["cost_vs_plain"],
        }
        if s["setting"].get("gated"):
            entry["threshold"] = s["setting"].get("threshold")
            entry["trigger_rate_clean"] = s.get("trigger_rate_clean")
        settings.append(entry)
    grid = (results["paper_tables"].get("table5_tf_r_grid") or {}).get("cells", [])
    for cell in grid:
        settings.append(
            {
                "name": setting_name(cell["T_f"], cell["R"]),
                "T_f": cell["T_f"],
                "R": cell["R"],
                "gated": False,
                "clean": None,
                "robust": _interval(cell),
                "robust_kind": "non-adaptive (strongest attack on the undefended model, transferred)",
                "non_adaptive": _interval(cell),
                "cost_vs_plain": cell.get("cost_vs_plain"),
            }
        )
    plain = results["settings"][0]
    attacks = [a["name"] for a in results["attacks"]]
    standard = next((a for a in results["attacks"] if a["name"] == "autoattack-standard"), None)
    for s in results["settings"][1:]:
        attacks += [f"{s['name']}/{c['attack']}" for c in s["chain"]]
    attacks += [f"cross-model/{label}" for label in results.get("cross_model", {})]
    return {
        "schema": CARD_SCHEMA_ID,
        "model": results["model"],
        "checkpoint_sha256": results["checkpoint_sha256"],
        "early_state": results["early_state"],
        "n_steps": results["n_steps"],
        "threat_model": {"norm": "linf", "eps": results["config"]["eps"]},
        "evaluation": {
            "n": results["subset"]["n"],
            "subset_id": results["subset"]["id"],
            "date": results["date"],
            "library_version": results["library_version"],
            "attacks": attacks,
        },
        "clean": _interval(plain["clean"]),
        "robust": _interval(plain["worst_case"]),
        # RobustBench's autoattack_acc, named for what it is, next to the per-sample worst case that includes it
        **({"autoattack_standard": _interval(standard["acc"])} if standard else {}),
        "settings": settings,
    }


def _interval(p: Optional[dict]) -> Optional[dict]:
    if p is None:
        return None
    return {"acc": p["acc"], "n": p["n"], "ci95": p["ci95"]}


# ---- outputs -----------------------------------------------------------------------------
def write_outputs(results: dict, out_dir: Path) -> Dict[str, Path]:
    """results.json, report.md, robustness_card.json and the PNG plots."""
    out_dir = Path(out_dir)
    paths = {name: out_dir / file for name, file in
             (("results", "results.json"), ("report", "report.md"), ("card", CARD_FILE))}  # fmt: skip
    paths["results"].write_text(json.dumps(results, indent=1))
    card = robustness_card(results)
    validate_card(card)
    paths["card"].write_text(json.dumps(card, indent=2))
    plots = _plots(results, out_dir)
    paths.update(plots)
    paths["report"].write_text(markdown_report(results, {k: v.name for k, v in plots.items()}))
    return paths


def _pct(p: Optional[dict]) -> str:
    if not p:
        return "–"
    lo, hi = p["ci95"]
    return f"{100 * p['acc']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown_report(r: dict, plots: Dict[str, str]) -> str:
    L: List[str] = []
    add = L.append
    add(f"# Robustness evaluation: {r['model']} ({Path(r['checkpoint']).parent.name or r['checkpoint']})\n")
    add(
        f"{r['subset']['n']} images of the {r['subset']['split']} (seeded subset `{r['subset']['id']}`), l_inf eps = "
        f"{r['config']['eps'] * 255:g}/255, early state z[{r['early_state']}] of N = {r['n_steps']}; "
        f"{r['date']}, {r['device']}, {r['seconds'] / 60:.1f} min of attack time. "
        "Accuracies in % with Wilson 95% intervals.\n"
    )
    add("## Headline\n")
    add("| setting | clean | non-adaptive (attacks on the plain model) | worst case, all attacks | cost vs plain |")
    add("|---|---|---|---|---|")
    for s in r["settings"]:
        cost = f"{s['cost_vs_plain']:.1f}x" if s.get("cost_vs_plain") else "–"
        add(f"| {s['name']} | {_pct(s['clean'])} | {_pct(s['non_adaptive'])} | **{_pct(s['worst_case'])}** | {cost} |")
    if r.get("gate"):
        g = r["gate"]
        add(
            f"\nGate: entropy at z[{g['gate_state']}] above {g['threshold']:.4f} (the {100 * g['quantile']:g}th "
            f"percentile of clean validation entropy, {g['val_n']} images of the training run's validation split)."
        )
    add("\n## Attacks on the undefended model\n")
    add("| attack | accuracy at the early state | P (Eq. 12) | ΔH (Eq. 13) |")
    add("|---|---|---|---|")
    for a in r["attacks"]:
        add(f"| {a['name']} | {_pct(a['acc'])} | {100 * a['P']:.1f}% | {a['delta_H']:+.3f} |")
    if attacks_with_results(r):
        add("\n### Which attacks set the worst case\n")
        add(format_coverage(attack_coverage(r)) + "`robustdeq attack-coverage` prints this table for any evaluation.")
    if r.get("strongest_intermediate"):
        add(
            f"\nEq. 11 surrogate of APGD and the adaptive attacks (the strongest grid attack on the validation "
            f"split): `{r['strongest_intermediate']}`."
        )
    for s in r["settings"][1:]:
        if not s["chain"]:
            continue
        add(f"\n## Adaptive attacks on {s['name']}\n")
        add("Each attack runs on the images that survived everything before it.\n")
        add("| attack | surrogate | attacked | flipped | robust after | time (s) | s per attacked image |")
        add("|---|---|---|---|---|---|---|")
        for c in s["chain"]:
            sur = c.get("surrogate") or "–"
            secs = c.get("seconds")
            per = f"{secs / c['attacked']:.1f}" if secs is not None and c["attacked"] else "–"
            add(f"| {c['attack']} | {sur} | {c['attacked']} | {c['flipped']} | {_pct(c['after'])} | "
                f"{'–' if secs is None else f'{secs:.0f}'} | {per} |")  # fmt: skip
    if r.get("cross_model"):
        names = [s["name"] for s in r["settings"]]
        add("\n## Transfer from other models\n")
        add(
            "The strongest per-sample inputs found against each source model (its own white-box attacks), fed to "
            "this model; accuracy on all images. They count in this model's worst case.\n"
        )
        add("| source | " + " | ".join(names) + " |")
        add("|---" * (len(names) + 1) + "|")
        for label, rec in r["cross_model"].items():
            add(f"| {label} | " + " | ".join(_pct(rec.get(n)) for n in names) + " |")
    t = r["paper_tables"]
    if t.get("table3_transfer"):
        m = t["table3_transfer"]
        add("\n## Transfer between settings (paper 1 Table 3)\n")
        add("Rows: the setting evaluated; columns: the strongest inputs found against that setting.\n")
        add("| evaluated on \\ attacks against | " + " | ".join(m["columns_attacks_against"]) + " |")
        add("|---" * (len(m["columns_attacks_against"]) + 1) + "|")
        for row in m["rows_evaluated_on"]:
            add(f"| {row} | " + " | ".join(_pct(m["matrix"][row][c]) for c in m["columns_attacks_against"]) + " |")
    if t.get("table5_tf_r_grid"):
        cells = t["table5_tf_r_grid"]["cells"]
        Rs = sorted({c["R"] for c in cells})
        Ts = sorted({c["T_f"] for c in cells})
        add("\n## T_f x R (paper 1 Table 5; non-adaptive, cost vs plain in brackets)\n")
        add("| | " + " | ".join(f"R = {R}" for R in Rs) + " |")
        add("|---" * (len(Rs) + 1) + "|")
        for T in Ts:
            row = []
            for R in Rs:
                c = next(c for c in cells if c["T_f"] == T and c["R"] == R)
                row.append(f"{100 * c['acc']:.1f} ({c['cost_vs_plain']:.1f}x)")
            add(f"| T_f = {T} | " + " | ".join(row) + " |")
    if t.get("table6_P"):
        add("\n## Entropy statistics over the intermediate-state attacks (paper 1 Tables 6-7)\n")
        add("| statistic | avg | min | max |")
        add("|---|---|---|---|")
        p, dh = t["table6_P"], t["table7_delta_H"]
        add(f"| P | {100 * p['avg']:.1f}% | {100 * p['min']:.1f}% | {100 * p['max']:.1f}% |")
        add(f"| ΔH | {dh['avg']:+.4f} | {dh['min']:+.4f} | {dh['max']:+.4f} |")
    if t.get("radii"):
        add("\n## Radii (paper 2 Table 1: step 1/255, steps from Eq. 14)\n")
        add("| attack | eps | steps | accuracy |")
        add("|---|---|---|---|")
        for name, v in t["radii"]["cells"].items():
            add(f"| {name.split('@')[0]} | {v['eps'] * 255:g}/255 | {v['steps']} | {_pct(v)} |")
    c = r.get("checks")
    if c:
        add(f"\n## Gradient-masking checks ({c['n']} images, surrogate `{c['surrogate']}`)\n")
        for k, ok in c["verdicts"].items():
            add(f"- {'PASS' if ok else 'FAIL'}: {k}")
        add(
            "\n- eps sweep: "
            + ", ".join(f"{e}: {100 * v:.1f}%" for e, v in c["eps_sweep"].items())
            + f"\n- PGD steps x1 / x2: {100 * c['steps']['x1']:.1f}% / {100 * c['steps']['x2']:.1f}%"
            + f"\n- ready-made attack with N / 2N solver steps: {100 * c['solver_steps']['N']:.1f}% / "
            f"{100 * c['solver_steps']['2N']:.1f}%"
        )
        for k, v in c["input_gradients"].items():
            add(f"- input gradient, {k}: median l1 {v['median_l1']:.3g}, zero for {100 * v['zero_fraction']:.1f}%")
    if plots:
        add("\n## Plots\n")
        for name, file in plots.items():
            add(f"![{name}]({file})")
    return "\n".join(L) + "\n"


def _plots(r: dict, out_dir: Path) -> Dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: Dict[str, Path] = {}
    grid = [a for a in r["attacks"] if a["name"].startswith("eq11-")]
    if grid:
        fig, ax = plt.subplots(figsize=(6, 4))
        for lam, marker in ((0.5, "o"), (1.0, "s")):
            pts = [(a["surrogate"]["state"], 100 * a["acc"]["acc"]) for a in grid if a["surrogate"]["lam"] == lam]
            if pts:
                ax.scatter(*zip(*pts), alpha=0.35, marker=marker, label=f"lambda = {lam:g} (each K_a)")
        states = sorted({a["surrogate"]["state"] for a in grid})
        best = [min(100 * a["acc"]["acc"] for a in grid if a["surrogate"]["state"] == s) for s in states]
        ax.plot(states, best, "k-o", label="strongest at each state")
        ax.set_xlabel("attacked state i (Eq. 11)")
        ax.set_ylabel(f"robust accuracy at z[{r['early_state']}] (%)")
        ax.set_title("Intermediate-state attacks (paper 1 Fig. 3a)")
        ax.legend(fontsize=8)
        out["fig3a"] = _save(fig, out_dir / "fig3a_intermediate_attacks.png")
    dyn = r.get("dynamics")
    if dyn:
        t = list(range(1, r["n_steps"] + 1))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for key, style in (("entropy/clean", "b-"), ("entropy/adversarial", "r-"),
                           ("entropy/clean+defense", "b--"), ("entropy/adversarial+defense", "r--")):  # fmt: skip
            if key in dyn:
                axes[0].plot(t, dyn[key], style, label=key.split("/")[1])
        axes[0].set_xlabel("state t")
        axes[0].set_ylabel("mean prediction entropy H(z[t])")
        axes[0].set_title("Entropy along the dynamics (Fig. 2c / 3b)")
        axes[0].legend(fontsize=8)
        for key, style in (("deviation/plain", "k-"), ("deviation/defense", "g--")):
            if key in dyn:
                axes[1].plot(t, dyn[key], style, label=key.split("/")[1])
        axes[1].set_xlabel("state t")
        axes[1].set_ylabel("||z~[t] - z[t]|| / ||z[t]||")
        axes[1].set_title("Deviation of perturbed from clean states (Fig. 3c)")
        axes[1].legend(fontsize=8)
        out["dynamics"] = _save(fig, out_dir / "fig3bc_dynamics.png")
        if dyn.get("delta_H_defense_quantiles"):
            q = dyn["delta_H_defense_quantiles"]
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.fill_between(t, [v[0] for v in q], [v[4] for v in q], alpha=0.2, label="10-90%")
            ax.fill_between(t, [v[1] for v in q], [v[3] for v in q], alpha=0.4, label="25-75%")
            ax.plot(t, [v[2] for v in q], "k-", label="median")
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xlabel("state t")
            ax.set_ylabel("ΔH(z[t]) = H defended - H plain")
            ax.set_title(f"Entropy change by {dyn['defense']} on adversarial inputs (Fig. 3b)")
            ax.legend(fontsize=8)
            out["fig3b"] = _save(fig, out_dir / "fig3b_entropy_reduction.png")
    grid5 = (r["paper_tables"].get("table5_tf_r_grid") or {}).get("cells")
    if grid5:
        fig, ax = plt.subplots(figsize=(6, 4))
        for T in sorted({c["T_f"] for c in grid5}):
            cs = [c for c in grid5 if c["T_f"] == T]
            ax.plot([c["cost_vs_plain"] for c in cs], [100 * c["acc"] for c in cs], "o-", label=f"T_f = {T}")
            for c in cs:
                ax.annotate(f"R={c['R']}", (c["cost_vs_plain"], 100 * c["acc"]), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("cost vs plain inference (x)")
        ax.set_ylabel("robust accuracy, non-adaptive (%)")
        ax.set_title("T_f x R: robustness vs cost (Table 5)")
        ax.legend(fontsize=8)
        out["table5"] = _save(fig, out_dir / "table5_tf_r_tradeoff.png")
    if attacks_with_results(r):
        out["coverage"] = _save(_coverage_figure(attack_coverage(r), plt), out_dir / "attack_coverage.png")
    checks = r.get("checks")
    if checks and checks.get("eps_sweep"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        labels = list(checks["eps_sweep"])
        ax.plot(range(len(labels)), [100 * v for v in checks["eps_sweep"].values()], "o-")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("eps")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_title("Accuracy vs eps (gradient-masking check)")
        out["eps_sweep"] = _save(fig, out_dir / "check_eps_sweep.png")
    return out


def _coverage_figure(c, plt):
    """Each attack's accuracy against its attack time, and the greedy cover's worst case
    against the attack time so far (``coverage.attack_coverage``)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    timed = [s for s in c.shares if s.seconds is not None]
    ax.scatter([s.seconds for s in timed], [100 * s.accuracy for s in timed], alpha=0.5, label="one attack")
    for s in sorted(timed, key=lambda s: s.accuracy)[:3]:
        ax.annotate(s.name, (s.seconds, 100 * s.accuracy), fontsize=7)
    xs = [0.0] + [step.seconds for step in c.cover]
    ys = [100 * c.clean_correct / c.n] + [100 * step.accuracy for step in c.cover]
    ax.step(xs, ys, "k-", where="post", label="greedy cover: worst case so far")
    ax.axhline(100 * c.worst_accuracy, color="red", lw=0.8, ls="--", label="the evaluation's worst case")
    ax.set_xlabel("attack time (s)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Which attacks set the worst case")
    ax.legend(fontsize=8)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
