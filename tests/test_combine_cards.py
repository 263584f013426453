"""A defense evaluated on the first images of the subset, combined with the undefended model on all of them."""

from __future__ import annotations

import json

import pytest

from robustdeq.cli import main as cli
from robustdeq.evaluation.prefix import combine_cards
from robustdeq.evaluation.report import validate_card, write_outputs

from .test_cross_model import _run


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory, cifar_test):
    root = tmp_path_factory.mktemp("prefix")
    out = {}
    chain = dict(families=("pgd", "adaptive"), adaptive_steps=2, defended_apgd_iters=2, defended_apgd_targets=1,
                 defended_square_queries=10)  # fmt: skip
    runs = {"main": dict(defenses=("none",)), "defended": dict(n=12, **chain), "other": dict(n=12, seed=1)}
    for name, kw in runs.items():
        ev = _run(root / name, **kw)
        write_outputs(ev.results(), ev.out)
        out[name] = ev
    return out


def test_the_card_keeps_each_row_at_its_own_n(evaluations, tmp_path, capsys):
    main, defended = evaluations["main"], evaluations["defended"]
    # the first 12 images of the 24: the smaller run repeats the larger one's per-sample results
    assert defended.results()["per_sample"]["clean"] == main.results()["per_sample"]["clean"][:12]
    card = combine_cards(main.results(), defended.results())
    validate_card(card)
    rows = {s["name"]: s for s in card["settings"]}
    assert set(rows) == {"none", "defense-T2-R2"}
    assert rows["none"]["robust"]["n"] == 24 and rows["defense-T2-R2"]["robust"]["n"] == 12
    assert card["evaluation"]["n"] == 24 and card["evaluation"]["defended"]["n"] == 12
    assert any(a.startswith("defense-T2-R2/") for a in card["evaluation"]["attacks"])
    # the command writes the same card and prints it with the smaller n marked
    assert cli(["combine-cards", str(main.out), str(defended.out), "--out", str(tmp_path / "card.json")]) == 0
    written = json.loads((tmp_path / "card.json").read_text())
    assert written["settings"] == json.loads(json.dumps(card["settings"]))
    assert "(n = 12)" in capsys.readouterr().out


def test_other_images_or_no_defense_are_refused(evaluations):
    main = evaluations["main"].results()
    with pytest.raises(ValueError, match="not the first 12"):
        combine_cards(main, evaluations["other"].results())
    with pytest.raises(ValueError, match="no defense setting"):
        combine_cards(main, main)
    with pytest.raises(ValueError, match="not the first 24"):
        combine_cards(evaluations["defended"].results(), main)
