"""The model side of serving: one batch of validated requests in, one answer per request out.

The handler (``handlers/robustdeq_handler.py``) only parses and validates; everything
about the model lives here and in the library it calls:

1. the plain dynamics of the whole batch (``run_dynamics``: z[0..N], residuals);
2. Algorithm 1 of paper 1 for the requests that ask for it: ``defense=on`` always,
   ``defense=gated`` when the plain entropy at the gate state exceeds the robustness
   card's threshold. Both go through one ``gated_entropy_reduction`` call with a
   per-sample threshold (``-inf``: always, ``+inf``: never) and per-sample T_f, R, beta,
   eps, so a mixed batch is still one vectorised pass;
3. the early-state readout z[k] per request (paper 1, Sec. 4), top-k probabilities, the
   entropy along the whole trajectory (Eq. 6) and what the defense changed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .. import __version__
from ..card import CARD_FILE, find_setting, gate_from_card, load_card, setting_name
from ..checkpoint import Checkpoint, load_checkpoint
from ..defense import gated_entropy_reduction
from ..defense_defaults import DEFAULT_BETA, DEFAULT_EPS
from ..dynamics import run_dynamics
from .options import Limits, RequestError, RequestOptions

# gate_from_card is re-exported from card.py, the card's home, for old imports
__all__ = ["InferenceEngine", "BatchTiming", "card_setting_name", "gate_from_card", "ARCHIVE_FILE_KEYS"]

logger = logging.getLogger(__name__)
# keys of an archive's ``handler`` section that name files, not request limits
ARCHIVE_FILE_KEYS = ("checkpoint", "card", "labels", "onnx", "library_version")


def card_setting_name(options: RequestOptions) -> str:
    """The robustness card's name for a request's setting (``none``, ``defense-T2-R10``, ...)."""
    return setting_name(options.T_f, 0 if options.defense == "off" else options.R, options.defense == "gated")


@dataclass
class BatchTiming:
    """Wall-clock seconds of one batch: the plain solve and the defense (0 when none ran)."""

    solve: float
    defense: float
    batch_size: int
    backend: str = "torch"  # what ran the plain solve: "torch" or "onnxruntime"


class InferenceEngine:
    """A loaded checkpoint plus its robustness card, answering batches of requests."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        card: Optional[Dict[str, Any]] = None,
        limits: Optional[Limits] = None,
        device: str = "cpu",
        name: Optional[str] = None,
        labels: Optional[Sequence[str]] = None,
        onnx_session=None,
    ):
        self.device = torch.device(device)
        self.model = checkpoint.build_model(self.device)
        self.name = name or checkpoint.model_name
        self.card = card
        self.limits = limits or Limits()
        self.labels = list(labels) if labels is not None else list(self.model.class_names)
        self.n_steps = self.model.n_steps
        self.default_state = self.model.readout_index()
        self.gate = gate_from_card(card)
        self.input_shape = tuple(self.model.input_shape)
        # plain batches through ONNX Runtime (robustdeq.export) when the archive ships a graph
        self.onnx = onnx_session
        if len(self.labels) != self.model.num_classes:
            raise ValueError(f"{len(self.labels)} label names for a model with {self.model.num_classes} classes")

    @classmethod
    def from_model_dir(
        cls, model_dir: str, handler_config: Dict[str, Any], device: str = "cpu", name: Optional[str] = None
    ) -> "InferenceEngine":
        """The engine of an extracted archive: its ``model-config.yaml`` ``handler`` section names
        the files (checkpoint loaded with ``weights_only=True``, card, labels, ONNX graph) and
        sets the limits. Sets the process's torch thread count (``torch_threads``) and CPU
        niceness (``cpu_nice``): each TorchServe worker is its own process."""
        section = dict(handler_config or {})
        files = {k: section.pop(k) for k in ARCHIVE_FILE_KEYS if k in section}
        limits = Limits.from_config(section)
        if limits.torch_threads > 0:
            torch.set_num_threads(limits.torch_threads)
        if limits.cpu_nice > 0 and hasattr(os, "setpriority"):
            os.setpriority(os.PRIO_PROCESS, 0, max(limits.cpu_nice, os.getpriority(os.PRIO_PROCESS, 0)))

        def path_of(key: str, default: str) -> Optional[str]:
            path = os.path.join(model_dir, files.get(key, default))
            return path if os.path.isfile(path) else None

        checkpoint = load_checkpoint(os.path.join(model_dir, files.get("checkpoint", "model.pt")))
        card_path, labels_path = path_of("card", CARD_FILE), path_of("labels", "index_to_name.json")
        card = load_card(card_path) if card_path else None
        labels = None
        if labels_path:
            with open(labels_path, encoding="utf-8") as fh:
                labels = json.load(fh)
        kwargs: Dict[str, Any] = {"labels": [labels[str(i)] for i in range(len(labels))]} if labels else {}
        if files.get("onnx"):
            from ..export import OnnxPlainSession

            path = os.path.join(model_dir, files["onnx"])
            kwargs["onnx_session"] = OnnxPlainSession(path, threads=limits.torch_threads, device=device)
        built_with = files.get("library_version")
        if built_with and built_with != __version__:
            logger.warning("archive built with robustdeq %s, serving with %s", built_with, __version__)
        return cls(checkpoint, card, limits, device, name=name, **kwargs)

    # ---- validation that needs the model -------------------------------------------------
    def check(self, options: RequestOptions) -> None:
        """Request-level checks that depend on this model (beyond ``parse_options``)."""
        if options.defense == "gated" and self.gate is None:
            raise RequestError(
                400,
                "gate_unavailable",
                f"model {self.name!r} has no evaluated gate threshold in its robustness card; "
                "use defense 'on' or 'off'",
            )

    # ---- one batch ------------------------------------------------------------------------
    def predict(self, x: Tensor, options: Sequence[RequestOptions]) -> "tuple[List[Dict[str, Any]], BatchTiming]":
        """Answer a batch [B, C, H, W] of inputs in [0, 1], one options object per input."""
        if x.shape[0] != len(options):
            raise ValueError("one options object per input")
        for opt in options:
            self.check(opt)
        B, dev = x.shape[0], self.device
        x = x.to(dev, non_blocking=True)
        thresholds = [self._threshold(o) for o in options]
        defended = any(t < math.inf for t in thresholds)
        backend = "onnxruntime" if self.onnx is not None and not defended else "torch"
        t0 = self._clock()
        with torch.no_grad():
            plain = self.onnx.trajectory(self.model, x) if backend == "onnxruntime" else run_dynamics(self.model, x)
        t1 = self._clock()
        threshold = torch.tensor(thresholds, dtype=x.dtype, device=dev)
        if defended:
            result = gated_entropy_reduction(
                self.model,
                x,
                threshold,
                gate_state=self.gate["state"] if self.gate else self.default_state,
                T_f=torch.tensor([o.T_f for o in options], device=dev),
                R=torch.tensor([o.R for o in options], device=dev),
                beta=torch.tensor([o.beta for o in options], dtype=x.dtype, device=dev),
                eps=torch.tensor([o.eps for o in options], dtype=x.dtype, device=dev),
                plain=plain,
            )
            traj, ran, perturbation = result.trajectory, result.ran, result.perturbation
        else:
            traj, ran, perturbation = plain, torch.zeros(B, dtype=torch.bool, device=dev), x.new_zeros(B)
        t2 = self._clock()
        timing = BatchTiming(solve=t1 - t0, defense=t2 - t1 if defended else 0.0, batch_size=B, backend=backend)
        with torch.no_grad():
            answers = self._answers(options, plain, traj, ran, perturbation, timing)
        return answers, timing

    def _threshold(self, o: RequestOptions) -> float:
        if o.defense == "off" or o.R == 0 or o.T_f > self.n_steps:
            return math.inf
        if o.defense == "on":
            return -math.inf
        return self.gate["threshold"]

    def _answers(self, options, plain, traj, ran, perturbation, timing: BatchTiming) -> List[Dict[str, Any]]:
        entropies = traj.entropies().cpu()  # [B, N]: z[1..N]
        residuals = traj.residuals.cpu()  # [B, N + 1]
        gate_entropy = plain.entropy(self.gate["state"]).cpu() if self.gate else None
        by_state: Dict[int, Dict[str, Tensor]] = {}
        for k in sorted({o.state for o in options}):
            probs = traj.probabilities(k).cpu()
            by_state[k] = {"probs": probs, "before": plain.entropy(k).cpu()}
        ran, perturbation = ran.cpu(), perturbation.cpu()
        answers = []
        for i, o in enumerate(options):
            probs = by_state[o.state]["probs"][i]
            top_p, top_i = probs.topk(min(o.top_k, probs.numel()))
            entropy = float(entropies[i, o.state - 1])
            did_run = bool(ran[i])
            defense: Dict[str, Any] = {"mode": o.defense, "ran": did_run}
            if o.defense != "off":
                defense.update(T_f=o.T_f, R=o.R, beta=o.beta, eps=o.eps)
            if o.defense == "gated":
                defense.update(triggered=did_run, threshold=self.gate["threshold"], gate_state=self.gate["state"])
            if did_run:
                before = float(by_state[o.state]["before"][i])
                defense.update(
                    entropy_before=before,
                    entropy_reduction=before - entropy,
                    perturbation_linf=float(perturbation[i]),
                    perturbation_linf_255=float(perturbation[i]) * 255.0,
                )
            answers.append(
                {
                    "model": self.name,
                    "label": self.labels[int(top_i[0])],
                    "index": int(top_i[0]),
                    "top_k": [
                        {"label": self.labels[int(j)], "index": int(j), "probability": float(p)}
                        for p, j in zip(top_p, top_i)
                    ],
                    "state": o.state,
                    "n_steps": self.n_steps,
                    "entropy": entropy,
                    "entropy_trajectory": [float(h) for h in entropies[i]],
                    "residual": float(residuals[i, o.state]),
                    "residual_trajectory": [float(r) for r in residuals[i, 1:]],
                    "high_entropy": None if gate_entropy is None else bool(gate_entropy[i] > self.gate["threshold"]),
                    "defense": defense,
                    "timing_ms": {
                        "solve": timing.solve * 1e3,
                        "defense": timing.defense * 1e3 if did_run else 0.0,
                        "batch_size": timing.batch_size,
                        "backend": timing.backend,
                    },
                    "robustness": self.card_entry(o),
                }
            )
        return answers

    # ---- the robustness card --------------------------------------------------------------
    def card_entry(self, options: RequestOptions) -> Optional[Dict[str, Any]]:
        """What the card measured for this request's setting, or None when it was not evaluated
        (another state, another beta/eps than the evaluated ones, or a setting not in the card)."""
        if not self.card:
            return None
        if options.state != int(self.card.get("early_state", -1)):
            return None
        defended = options.defense != "off" and options.R > 0
        if defended:
            eps_eval = float(self.card.get("threat_model", {}).get("eps", DEFAULT_EPS))
            if not (math.isclose(options.beta, DEFAULT_BETA) and math.isclose(options.eps, eps_eval)):
                return None
        # the adaptive row where the card has one, else the transferred one (card.find_setting)
        setting = find_setting(self.card, options.T_f, options.R if defended else 0, options.defense == "gated")
        if setting is None:
            return None
        keep = ("name", "clean", "robust", "robust_kind", "cost_vs_plain", "trigger_rate_clean")
        entry = {k: setting[k] for k in keep if k in setting}
        entry["eps"] = self.card.get("threat_model", {}).get("eps")
        return entry

    def describe(self) -> Dict[str, Any]:
        """The model, its defaults and bounds, and the full robustness card."""
        return {
            "model": self.name,
            "architecture": self.model.name,
            "n_steps": self.n_steps,
            "default_state": self.default_state,
            "input_shape": list(self.input_shape),
            "labels": self.labels,
            "device": str(self.device),
            "plain_backend": "onnxruntime" if self.onnx is not None else "torch",
            "limits": self.limits.to_dict(),
            "gate": self.gate,
            "robustness_card": self.card,
        }

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
