"""The benchmark's speed targets, checked and reported honestly (PASS, FAIL or SKIP with why).

(a) the ungated defense at T_f = 2, R = 10, batch 64 runs within 1.15x of its
    operation-count floor (docs/design.md §3);
(b) the entropy-gated defense costs <= 2x plain inference on clean inputs, triggers on
    >= 90% of PGD-10 inputs, and its adaptive robust accuracy (robustness card) is within
    1 point of the ungated defense's;
(c) ONNX Runtime plain inference is faster than eager PyTorch (at every batch size).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

FLOOR_SETTING = {"batch_size": 64, "T_f": 2, "R": 10}
FLOOR_RATIO_MAX = 1.15
GATED_COST_MAX = 2.0
PGD_TRIGGER_MIN = 0.90
ROBUST_POINTS_MIN = -1.0

__all__ = ["check_targets", "target_lines"]


def _verdict(key: str, target: str, passed: Optional[bool], detail: str) -> Dict[str, Any]:
    status = "SKIP" if passed is None else ("PASS" if passed else "FAIL")
    return {"id": key, "target": target, "status": status, "detail": detail}


def _floor_target(defense: List[Dict[str, Any]]) -> Dict[str, Any]:
    target = "ungated T_f=2, R=10 at batch 64 within 1.15x of its operation-count floor"
    row = next((d for d in defense if all(d[k] == v for k, v in FLOOR_SETTING.items())), None)
    if row is None:
        return _verdict("a", target, None, "not measured (needs batch size 64 and T_f = 2, R = 10 in the grid)")
    ratio = row["ratio_to_floor"]
    return _verdict("a", target, ratio <= FLOOR_RATIO_MAX, f"measured / floor = {ratio:.2f}")


def _gated_target(gated: Dict[str, Any]) -> Dict[str, Any]:
    target = "gated defense: <= 2x plain on clean, >= 90% of PGD-10 inputs trigger, card robust acc within 1 point"
    if "skipped" in gated:
        return _verdict("b", target, None, gated["skipped"])
    cost = gated["timing"]["cost_clean_vs_plain"]
    trigger = gated["pgd"]["trigger_rate"]
    checks = [
        (cost <= GATED_COST_MAX, f"cost on clean {cost:.2f}x plain (batch {gated['batch_size']})"),
        (trigger >= PGD_TRIGGER_MIN, f"PGD-10 trigger rate {100 * trigger:.1f}% (n = {gated['pgd']['n']})"),
    ]
    card = gated.get("card_robust")
    if card is None:
        checks.append((None, "the card has no adaptive robust accuracy of both gated and ungated"))
    else:
        checks.append((card["points"] >= ROBUST_POINTS_MIN, f"card robust acc gated {100 * card['gated']['acc']:.1f}% "
                       f"vs ungated {100 * card['ungated']['acc']:.1f}% ({card['points']:+.1f} points)"))  # fmt: skip
    detail = "; ".join(f"{text} [{'ok' if ok else ('n/a' if ok is None else 'FAIL')}]" for ok, text in checks)
    oks = [ok for ok, _ in checks]
    passed = False if False in oks else (None if None in oks else True)
    return _verdict("b", target, passed, detail)


def _onnx_target(onnx: List[Dict[str, Any]]) -> Dict[str, Any]:
    target = "ONNX Runtime plain inference faster than eager PyTorch"
    measured = [r for r in onnx if "skipped" not in r]
    if not measured:
        reason = onnx[0]["skipped"] if onnx else "not measured"
        return _verdict("c", target, None, reason)
    detail = ", ".join(f"batch {r['batch_size']}: {r['speedup_vs_eager']:.2f}x" for r in measured)
    return _verdict("c", target, all(r["speedup_vs_eager"] > 1.0 for r in measured), detail)


def check_targets(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [
        _floor_target(results["defense"]),
        _gated_target(results["gated"]),
        _onnx_target(results["onnx"]),
    ]


def target_lines(targets: List[Dict[str, Any]]) -> List[str]:
    return [f"{t['status']} ({t['id']}) {t['target']}: {t['detail']}" for t in targets]
