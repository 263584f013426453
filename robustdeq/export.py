"""ONNX export of the plain (undefended) forward, and an ONNX Runtime session for it.

The exported graph is the fixed-iteration dynamics: injection, N solver steps from
z[0] = 0 with no tolerance stop, and the head at every state z[1..N]. Its outputs:

* ``logits`` [B, C]: the prediction read at the checkpoint's early state (paper 1, Sec. 4);
* ``all_logits`` [B, N, C]: the head at z[1..N], for the entropy along the dynamics (Eq. 6)
  and for requests that read another state;
* ``residuals`` [B, N + 1]: the solver's relative residuals.

A fixed-iteration solve has no data-dependent control flow, so the TorchScript-based
exporter traces it faithfully for any batch size (``torch.export``, which the newer
exporter uses, rejects the solver's per-step bookkeeping). The defense cannot be exported:
Algorithm 1 takes input gradients inside inference. Neither can LyaDEQ: its head computes
grad V with autograd.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .dynamics import Trajectory

OUTPUTS = ("logits", "all_logits", "residuals")
OPSET = 18

__all__ = ["PlainForward", "export_onnx", "OnnxPlainSession", "parity", "OUTPUTS", "add_export_arguments", "run_export"]


class PlainForward(nn.Module):
    """The undefended dynamics of a model as a module with tensor outputs (see module doc)."""

    def __init__(self, model: nn.Module, state: Optional[int] = None):
        super().__init__()
        self.model = model.eval()
        self.state = model.readout_index() if state is None else state % (model.n_steps + 1)
        if self.state == 0:
            raise ValueError("state 0 is z[0] = 0, which carries no prediction")
        # the wrapper too: the exporter restores the wrapper's mode afterwards, recursively
        self.eval()

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        traj = self.model.trajectory(x)
        all_logits = traj.all_logits(1)
        return all_logits[:, self.state - 1], all_logits, traj.residuals


def export_onnx(model: nn.Module, path: Union[str, Path], state: Optional[int] = None, opset: int = OPSET) -> Path:
    """Write the plain forward of ``model`` to ``path`` (dynamic batch axis)."""
    if model.onnx_export_blocker:
        raise ValueError(
            f"{model.name} cannot be exported to ONNX: {model.onnx_export_blocker}; export supports DEQs whose "
            "head is a plain forward (deq-tiny, mdeq-small, mdeq-large)"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = PlainForward(model, state)
    example = torch.rand(2, *model.input_shape, generator=torch.Generator().manual_seed(0))
    batch = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about Python ints in the fixed-length loop
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=list(OUTPUTS),
            dynamic_axes={"x": batch, "logits": batch, "all_logits": batch, "residuals": batch},
            opset_version=opset,
        )
    return path


class OnnxPlainSession:
    """An ONNX Runtime session over an exported plain forward."""

    def __init__(self, path: Union[str, Path], threads: int = 0, device: str = "cpu"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.path = Path(path)

    def run(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(logits, all_logits, residuals) as CPU tensors for a batch in [0, 1]."""
        feed = {"x": np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)}
        return tuple(torch.from_numpy(a) for a in self.session.run(list(OUTPUTS), feed))

    def trajectory(self, model: nn.Module, x: Tensor) -> Trajectory:
        """A readout-only :class:`Trajectory` (logits and residuals; no states) from the session."""
        _, all_logits, residuals = self.run(x)
        return Trajectory.from_readouts(model, all_logits, residuals)


def parity(model: nn.Module, session: OnnxPlainSession, x: Tensor, state: Optional[int] = None) -> dict:
    """Largest |logit difference| over every state, and label agreement at the readout state."""
    with torch.no_grad():
        ref_logits, ref_all, ref_res = PlainForward(model, state)(x)
    logits, all_logits, residuals = session.run(x)
    return {
        "n": int(x.shape[0]),
        "max_abs_logit_diff": float((all_logits - ref_all).abs().max()),
        "max_abs_residual_diff": float((residuals - ref_res).abs().max()),
        "labels_agree": int((logits.argmax(1) == ref_logits.argmax(1)).sum()),
    }


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """``robustdeq export``."""
    p.description = (
        "Export the fixed-iteration plain forward (injection, N solver steps, the head at every "
        "state; outputs: logits at the early state, all_logits, residuals) to ONNX with a dynamic batch axis, then "
        "compare ONNX Runtime with PyTorch on real CIFAR-10 test images. The defense cannot be exported (it takes "
        "input gradients inside inference), nor can LyaDEQ (its head uses autograd)."
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", choices=("onnx",), default="onnx")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--state", type=int, default=None, help="readout state of 'logits' (default: the checkpoint's)")
    p.add_argument("--parity", type=int, default=256, help="test images for the parity check (0 = skip)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="max |logit difference| over every state allowed (default 1e-3: float32 rounding grows along the "
        "Broyden iterates, to 7.2e-4 at deq-small's z[8]); every label must agree in any case",
    )
    p.add_argument("--data", default=None, help="CIFAR-10 source (default: ../shared/data archive)")


def run_export(args: argparse.Namespace) -> int:
    """Export ``--checkpoint`` to ``--out`` and compare it with PyTorch on ``--parity`` test images."""
    from .checkpoint import load_checkpoint
    from .data import load_cifar10

    model = load_checkpoint(args.checkpoint).build_model()
    out = export_onnx(model, args.out, state=args.state)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB): fixed-iteration plain forward of {model.name}, "
          f"N = {model.n_steps}, outputs logits (z[{model.readout_index() if args.state is None else args.state}]), "
          "all_logits, residuals")  # fmt: skip
    if args.parity > 0:
        test = load_cifar10("test", source=args.data, progress=False)
        idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[: args.parity]
        report = parity(model, OnnxPlainSession(out), test.float_images(idx), args.state)
        print("parity with PyTorch on CIFAR-10 test images: " + json.dumps(report))
        if report["max_abs_logit_diff"] > args.tolerance or report["labels_agree"] != report["n"]:
            print(f"robustdeq export: parity check failed (tolerance {args.tolerance})", file=sys.stderr)
            return 1
    return 0
