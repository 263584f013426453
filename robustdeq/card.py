"""The robustness card: what an evaluation measured of one checkpoint, in a small JSON file.

``robustdeq evaluate`` builds the card (``evaluation/report.py``), ``robustdeq archive`` ships
it in both ``.mar`` archives and the server answers each request with its row. The card holds
the clean and worst-case accuracy (with n and the Wilson 95% interval) and, per test-time
setting of Algorithm 1 of paper 1 (T_f, R, gated or not), its robust accuracy and its cost
relative to plain inference.

One setting may appear twice: measured under adaptive attacks through the defense, and under
the attacks on the undefended model transferred (the T_f x R grid of paper 1 Table 5). Both
rows carry the same ``name`` (``defense-T2-R10``), so a row is identified by its key
(T_f, R, gated, kind), ``kind`` being ``adaptive`` or ``transfer`` (:func:`setting_key`), and
:func:`validate_card` refuses two rows with one key.

Everything that reads a card goes through this module: loading from a JSON file, a run folder,
a checkpoint or a ``.mar`` (validated against ``robustness_card.schema.json``), the lookup of a
row, the setting name format, the table ``robustdeq card`` prints, and the combination of an
undefended card with a defended one of its first images. Torch-free.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Union

__all__ = [
    "CARD_FILE",
    "SCHEMA_ID",
    "SCHEMA_PATH",
    "ADAPTIVE",
    "TRANSFER",
    "SettingKey",
    "setting_name",
    "setting_kind",
    "setting_key",
    "validate_card",
    "find_card",
    "card_for_checkpoint",
    "load_card",
    "find_setting",
    "gate_setting",
    "gate_from_card",
    "format_card",
    "combine_cards",
]

#: the card's file name, in a run folder, an evaluation folder and an archive
CARD_FILE = "robustness_card.json"
SCHEMA_ID = "robustdeq.robustness_card/1"
SCHEMA_PATH = Path(__file__).with_name("robustness_card.schema.json")
#: a row's robust figure: adaptive attacks through the defense (or, for ``none``, the per-sample
#: worst case), or attacks on the undefended model transferred
ADAPTIVE, TRANSFER = "adaptive", "transfer"

Card = Dict[str, Any]
Row = Dict[str, Any]


class SettingKey(NamedTuple):
    """What identifies a card row. ``T_f`` is None for the plain setting (R = 0)."""

    T_f: Optional[int]
    R: int
    gated: bool
    kind: str  # ADAPTIVE or TRANSFER


def setting_name(T_f: Optional[int], R: int, gated: bool = False) -> str:
    """The name of a test-time setting: ``none`` (R = 0), ``defense-T2-R10`` or ``gated-T2-R10``."""
    if R == 0:
        return "none"
    return f"{'gated' if gated else 'defense'}-T{T_f}-R{R}"


def setting_kind(row: Row) -> str:
    """ADAPTIVE when the row's robust figure saw the defense (or is the plain worst case), else TRANSFER."""
    return ADAPTIVE if str(row.get("robust_kind") or "").startswith(("adaptive", "per-sample")) else TRANSFER


def setting_key(row: Row) -> SettingKey:
    R = int(row.get("R") or 0)
    if R == 0:
        return SettingKey(None, 0, False, setting_kind(row))
    return SettingKey(int(row["T_f"]), R, bool(row.get("gated")), setting_kind(row))


