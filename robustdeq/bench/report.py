"""The Markdown report of ``robustdeq bench`` (printed and written beside the JSON)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..stages import STAGES
from .targets import target_lines

__all__ = ["render_markdown"]


def _header(r: Dict[str, Any]) -> List[str]:
    return [
        f"# robustdeq bench: {r['model']}",
        "",
        f"- model `{r['model']}` ({r['parameters']:,} parameters) from {r['origin']}; N = {r['N']}, "
        f"readout z[{r['readout_state']}]",
        f"- {r['threads']} threads, torch {r['torch_version']}; medians over {r['repeats']} repeats; {_load(r)}",
        f"- inputs: {r['data']}",
        f"- robustness card: {r['card']}",
    ]


def _load(r: Dict[str, Any]) -> str:
    start, end = r.get("load_average_start"), r.get("load_average_end")
    if start is None or end is None:
        return "load average unknown"
    return f"load average {start:.2f} at the start, {end:.2f} at the end ({r['cpu_count']} CPUs)"


def _notes(row: Dict[str, Any]) -> str:
    if "first_call_s" not in row:
        return ""
    note = f"first call {row['first_call_s']:.1f} s; max abs logit diff {row['max_abs_logit_diff']:.1e}"
    if row.get("graphs"):
        note += f"; {row['graphs']} graphs, {row['graph_breaks']} graph breaks so far"
        if row.get("inductor_cache_hits"):
            note += f" ({row['inductor_cache_hits']} from inductor's on-disk cache)"
    return note


def _path_row(B: int, row: Dict[str, Any]) -> str:
    if "seconds" not in row:
        return f"| {B} | {row['trial']} | - | - | - | {row.get('skipped') or row.get('error')} |"
    return (
        f"| {B} | {row['trial']} | {row['samples_per_s']:.0f} | {B / row['eager_s']:.0f} | "
        f"{row['speedup_vs_eager']:.2f}x | {_notes(row)} |"
    )


def _plain_table(r: Dict[str, Any]) -> List[str]:
    lines = [
        "",
        "## Plain inference: eager PyTorch, ONNX Runtime and trials",
        "",
        "Each path against eager PyTorch timed in the same run (ONNX Runtime: in the block before it; trials: "
        "interleaved). ONNX Runtime runs the exported plain forward, which also reads the head at every state.",
        "",
        "| batch | path | samples/s | eager samples/s, same run | vs eager | notes |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for plain in r["plain"]:
        B = plain["batch_size"]
        sps = plain["samples_per_s"]
        lines.append(f"| {B} | eager PyTorch | {sps:.0f} | {sps:.0f} | 1.00x | the reference of the defense grid |")
        rows = [dict(row, trial="ONNX Runtime") for row in r["onnx"] if row["batch_size"] == B]
        rows += [row for row in r.get("trials", []) if row["batch_size"] == B]
        lines += [_path_row(B, row) for row in rows]
    return lines


def _units_table(r: Dict[str, Any]) -> List[str]:
    lines = [
        "",
        "## Unit costs of the floor (docs/design.md §3)",
        "",
        "floor(T_f, R) = N t_f + floor(N / T_f) R t_step; t_f: one forward of f; t_step: one entropy-gradient "
        "step of Eq. 8 (inject + f + head forward, backward to the input).",
        "",
        "| batch | t_f (ms) | t_step (ms) | t_step / t_f |",
        "|---:|---:|---:|---:|",
    ]
    for u in r["units"]:
        lines.append(
            f"| {u['batch_size']} | {1e3 * u['t_f_s']:.2f} | {1e3 * u['t_step_s']:.2f} | "
            f"{u['t_step_s'] / u['t_f_s']:.1f} |"
        )
    return lines


def _grid_tables(r: Dict[str, Any]) -> List[str]:
    lines = []
    for plain in r["plain"]:
        B = plain["batch_size"]
        lines += [
            "",
            f"## Defense over T_f x R (paper 1 Table 10), batch {B}",
            "",
            f"plain: {plain['samples_per_s']:.0f} samples/s. R = 0 runs the defense's loop with no intervention.",
            "",
            "| T_f | R | samples/s | slowdown vs plain | floor (ms) | measured / floor |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for d in (d for d in r["defense"] if d["batch_size"] == B):
            lines.append(
                f"| {d['T_f']} | {d['R']} | {d['samples_per_s']:.1f} | {d['slowdown_vs_plain']:.1f}x | "
                f"{1e3 * d['floor_s']:.1f} | {d['ratio_to_floor']:.2f} |"
            )
    return lines


def _stage_table(r: Dict[str, Any]) -> List[str]:
    parts = (*STAGES, "other")
    lines = [
        "",
        "## Where the time goes (ms per batch, share of the total)",
        "",
        "stem: model.inject; solve: the N solver steps; defense: entropy-descent steps with the re-solve of the "
        "intervened step; head: model.head at the read-out state; other: outside those stages.",
        "",
        "| batch | setting | total | " + " | ".join(parts) + " |",
        "|---:|---|---:|" + "---:|" * len(parts),
    ]
    for s in r["stages"]:
        cells = [f"{1e3 * s[p]:.2f} ({100 * s[p] / s['total']:.0f}%)" for p in parts]
        lines.append(f"| {s['batch_size']} | {s['setting']} | {1e3 * s['total']:.2f} | " + " | ".join(cells) + " |")
    return lines


def _rate(t: Dict[str, Any]) -> str:
    lo, hi = t["ci95"]
    return f"{t['triggered']} / {t['n']} = {100 * t['trigger_rate']:.1f}% ({100 * lo:.1f}-{100 * hi:.1f}%)"


def _card_line(card: Optional[Dict[str, Any]]) -> str:
    if card is None:
        return "- card: no adaptive robust accuracy of both the gated and the ungated setting"
    g, u = card["gated"], card["ungated"]
    return (
        f"- card, adaptive robust accuracy: {g['name']} {100 * g['acc']:.1f}% vs {u['name']} {100 * u['acc']:.1f}% "
        f"({card['points']:+.1f} points, n = {g['n']}); card cost vs plain {g['cost_vs_plain']:.2f}x vs "
        f"{u['cost_vs_plain']:.2f}x"
    )


def _gated_section(g: Dict[str, Any]) -> List[str]:
    lines = ["", "## Entropy-gated defense", ""]
    if "skipped" in g:
        return lines + [f"skipped: {g['skipped']}"]
    s, t = g["setting"], g["timing"]
    card_rate = g.get("card_trigger_rate_clean")
    lines += [
        f"- gate: H(z[{s['gate_state']}]) > {s['threshold']:.4f}, then Algorithm 1 with T_f = {s['T_f']}, "
        f"R = {s['R']}; PGD inputs: {g['attack']}",
        f"- PGD perturbation l_inf: {g['pgd']['perturbation_linf']['min']:.5f} .. "
        f"{g['pgd']['perturbation_linf']['max']:.5f} (eps {g['pgd']['eps']:.5f})",
        "- card's trigger rate on clean inputs: " + (f"{100 * card_rate:.1f}%" if card_rate is not None else "-"),
        _card_line(g.get("card_robust")),
        "",
        f"| inputs | gate triggers (95% CI) | time vs plain, batch {g['batch_size']} |",
        "|---|---:|---:|",
        f"| clean, gated | {_rate(g['clean'])} | {t['cost_clean_vs_plain']:.2f}x |",
        f"| PGD-10, gated | {_rate(g['pgd'])} | {t['cost_pgd_vs_plain']:.2f}x |",
        f"| clean, ungated (always defends) | all | {t['cost_ungated_vs_plain']:.2f}x |",
    ]
    return lines


def _training_table(r: Dict[str, Any]) -> List[str]:
    lines = [
        "",
        f"## Training steps, batch {r['training_batch_size']} (paper 1 Table 9)",
        "",
        "Attack: PGD-10 / TRADES-10 inner max, phantom gradient K = 5, Jacobian reg.; interleaved rounds, "
        "total samples / total time.",
        "",
        "| variant | samples/s | mean depth n | Sec. 3.3 speed-up |",
        "|---|---:|---:|---:|",
    ]
    sp = r.get("training_speedup_sec33", {})
    for row in r["training"]:
        up = sp.get(row["objective"]) if row["random_depth"] else None
        lines.append(
            f"| {row['variant']} | {row['samples_per_s']:.1f} | {row['mean_depth']:.1f} | "
            + (f"{up:.2f}x |" if up else "- |")
        )
    return lines


def render_markdown(r: Dict[str, Any], plots: Optional[Dict[str, str]] = None) -> str:
    lines = _header(r) + _plain_table(r) + _units_table(r) + _grid_tables(r) + _stage_table(r)
    lines += _gated_section(r["gated"])
    lines += ["", "## Targets", ""] + [f"- {line}" for line in target_lines(r["targets"])]
    if r.get("training"):
        lines += _training_table(r)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({file})" for name, file in plots.items()]
    return "\n".join(lines)
