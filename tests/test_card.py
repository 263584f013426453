"""robustdeq/card.py, the one reader of the robustness card: loading from every home (validated),
lookup by (T_f, R, gated, kind), the name format, the table, combining, and the cost figures
that the dashboard and the docs quote from the cards."""

from __future__ import annotations

import copy
import json
import re
import zipfile

import pytest

from robustdeq.card import (
    ADAPTIVE,
    CARD_FILE,
    TRANSFER,
    SettingKey,
    combine_cards,
    find_setting,
    format_card,
    gate_from_card,
    load_card,
    setting_key,
    setting_name,
    validate_card,
)
from robustdeq.project_paths import MODEL_STORE, PROJECT_ROOT
from robustdeq.serving.dashboard import defense_costs

SHIPPED = PROJECT_ROOT / "training" / "shipped"
DEFAULT_RUN = SHIPPED / "deq-small-nfgsm-rs-long"  # the served default, deq-small
TINY_RUN = SHIPPED / "deq-tiny-trades-rs"


def _card(run=DEFAULT_RUN) -> dict:
    return json.loads((run / CARD_FILE).read_text())


def _mar_with(path, files: dict):
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


# ---- loading -------------------------------------------------------------------------------
def test_the_card_loads_the_same_from_every_home():
    homes = (DEFAULT_RUN / CARD_FILE, DEFAULT_RUN, DEFAULT_RUN / "model.pt", MODEL_STORE / "deq-small-defended.mar")
    cards = [load_card(home) for home in homes]
    assert cards[0] == _card() and all(c == cards[0] for c in cards)


def test_every_committed_card_is_valid_and_its_keys_are_unique():
    paths = sorted(PROJECT_ROOT.glob("training/**/" + CARD_FILE)) + sorted(MODEL_STORE.glob("*.mar"))
    assert len(paths) >= 20
    for path in paths:
        card = load_card(path)
        keys = [setting_key(s) for s in card["settings"]]
        assert len(set(keys)) == len(keys), path


def test_an_invalid_card_is_refused_from_a_file_a_folder_and_an_archive(tmp_path):
    broken = _card()
    del broken["settings"][0]["robust"]
    text = json.dumps(broken)
    (tmp_path / CARD_FILE).write_text(text)
    mar = _mar_with(tmp_path / "x.mar", {CARD_FILE: text})
    for home in (tmp_path / CARD_FILE, tmp_path, mar):
        with pytest.raises(ValueError, match="robustness card invalid at settings/0"):
            load_card(home)
    assert load_card(mar, validate=False) == broken  # the raw card, for a caller that asks for it


