"""The package's layering: training, evaluation and serving stand side by side on a shared base
(number parsing, the defense defaults, the readout choice, the card) and import none of each
other; the server's option parsing loads neither training code nor torch; the defense defaults
are defined once. ``lint-imports`` checks the same statically (contracts in pyproject.toml)."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from robustdeq.defense_defaults import DEFAULT_BETA, DEFAULT_EPS, DEFAULT_R, DEFAULT_T_F, PAPER_DEFAULTS
from robustdeq.project_paths import PROJECT_ROOT


def loaded_after_import(*modules: str) -> set:
    """The modules a fresh interpreter holds after importing ``modules``."""
    code = "import json, sys\n" + "".join(f"import {m}\n" for m in modules) + "print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout))


def under(loaded: set, package: str) -> list:
    return sorted(m for m in loaded if m == package or m.startswith(package + "."))


def test_the_request_path_s_option_parsing_loads_no_training_code_and_no_torch():
    loaded = loaded_after_import("robustdeq.serving.options", "robustdeq.serving.metrics", "robustdeq.card")
    assert "robustdeq.serving.options" in loaded  # the probe itself works
    assert under(loaded, "robustdeq.training") == [] and under(loaded, "robustdeq.evaluation") == []
    assert under(loaded, "torch") == []


def test_training_loads_no_evaluation_code_and_evaluation_no_training_code():
    loaded = loaded_after_import("robustdeq.training.trainer", "robustdeq.training.profile")
    assert "robustdeq.state_accuracy" in loaded and under(loaded, "robustdeq.evaluation") == []
    loaded = loaded_after_import("robustdeq.evaluation.cli", "robustdeq.evaluation.suite")
    assert "robustdeq.evaluation.suite" in loaded and under(loaded, "robustdeq.training") == []


def test_the_import_contracts_hold():
    linter = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if linter is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    out = subprocess.run([linter, "--no-cache"], capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 kept, 0 broken" in out.stdout


def test_old_import_paths_still_work():
    from robustdeq import attacks, card, number_parsing, readout, state_accuracy
    from robustdeq.defense import PAPER_DEFAULTS as defense_defaults
    from robustdeq.evaluation import choose_readout_state, ready_made, state_accuracies
    from robustdeq.evaluation.cli import format_card, read_card
    from robustdeq.evaluation.prefix import combine_cards, load_evaluation
    from robustdeq.evaluation.report import CARD_SCHEMA_PATH, validate_card
    from robustdeq.serving.engine import gate_from_card
    from robustdeq.training.config import parse_number

    assert parse_number is number_parsing.parse_number and defense_defaults is PAPER_DEFAULTS
    assert choose_readout_state is readout.choose_readout_state and state_accuracies is state_accuracy.state_accuracies
    assert ready_made.ready_made_pgd is attacks.ready_made_pgd and ready_made.READOUT_RULES is readout.READOUT_RULES
    assert read_card is card.load_card and format_card is card.format_card and validate_card is card.validate_card
    assert gate_from_card is card.gate_from_card and CARD_SCHEMA_PATH == card.SCHEMA_PATH
    assert combine_cards.__module__ == "robustdeq.evaluation.combined_card" and callable(load_evaluation)


def test_number_parsing():
    from robustdeq.number_parsing import parse_number

    assert parse_number("8/255") == pytest.approx(8 / 255) and parse_number(" 3e-3 ") == 0.003
    assert parse_number("nan") == "nan" and parse_number("1/0") == "1/0" and parse_number(7) == 7


# ---- the defense defaults, defined once ----------------------------------------------------
def test_the_defaults_are_paper_1_s():
    assert dict(PAPER_DEFAULTS) == {"T_f": 2, "R": 10, "beta": 2 / 255, "eps": 8 / 255}
    assert (DEFAULT_T_F, DEFAULT_R, DEFAULT_BETA, DEFAULT_EPS) == tuple(PAPER_DEFAULTS.values())
    with pytest.raises(TypeError):
        PAPER_DEFAULTS["R"] = 5  # read-only: one definition


def test_every_default_of_the_defense_is_the_base_s():
    from robustdeq.defense import DefenseSetting, entropy_reduction, gated_entropy_reduction
    from robustdeq.serving.options import Limits, RequestOptions, parse_options

    def defaults_of(obj) -> dict:
        return {k: getattr(obj, k) for k in PAPER_DEFAULTS}

    assert defaults_of(Limits()) == defaults_of(RequestOptions(state=1)) == dict(PAPER_DEFAULTS)
    assert defaults_of(DefenseSetting()) == dict(PAPER_DEFAULTS)
    setting = DefenseSetting.parse("4,3")
    assert (setting.beta, setting.eps) == (DEFAULT_BETA, DEFAULT_EPS)
    for fn in (entropy_reduction, gated_entropy_reduction):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in PAPER_DEFAULTS} == dict(PAPER_DEFAULTS), fn.__name__
    request = parse_options({}, {}, Limits(lane="defended", default_defense="on"), n_steps=8, default_state=8)
    assert defaults_of(request) == dict(PAPER_DEFAULTS)


def test_the_serving_docs_list_the_defaults():
    text = (PROJECT_ROOT / "docs" / "serving.md").read_text()
    rows = dict(re.findall(r"^\| `(T_f|R|beta|eps)` \| [^|]+ \| ([^|]+?) \|", text, re.M))
    assert {k: float(Fraction(v)) for k, v in rows.items()} == {k: float(v) for k, v in PAPER_DEFAULTS.items()}


def test_the_library_page_names_every_module():
    """docs/library.md covers the whole package: a module missing from it is a room nobody can find."""
    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "library.md").read_text()
    missing = []
    for path in sorted((root / "robustdeq").rglob("*.py")):
        rel = path.relative_to(root)
        if path.name in ("__init__.py", "__main__.py"):
            continue
        folder_listed = f"`{rel.parent.as_posix()}/`" in page
        if f"`{rel.as_posix()}`" not in page and not (folder_listed and f"`{path.name}`" in page):
            missing.append(rel.as_posix())
    assert not missing, f"docs/library.md does not name: {', '.join(missing)}"