def validate_card(card: Card) -> None:
    """Validate against ``robustness_card.schema.json`` and check that no two rows share a key
    (raises ``ValueError`` naming where)."""
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    try:
        jsonschema.validate(card, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ValueError(f"robustness card invalid at {where}: {e.message}") from None
    seen: Dict[SettingKey, int] = {}
    for i, row in enumerate(card["settings"]):
        key = setting_key(row)
        if key in seen:
            raise ValueError(f"robustness card invalid at settings/{i}: it repeats settings/{seen[key]} ({key})")
        seen[key] = i


def find_card(path: Union[str, Path]) -> Path:
    """The card's JSON file from the file itself, a folder holding one (a run's or an
    evaluation's) or a checkpoint file (the card beside it)."""
    path = Path(path)
    if path.is_file() and path.suffix != ".json":
        path = path.parent
    if path.is_dir():
        path = path / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no robustness card at {path}; 'robustdeq evaluate' writes one")
    return path


def card_for_checkpoint(checkpoint: Union[str, Path], card: Union[str, Path, None] = None) -> Optional[Path]:
    """The card file of a checkpoint: ``card`` when given (it must exist), else the one beside
    the checkpoint, or None when there is none."""
    if card is not None:
        if not Path(card).is_file():
            raise FileNotFoundError(f"robustness card {card} does not exist")
        return Path(card)
    candidate = Path(checkpoint).parent / CARD_FILE
    return candidate if candidate.is_file() else None


def load_card(path: Union[str, Path], validate: bool = True) -> Card:
    """The card from a JSON file, a folder, a checkpoint (its sibling) or a ``.mar`` archive."""
    path = Path(path)
    if path.suffix == ".mar":
        with zipfile.ZipFile(path) as archive:
            if CARD_FILE not in archive.namelist():
                raise FileNotFoundError(f"{path} holds no {CARD_FILE}")
            card = json.loads(archive.read(CARD_FILE))
    else:
        card = json.loads(find_card(path).read_text())
    if validate:
        validate_card(card)
    return card


def find_setting(
    card: Optional[Card], T_f: Optional[int], R: int, gated: bool = False, kind: Optional[str] = None
) -> Optional[Row]:
    """The card's row of (T_f, R, gated, kind), or None. With ``kind=None`` the strongest
    measurement there is: the adaptive row, else the transferred one. R = 0 is the plain row."""
    rows = {setting_key(row): row for row in (card or {}).get("settings", [])}
    T_f = None if R == 0 else T_f
    gated = bool(gated) and R != 0
    for k in (kind,) if kind else (ADAPTIVE, TRANSFER):
        row = rows.get(SettingKey(T_f, R, gated, k))
        if row is not None:
            return row
    return None


def gate_setting(card: Optional[Card]) -> Optional[Row]:
    """The card's evaluated gated row (one with a threshold), or None."""
    rows = (card or {}).get("settings", [])
    return next((s for s in rows if s.get("gated") and s.get("threshold") is not None), None)


def gate_from_card(card: Optional[Card]) -> Optional[Dict[str, float]]:
    """The evaluated gate of a card: ``{"threshold", "state"}`` or None when it has none."""
    row = gate_setting(card)
    if row is None:
        return None
    return {"threshold": float(row["threshold"]), "state": int(card["early_state"])}


def format_card(card: Card) -> str:
    """The card as the table ``robustdeq card`` prints: one row per setting, sorted by cost."""

    def pct(p) -> str:
        if not p:
            return "-"
        low, high = p["ci95"]
        return f"{100 * p['acc']:5.1f} [{100 * low:4.1f}, {100 * high:4.1f}]"

    eps = card["threat_model"]["eps"] * 255
    lines = [
        f"{card['model']}: readout z[{card['early_state']}] of {card['n_steps']}, l_inf eps {eps:g}/255, "
        f"n = {card['clean']['n']} test images",
        f"{'setting':<16}{'T_f':>4}{'R':>4}  {'clean %':<20}{'robust %':<20}{'cost':>7}  robust figure from",
    ]
    for s in sorted(card["settings"], key=lambda s: (s["cost_vs_plain"], s["name"])):
        clean = s.get("clean") or (card["clean"] if s["R"] == 0 else None)  # grid rows measured robustness only
        kind = "adaptive attacks" if setting_kind(s) == ADAPTIVE else "transfer only"
        if s["robust"] and s["robust"]["n"] != card["clean"]["n"]:
            kind += f" (n = {s['robust']['n']})"
        gate = f", gated above {s['threshold']:.2f} nats" if s.get("gated") else ""
        lines.append(
            f"{s['name']:<16}{s['T_f'] if s['T_f'] else '-':>4}{s['R']:>4}  {pct(clean):<20}"
            f"{pct(s['robust']):<20}{s['cost_vs_plain']:6.1f}x  {kind}{gate}"
        )
    if card.get("autoattack_standard"):
        standard = pct(card["autoattack_standard"]).strip()
        lines.append(f"AutoAttack standard (no defense): {standard} %; the robust figure of 'none' is the "
                     "per-sample worst case over every attack, AutoAttack included")  # fmt: skip
    return "\n".join(lines)


def combine_cards(main: Card, defended: Card) -> Card:
    """One card from ``main`` (the undefended model on n images) and ``defended`` (the defense
    settings on the first M <= n images of the same subset): the plain row from ``main``, every
    other row from ``defended``, each row with its own n. That the M images are the first M of
    the n is for the caller to check (it needs the per-sample results,
    ``evaluation/combined_card.py``)."""
    if defended["checkpoint_sha256"] != main["checkpoint_sha256"]:
        raise ValueError("the two evaluations are of different checkpoints")
    eps_main, eps_def = main["threat_model"]["eps"], defended["threat_model"]["eps"]
    if abs(eps_def - eps_main) > 1e-9:
        raise ValueError(f"the two evaluations attack at different eps ({eps_main:.5f}, {eps_def:.5f})")
    m, n = defended["evaluation"]["n"], main["evaluation"]["n"]
    settings: List[Row] = [s for s in main["settings"] if s["R"] == 0]
    settings += [s for s in defended["settings"] if s["R"] != 0]
    attacks = main["evaluation"]["attacks"]
    return {
        **main,
        "evaluation": {
            **main["evaluation"],
            "attacks": attacks + [a for a in defended["evaluation"]["attacks"] if a not in attacks],
            "defended": {
                "n": m,
                "subset_id": defended["evaluation"]["subset_id"],
                "date": defended["evaluation"]["date"],
                "note": f"the defense settings were evaluated on the first {m} of the {n} images",
            },
        },
        "settings": settings,
    }