def test_a_missing_card_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no robustness card at"):
        load_card(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no robustness_card.json"):
        load_card(_mar_with(tmp_path / "bare.mar", {"MAR-INF/MANIFEST.json": "{}"}))


def test_two_rows_with_one_key_are_refused():
    card = _card()
    adaptive = find_setting(card, 2, 10, kind=ADAPTIVE)
    card["settings"].append(copy.deepcopy(adaptive))
    with pytest.raises(ValueError, match=r"settings/\d+: it repeats settings/1"):
        validate_card(card)


# ---- lookup --------------------------------------------------------------------------------
def test_the_adaptive_and_the_transferred_row_of_one_setting_are_told_apart():
    card = _card()
    same_name = [s for s in card["settings"] if s["name"] == "defense-T2-R10"]
    assert len(same_name) == 2  # the committed card: one name, two measurements
    adaptive, transfer = find_setting(card, 2, 10, kind=ADAPTIVE), find_setting(card, 2, 10, kind=TRANSFER)
    assert adaptive is not transfer and {id(adaptive), id(transfer)} == {id(s) for s in same_name}
    assert adaptive["robust_kind"].startswith("adaptive") and adaptive["cost_vs_plain"] == pytest.approx(18.93, 1e-3)
    assert transfer["robust_kind"].startswith("non-adaptive")
    assert transfer["cost_vs_plain"] == pytest.approx(20.40, 1e-3)
    assert setting_key(adaptive) == SettingKey(2, 10, False, ADAPTIVE)
    assert setting_key(transfer) == SettingKey(2, 10, False, TRANSFER)
    # without a kind: the strongest measurement there is
    assert find_setting(card, 2, 10) is adaptive
    assert find_setting(card, 1, 5)["robust_kind"].startswith("non-adaptive")  # only transferred
    assert find_setting(card, 2, 10, gated=True)["name"] == "gated-T2-R10"
    assert find_setting(card, 2, 10, gated=True, kind=TRANSFER) is None
    assert find_setting(card, None, 0)["name"] == "none" and find_setting(card, 7, 0, gated=True)["name"] == "none"
    assert find_setting(card, 3, 7) is None and find_setting(None, 2, 10) is None


def test_the_gate_is_the_gated_row_s_threshold_at_the_readout_state():
    card = _card()
    gate = gate_from_card(card)
    assert gate == {"threshold": pytest.approx(find_setting(card, 2, 10, gated=True)["threshold"]), "state": 8}
    assert gate_from_card(_card(SHIPPED / "deq-small-clean")) is None and gate_from_card(None) is None


# ---- name, table, combination --------------------------------------------------------------
def test_one_name_format():
    from robustdeq.defense import DefenseSetting

    assert setting_name(2, 10) == "defense-T2-R10" and setting_name(4, 5, gated=True) == "gated-T4-R5"
    assert setting_name(2, 0) == setting_name(None, 0, gated=True) == "none"
    assert DefenseSetting(T_f=4, R=5, gated=True).name == "gated-T4-R5" and DefenseSetting(R=0).name == "none"
    for s in _card()["settings"]:  # the committed names follow it
        assert s["name"] == setting_name(s["T_f"], s["R"], s["gated"])


def test_the_table_marks_each_row_s_measurement():
    rows = format_card(_card()).splitlines()[2:]
    same = [r for r in rows if r.startswith("defense-T2-R10 ")]
    assert len(same) == 2 and "18.9x  adaptive attacks (n = 200)" in same[0] and "20.4x  transfer only" in same[1]


def _synthetic(n: int, date: str, rows) -> dict:
    card = _card(TINY_RUN)
    card["evaluation"] = {**card["evaluation"], "n": n, "date": date, "subset_id": f"s{n}", "attacks": [f"a{n}"]}
    card["settings"] = [s for s in card["settings"] if rows(s)]
    return card


def test_combining_takes_the_plain_row_from_the_main_card_and_the_rest_from_the_defended_one():
    main = _synthetic(1000, "d1", lambda s: s["R"] == 0)
    defended = _synthetic(200, "d2", lambda s: True)
    card = combine_cards(main, defended)
    validate_card(card)
    assert card["settings"][0] is main["settings"][0]
    assert card["settings"][1:] == [s for s in defended["settings"] if s["R"] != 0]
    assert card["evaluation"]["attacks"] == ["a1000", "a200"] and card["evaluation"]["n"] == 1000
    assert card["evaluation"]["defended"] == {
        "n": 200, "subset_id": "s200", "date": "d2", "note": "the defense settings were evaluated on the first 200 "
        "of the 1000 images"}  # fmt: skip
    other = {**defended, "checkpoint_sha256": "0" * 64}
    with pytest.raises(ValueError, match="different checkpoints"):
        combine_cards(main, other)
    with pytest.raises(ValueError, match="different eps"):
        combine_cards(main, {**defended, "threat_model": {"norm": "linf", "eps": 4 / 255}})


# ---- the cost figure, read from the cards --------------------------------------------------
def test_the_dashboard_quotes_the_served_cards_cost():
    small = find_setting(load_card(MODEL_STORE / "deq-small-defended.mar"), 2, 10, kind=ADAPTIVE)["cost_vs_plain"]
    tiny = find_setting(load_card(MODEL_STORE / "deq-tiny-defended.mar"), 2, 10, kind=ADAPTIVE)["cost_vs_plain"]
    text = defense_costs()
    assert text.endswith(f": {small:.0f}x for deq-small, {tiny:.0f}x for deq-tiny")
    dashboard = (PROJECT_ROOT / "serving" / "grafana" / "robustdeq-dashboard.json").read_text()
    assert text in dashboard


def test_the_dashboard_figure_follows_the_card(tmp_path):
    card = _card()
    find_setting(card, 2, 10, kind=ADAPTIVE)["cost_vs_plain"] = 41.7
    _mar_with(tmp_path / "mine-defended.mar", {CARD_FILE: json.dumps(card)})
    _mar_with(tmp_path / "plain-only-defended.mar", {CARD_FILE: json.dumps(_card(SHIPPED / "deq-small-clean"))})
    expected = "cost_vs_plain in the robustness card with T_f = 2, R = 10: 42x for mine"
    assert defense_costs(tmp_path, models=()) == expected


def test_the_docs_quote_the_cards_and_the_bench_report():
    small = find_setting(_card(), 2, 10, kind=ADAPTIVE)["cost_vs_plain"]
    tiny = find_setting(_card(TINY_RUN), 2, 10, kind=ADAPTIVE)["cost_vs_plain"]
    serving = (PROJECT_ROOT / "docs" / "serving.md").read_text()
    assert f"costs {small:.0f}x (deq-small) to {tiny:.0f}x (deq-tiny) a plain solve" in serving
    # docs/performance.md quotes the bench report of the same run, and names what each figure measures
    performance = (PROJECT_ROOT / "docs" / "performance.md").read_text()
    bench = (PROJECT_ROOT / "docs" / "bench-deq-small.md").read_text()
    batch_64 = bench[bench.index("(paper 1 Table 10), batch 64") :]
    grid = re.search(r"^\| 2 \| 10 \| [\d.]+ \| ([\d.]+x) \|", batch_64, re.M)[1]
    ungated = re.search(r"^\| clean, ungated \(always defends\) \| all \| ([\d.]+x) \|", bench, re.M)[1]
    assert f"| 2 | 203 (3.6x) | 80 (9.1x) | 44 ({grid})" in performance and f"| all | {ungated} |" in performance
    assert f"The ungated {ungated} and section 1's {grid} measure the same ratio" in performance
    assert f"the card's {small:.1f}x is a third measurement" in performance
