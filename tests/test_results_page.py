"""docs/results.md and the RobustBench exports are generated from the committed results and current."""

from __future__ import annotations

import json
import shutil

from robustdeq.data import PROJECT_ROOT
from robustdeq.evaluation.results_page import MODELS, PAIRS, render_page, robustbench_entries, write_page

REGENERATE = "python -m robustdeq.evaluation.results_page"
#: the keys of RobustBench's model_info files (model_info/cifar10/Linf/*.json in its repository)
ROBUSTBENCH_KEYS = {
    "link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue", "architecture", "eps",
    "clean_acc", "reported", "autoattack_acc", "footnote", "unreliable",
}  # fmt: skip


def test_the_committed_page_and_exports_are_current():
    page = PROJECT_ROOT / "docs" / "results.md"
    assert page.read_text() == render_page(), f"docs/results.md is stale: run {REGENERATE}"
    entries = robustbench_entries()
    folder = PROJECT_ROOT / "docs" / "robustbench"
    assert {p.stem for p in folder.glob("*.json")} == set(entries), f"stale exports: run {REGENERATE}"
    for name, entry in entries.items():
        assert json.loads((folder / f"{name}.json").read_text()) == entry, f"{name}.json is stale: run {REGENERATE}"


def test_every_figure_comes_from_a_committed_result(tmp_path):
    # a copy of the project with one evaluation: its numbers appear, the others are pending
    recipe = "deq-tiny-trades-rs"
    src = PROJECT_ROOT / "training" / "shipped" / recipe / "evaluation" / "results.json"
    dst = tmp_path / "training" / "shipped" / recipe / "evaluation" / "results.json"
    dst.parent.mkdir(parents=True)
    shutil.copy(src, dst)
    (tmp_path / "docs").mkdir()
    written = write_page(tmp_path)
    page = (tmp_path / "docs" / "results.md").read_text()
    results = json.loads(src.read_text())
    clean = 100 * results["settings"][0]["clean"]["acc"]
    worst = 100 * results["settings"][0]["worst_case"]["acc"]
    assert f"**{worst:.1f} [" in page and f"| {clean:.1f} [" in page
    assert page.count("not evaluated yet") == len(MODELS) - 1
    assert page.count("pending: not both evaluated") == len(PAIRS)
    assert "Verdict.** Pending" in page
    # the defended setting is exported separately from the plain model, in RobustBench's layout
    names = sorted(p.stem for p in written if p.suffix == ".json")
    assert names == [recipe, f"{recipe}-defense-T2-R10"]
    for p in written[1:]:
        entry = json.loads(p.read_text())
        assert set(entry) == ROBUSTBENCH_KEYS
        assert entry["eps"] == "8/255" and float(entry["autoattack_acc"]) <= float(entry["clean_acc"])
    plain = json.loads((tmp_path / "docs" / "robustbench" / f"{recipe}.json").read_text())
    defended = json.loads((tmp_path / "docs" / "robustbench" / f"{recipe}-defense-T2-R10.json").read_text())
    assert plain["number_forward_passes"] == 1 < defended["number_forward_passes"]
    assert plain["autoattack_acc"] == f"{worst:.2f}"
    # its defense ran the first chain (no APGD-T through it): the gain names it, the export is unreliable
    assert "Does the defense help? (first chain)" in page and "no APGD-T through the defense" in page
    assert defended["unreliable"] is True and "no APGD-T through the defense" in defended["footnote"]
    assert plain["unreliable"] is False


def _shipped_results(recipe: str) -> dict:
    return json.loads((PROJECT_ROOT / "training" / "shipped" / recipe / "evaluation" / "results.json").read_text())


def _write_project(root, recipe: str, folders: dict) -> None:
    """A project copy at ``root`` whose only model holds ``folder -> results`` evaluations; its page written."""
    for folder, r in folders.items():
        path = root / "training" / "shipped" / recipe / folder / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(r))
    (root / "docs").mkdir()
    write_page(root)


def test_a_defense_evaluated_on_the_first_images_is_read_from_its_own_folder(tmp_path):
    recipe = "deq-tiny-trades-rs"
    results = _shipped_results(recipe)
    defended = {**results, "subset": {**results["subset"], "n": 200}}  # what combine-cards pairs
    _write_project(tmp_path, recipe, {"evaluation": results, "evaluation-defended": defended})
    assert "defense-T2-R10: " in render_page(tmp_path) and "(first 200)" in render_page(tmp_path)
    entry = json.loads((tmp_path / "docs" / "robustbench" / f"{recipe}-defense-T2-R10.json").read_text())
    assert entry["link"].endswith(f"{recipe}/evaluation-defended/results.json") and "200 CIFAR-10" in entry["footnote"]
    plain = json.loads((tmp_path / "docs" / "robustbench" / f"{recipe}.json").read_text())
    assert plain["link"].endswith(f"{recipe}/evaluation/results.json") and "1000 CIFAR-10" in plain["footnote"]


