"""Which attacks set the worst case (robustdeq/evaluation/coverage.py, `robustdeq attack-coverage`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from robustdeq.evaluation.coverage import attack_coverage, format_coverage
from robustdeq.evaluation.report import markdown_report, write_outputs

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY_EVAL = PROJECT_ROOT / "training" / "shipped" / "deq-tiny-trades-rs" / "evaluation" / "results.json"


def synthetic_results() -> dict:
    # 8 images; image 7 is wrong when clean. a breaks {0, 1}, b breaks {1, 2, 3}, c breaks {3},
    # and a transfer from another model (only in worst/none) breaks image 4 as well.
    per = {
        "clean": "11111110",
        "attack/a": "00111110",
        "attack/b": "10001110",
        "attack/c": "11101110",
        "worst/none": "00000110",
    }
    attacks = [{"name": "a", "seconds": 10.0}, {"name": "b", "seconds": 30.0}, {"name": "c", "seconds": 5.0}]
    return {"per_sample": per, "attacks": attacks}


def test_shares_count_breaks_and_unique_breaks():
    c = attack_coverage(synthetic_results())
    shares = {s.name: s for s in c.shares}
    assert (c.n, c.clean_correct) == (8, 7)
    assert (shares["a"].breaks, shares["a"].unique) == (2, 1)  # image 0 only a breaks
    assert (shares["b"].breaks, shares["b"].unique) == (3, 1)  # image 2 only b breaks; 3 is shared with c
    assert (shares["c"].breaks, shares["c"].unique) == (1, 0)
    assert shares["b"].accuracy == pytest.approx(4 / 8)


def test_greedy_cover_adds_the_most_new_breaks_first_and_stops_at_the_union():
    c = attack_coverage(synthetic_results())
    assert [(s.name, s.new) for s in c.cover] == [("b", 3), ("a", 1)]  # c adds nothing once b ran
    assert [s.accuracy for s in c.cover] == pytest.approx([4 / 8, 3 / 8])
    assert [s.seconds for s in c.cover] == pytest.approx([30.0, 40.0])
    assert c.union_accuracy == pytest.approx(3 / 8)
    assert c.worst_accuracy == pytest.approx(2 / 8)  # the transfer breaks one more
    text = format_coverage(c)
    assert "lower by 1 images that only transfers" in text
    assert "| b | 3 | 50.0 | 30 | 67% |" in text


def test_a_tie_goes_to_the_cheaper_attack():
    r = synthetic_results()
    r["per_sample"]["attack/c"] = r["per_sample"]["attack/b"]  # c now breaks what b does, at 5 s instead of 30
    assert attack_coverage(r).cover[0].name == "c"


def test_an_evaluation_without_attacks_is_refused():
    with pytest.raises(ValueError, match="no per-sample attack results"):
        attack_coverage({"per_sample": {"clean": "11"}, "attacks": []})


def test_the_shipped_evaluation_and_its_report():
    """On the committed deq-tiny evaluation, APGD-T alone sets the worst case (the cover has one
    row and reaches worst/none); the report carries the section; the CLI prints it."""
    r = json.loads(TINY_EVAL.read_text())
    c = attack_coverage(r)
    assert c.cover[0].name == "apgd-t"
    assert c.union_accuracy == pytest.approx(r["settings"][0]["worst_case"]["acc"])
    assert "### Which attacks set the worst case" in markdown_report(r, {})
    out = subprocess.run(
        [sys.executable, "-m", "robustdeq", "attack-coverage", str(TINY_EVAL.parent)],
        capture_output=True, text=True, check=True, cwd=PROJECT_ROOT,
    )  # fmt: skip
    assert "Greedy cover" in out.stdout and "| apgd-t |" in out.stdout


def test_the_report_folder_gets_the_coverage_plot(tmp_path):
    r = json.loads(TINY_EVAL.read_text())
    write_outputs(r, tmp_path)
    assert (tmp_path / "attack_coverage.png").stat().st_size > 10_000
    assert "![coverage](attack_coverage.png)" in (tmp_path / "report.md").read_text()
