"""Cross-model transfer (family ``cross-model``): the strongest inputs another evaluation found
against ITS undefended model, fed to this model with and without each defense.

A white-box attack that fails because the gradient is masked usually still transfers from a
model whose gradient is not; paper 1's transfer table (Table 3) stays within one model, so
this is the check it leaves out. Sources are finished evaluations of the same subset
(``--transfer-from LABEL=FOLDER``), or of a larger subset of the same seed, which starts with
this one's images; their per-sample inputs count in this model's worst case.
The inputs taken from a source are its white-box best: inputs it received by transfer itself
are kept apart (``none/white-box`` snapshot), so that A -> B -> A never replays A's own attacks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Tuple

import torch
from torch import Tensor

from ..attacks import margin
from ..stats import correct_string
from .adaptive import readout_logits
from .best_input import BestInput
from .context import Job, proportion

if TYPE_CHECKING:  # pragma: no cover
    from .context import EvaluationContext

#: the key under which an evaluation keeps its own white-box best once it has received transfers
WHITE_BOX_KEY = "none/white-box"


def parse_source(text: str) -> Tuple[str, str]:
    """``LABEL=FOLDER`` or ``FOLDER`` (label: the folder's name)."""
    label, sep, folder = text.partition("=")
    if not sep:
        label, folder = Path(text).name, text
    if not label or not folder:
        raise ValueError(f"--transfer-from takes LABEL=FOLDER or FOLDER, got {text!r}")
    return label, folder


def cross_model_jobs(ctx: "EvaluationContext") -> Iterator[Job]:
    """Family ``cross-model``: one job per source of ``config.transfer_from``."""
    for label, folder in map(parse_source, ctx.config.transfer_from):
        yield f"cross-model/{label}", lambda label=label, folder=folder: transfer_in(ctx, label, folder)


def source_inputs(ctx: "EvaluationContext", folder: str) -> Tuple[Tensor, dict]:
    """This process's slice of the source's white-box best inputs, after checking that the
    source evaluated the same images under the same threat model."""
    path = Path(folder)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"transfer source {folder}: no evaluation there (state.json missing)")
    state = json.loads((path / "state.json").read_text())
    ident = state["identity"]
    if ident.get("shard"):
        raise ValueError(f"transfer source {folder} is one shard; merge its shards first")
    source_n = int(ident["config"]["n"])
    if ident["subset_id"] != ctx.subset_id and not (
        source_n >= ctx.config.n and ctx.subset_id_of(source_n) == ident["subset_id"]
    ):
        raise ValueError(f"transfer source {folder} evaluated other images (subset {ident['subset_id']}, "
                         f"here {ctx.subset_id}): use the same --seed and --split, and an --n at least "
                         "this one's (a larger evaluation of the same seed holds these images first)")  # fmt: skip
    if abs(ident["config"]["eps"] - ctx.config.eps) > 1e-9:
        raise ValueError(f"transfer source {folder} attacked at eps {ident['config']['eps']:.5f}, "
                         f"here {ctx.config.eps:.5f}")  # fmt: skip
    tensors = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    key = WHITE_BOX_KEY if f"{WHITE_BOX_KEY}/x" in tensors else "none"
    x_src = tensors[f"{key}/x"][ctx.offset : ctx.offset + ctx.n].float()
    if float((x_src - ctx.x).abs().amax()) > ctx.config.eps + 1e-5:
        raise ValueError(f"transfer source {folder}: its inputs leave the eps ball around these images")
    meta = {"folder": str(path), "checkpoint_sha256": ident["checkpoint_sha256"], "source_key": key}
    return x_src, meta


def transfer_in(ctx: "EvaluationContext", label: str, folder: str) -> dict:
    """Score the source's inputs on the undefended model and on every defense (all images,
    not only the survivors, so that each accuracy stands on its own); update the worst cases."""
    x_src, meta = source_inputs(ctx, folder)
    if WHITE_BOX_KEY not in ctx.best:  # this model's own white-box best, before any transfer
        ctx.best[WHITE_BOX_KEY] = BestInput(ctx.best["none"].x, ctx.best["none"].margin)
    name = f"cross-model/{label}"

    def plain(chunk, x, y):
        return margin(readout_logits(ctx.model, x), y)

    m = ctx.map(plain, x_src, ctx.all_images(), f"{name} -> none")
    ctx.best["none"].update(ctx.all_images(), x_src, m)
    correct = m <= 0
    out = {
        "source": {"label": label, **meta},
        "acc": proportion(correct),
        "correct": correct_string(correct.tolist()),
        "worst_case_so_far": proportion(ctx.robust(None)),
        "defenses": {},
    }
    for d in ctx.defenses:
        md = ctx.evaluate_candidates(d, x_src, ctx.all_images(), f"{name} -> {d.name}")
        ok = md <= 0
        out["defenses"][d.name] = {**proportion(ok), "correct": correct_string(ok.tolist()),
                                   "worst_case_so_far": proportion(ctx.robust(d))}  # fmt: skip
    return out