def test_a_full_test_set_evaluation_is_the_exported_headline(tmp_path):
    recipe = "deq-tiny-trades-rs"
    results = _shipped_results(recipe)
    worst = {**results["settings"][0]["worst_case"], "acc": 0.1234, "n": 10000}
    full = {**results, "subset": {**results["subset"], "n": 10000},
            "attacks": [a for a in results["attacks"] if a["name"] in ("pgd-ready", "apgd-t")],
            "settings": [{**results["settings"][0], "worst_case": worst}], "cross_model": {}}  # fmt: skip
    _write_project(tmp_path, recipe, {"evaluation": results, "evaluation-full": full})
    assert "the same, full test set (sharded; PGD-10, APGD-T)" in (tmp_path / "docs" / "results.md").read_text()
    plain = json.loads((tmp_path / "docs" / "robustbench" / f"{recipe}.json").read_text())
    assert plain["link"].endswith(f"{recipe}/evaluation-full/results.json") and plain["autoattack_acc"] == "12.34"
    assert plain["footnote"].startswith("Evaluated on the full CIFAR-10 test set (10000 images, sharded).")
    assert "attacks here (PGD-10, APGD-T)," in plain["footnote"]


def test_autoattack_standard_is_named_next_to_the_worst_case_in_the_card_page_and_export(tmp_path):
    """Issue 30 section 3: where ``--attacks autoattack`` ran, RobustBench's autoattack_acc is the
    reference AutoAttack standard, the per-sample worst case (which includes it) stays beside it,
    and the card carries it; elsewhere autoattack_acc stays the worst case, named as such."""
    from robustdeq.card import format_card, validate_card
    from robustdeq.evaluation.report import robustness_card
    from robustdeq.stats import correct_string, parse_correct_string

    recipe = "deq-tiny-trades-rs"
    results = _shipped_results(recipe)
    worst = parse_correct_string(results["per_sample"]["worst/none"])
    standard = [w and i % 10 != 0 for i, w in enumerate(worst)]  # AutoAttack breaks one image in ten more
    n, correct = len(standard), sum(standard)
    acc = {"acc": correct / n, "correct": correct, "n": n, "ci95": [0.1, 0.2]}
    entry = {**results["attacks"][-1], "name": "autoattack-standard", "attack": "autoattack-standard", "acc": acc}
    worst_case = {**results["settings"][0]["worst_case"], "acc": correct / n, "correct": correct}
    with_aa = {**results, "attacks": [*results["attacks"], entry],
               "settings": [{**results["settings"][0], "worst_case": worst_case}, *results["settings"][1:]],
               "per_sample": {**results["per_sample"], "attack/autoattack-standard": correct_string(standard),
                              "worst/none": correct_string(standard)}}  # fmt: skip
    card = robustness_card(with_aa)
    validate_card(card)
    assert card["autoattack_standard"] == {"acc": correct / n, "n": n, "ci95": [0.1, 0.2]}
    assert "AutoAttack standard (no defense)" in format_card(card)
    assert "autoattack_standard" not in robustness_card(results)
    _write_project(tmp_path, recipe, {"evaluation": with_aa})
    row = next(line for line in (tmp_path / "docs" / "results.md").read_text().splitlines() if f"`{recipe}`" in line)
    assert f"| {100 * correct / n:.1f} [" in row and "not run" not in row
    plain = json.loads((tmp_path / "docs" / "robustbench" / f"{recipe}.json").read_text())
    assert plain["autoattack_acc"] == f"{100 * correct / n:.2f}" == plain["worst_case_acc"]
    assert "autoattack_acc is AutoAttack standard" in plain["footnote"] and "AutoAttack included" in plain["footnote"]
    defended = json.loads((tmp_path / "docs" / "robustbench" / f"{recipe}-defense-T2-R10.json").read_text())
    assert "worst_case_acc" not in defended and "not AutoAttack standard" in defended["footnote"]


def test_a_chain_weaker_than_the_current_one_is_named():
    from robustdeq.evaluation.compare import chain_gaps, chain_notes
    from robustdeq.evaluation.results_page import _chain_steps

    results = _shipped_results("deq-tiny-trades-rs")
    setting = results["settings"][1]
    assert chain_gaps(results, setting) == [
        "no APGD-T through the defense",
        "Square with 100 queries instead of 1000, on 100 of the 203 survivors",
    ]
    assert _chain_steps(setting)[-1] == "Square (100 queries on 100 of its 203 survivors)"
    # 'robustdeq compare' of the defense settings says which chain produced a gain (comparisons.md)
    notes = chain_notes(results)
    assert notes[0].startswith("defense-T2-R10 was evaluated with the first chain") and notes[0].endswith(
        "no APGD-T through the defense; Square with 100 queries instead of 1000, on 100 of the 203 survivors."
    )
    chain = [
        {"attack": "bpda", "attacked": 211},
        {"attack": "apgd-t-unroll", "attacked": 207, "targets": 9, "iterations": 20},
        {"attack": "square", "attacked": 203, "queried": 203, "queries": 1000},
    ]
    current = {**setting, "chain": chain}
    assert chain_gaps(results, current) == []
    assert _chain_steps(current) == [
        "BPDA",
        "APGD-T via the unroll (9 targets x 20 iterations)",
        "Square (1000 queries on every survivor)",
    ]


def _plain_model(pgd2: float, pgd8: float, worst: float, attacks: dict, n: int = 100) -> dict:
    """A minimal evaluation of a plain-trained model: protocol-exact PGD at 2 and 8/255, per-sample results."""
    bits = lambda acc: "1" * round(acc * n) + "0" * (n - round(acc * n))  # noqa: E731
    cells = {f"pgd@{e}/255": {"acc": a} for e, a in ((2, pgd2), (8, pgd8))}
    per_sample = {"clean": bits(0.7), "worst/none": bits(worst), **{k: bits(a) for k, a in attacks.items()}}
    return {"paper_tables": {"radii": {"cells": cells}}, "per_sample": per_sample}


def test_the_paper2_verdict_says_whether_the_claim_survives_stronger_attacks():
    from robustdeq.evaluation.results_page import _paper2_verdict

    deq = _plain_model(0.20, 0.02, 0.0, {"attack/apgd-ce": 0.0})
    # a flat protocol curve that the suite's attacks break: masking, the claim does not hold
    masked = _plain_model(0.46, 0.45, 0.01, {"attack/pgd-ready": 0.30, "attack/square": 0.01,
                                             "cross-model/deq-small-clean": 0.20})  # fmt: skip
    verdict = _paper2_verdict({"lyadeq-small-clean": masked, "deq-small-clean": deq}, [])
    assert "keeps 45.0% and the plain DEQ 2.0%" in verdict
    assert "(paper 2: 43.96 for its LyaDEQ with the orthogonal FC layer, 11.12 for its DEQ" in verdict
    assert "strongest single attack on the LyaDEQ is `square` (1.0%)" in verdict
    assert "leave the LyaDEQ 20.0%" in verdict and "overstates the LyaDEQ's robustness by 44.0 points" in verdict
    assert "claim holds only under the protocol's attack" in verdict and "(43.0 points)" in verdict
    # a LyaDEQ that stays robust under every attack: the claim holds in direction
    robust = _plain_model(0.40, 0.30, 0.28, {"attack/apgd-t": 0.28})
    verdict = _paper2_verdict({"lyadeq-small-clean": robust, "deq-small-clean": deq}, [])
    assert "claim holds in direction" in verdict and "28.0 points more robust" in verdict
    assert "overstates" not in verdict
    # no more robust than the DEQ even under the protocol: the claim does not hold at all
    broken = _plain_model(0.30, 0.0, 0.0, {"attack/pgd-ready": 0.0})
    verdict = _paper2_verdict({"lyadeq-small-clean": broken, "deq-small-clean": deq}, [])
    assert "not even under the protocol's own attack" in verdict and "(0.0% against 2.0% under the protocol" in verdict
    # one of the two missing: pending, naming what is missing
    assert _paper2_verdict({"lyadeq-small-clean": robust}, ["deq-small-clean"]).startswith("Pending")


def test_paper2_final_iterate_count_is_shown_beside_the_any_iterate_count(tmp_path):
    # paper 2 scores the final iterate; the radii job counts any iterate. With a final-iterate file
    # ('robustdeq accuracy --step-size 1/255 --out') for both models of the plain pair, the table
    # gets a final-iterate row each and the note gives both counts; with one missing it says how
    pair = ("lyadeq-small-clean", "deq-small-clean")
    finals = {"lyadeq-small-clean": (0.031, 0.027, 16), "deq-small-clean": (0.012, 0.012, 8)}
    for recipe in pair:
        folder = tmp_path / "training" / "shipped" / recipe / "evaluation"
        folder.mkdir(parents=True)
        shutil.copy(PROJECT_ROOT / "training" / "shipped" / recipe / "evaluation" / "results.json", folder)
    (tmp_path / "docs").mkdir()
    write_page(tmp_path)
    assert "The final iterate is not measured yet" in (tmp_path / "docs" / "results.md").read_text()
    for recipe in pair:
        final, readout, state = finals[recipe]
        record = {"state": state, "n_states": 16, "clean_acc_final": 0.5, "pgd_acc_final": final, "pgd_acc": readout}
        (tmp_path / "training" / "shipped" / recipe / "evaluation" / "final-iterate-pgd.json").write_text(
            json.dumps(record)
        )
    write_page(tmp_path)
    page = (tmp_path / "docs" / "results.md").read_text()
    assert "The final iterate is not measured yet" not in page
    row = "| this machine, final iterate | `lyadeq-small-clean` | 50.0 | PGD | – | – | – | 3.1 (z[16]: 2.7) | |"
    assert row in page
    any_iterate = _shipped_results("lyadeq-small-clean")["paper_tables"]["radii"]["cells"]["pgd@8/255"]["acc"]
    note = f"`lyadeq-small-clean` 3.1% at z[N] and 2.7% at its readout z[16] (any iterate: {100 * any_iterate:.1f}%)"
    assert note in page
    assert "`deq-small-clean` 1.2% at z[N]" in page and "Paper 2's figures for these rows are 43.96 and 11.12" in page
