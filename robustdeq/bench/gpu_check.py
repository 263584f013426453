"""``robustdeq gpu-check`` (``make gpu-check``): everything a GPU must confirm, in one prepared run.

A GPU machine may be lent for a few minutes only, so the check is written to run unchanged
and to finish in well under 8 minutes there. Sections:

1. ``parity64``: the solvers (fixed-point, Anderson, Broyden), the dynamics (states,
   residuals, entropies) and Algorithm 1 of paper 1 on the same inputs in float64, CUDA
   against CPU, within tolerance;
2. ``served32``: the served default model's answer in float32 (plain and defended), CUDA against CPU;
3. ``torchserve``: a real TorchServe with ``number_of_gpu`` set answers plain and defended
   requests (``timing_ms``, the engine's device) and exports the GPU series on ``/metrics``
   (TorchServe's system metrics need ``pynvml``);
4. ``training``: mdeq-large training throughput at batch 96, PGD-AT and PGD-AT + Sec. 3.3,
   next to paper 1 Table 9 (30.2 -> 39.9 samples/s);
5. ``defense_cost``: the defense's slowdown at T_f = 2, R = 10 next to paper 1 Table 10
   (94.9 -> 11.7 samples/s, 8.1x);
6. ``onnx``: ONNX Runtime's CUDA provider against eager on the plain lane, when the CUDA
   build of onnxruntime is importable.

Each section reports ``pass``, ``fail`` or ``skipped`` with the reason. On a machine without
CUDA the GPU-only parts are skipped (said plainly) and the CPU stand-ins run: TorchServe on
the CPU, deq-tiny throughput and defense cost, ONNX Runtime's CPU provider. The run writes
``gpu-check.json`` and ``gpu-check.md`` and exits 0 unless a section that ran failed.
"""

from __future__ import annotations

import json
import platform
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from ..serving.server import DEFAULT_MODELS
from .subject import default_checkpoint

__all__ = ["run_gpu_check", "SECTIONS", "PAPER_TABLE9", "PAPER_TABLE10"]

#: paper 1, Table 9: training samples/s on a GPU, PGD-AT without and with Sec. 3.3
PAPER_TABLE9 = {"PGD-AT": 30.2, "PGD-AT + Sec. 3.3": 39.9}
#: paper 1, Table 10: inference samples/s without and with the defense (T_f = 2, R = 10)
PAPER_TABLE10 = {"plain": 94.9, "defended": 11.7, "slowdown": 8.1}
#: the served default model (``make serve``'s first) and its shipped checkpoint folder
SERVED = DEFAULT_MODELS[0]
SHIPPED = default_checkpoint().parent
TOL64 = 1e-7  # float64, CUDA vs CPU: relative to the tensor's scale
TOL32_PROBS = 1e-3  # float32 served probabilities


def _cuda() -> Optional[torch.device]:
    return torch.device("cuda:0") if torch.cuda.is_available() else None


def _compared_device() -> Optional[torch.device]:
    """The device compared with the CPU in the parity sections: CUDA, or the device named by
    ``ROBUSTDEQ_GPU_CHECK_DEVICE`` (the tests set ``cpu`` to run these code paths without a GPU)."""
    import os

    forced = os.environ.get("ROBUSTDEQ_GPU_CHECK_DEVICE")
    return torch.device(forced) if forced else _cuda()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _skip(why: str, **extra) -> Dict[str, Any]:
    return {"status": "skipped", "why": why, **extra}


def _sync(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---- 1. float64 parity -------------------------------------------------------------------------
def parity64(quick: bool) -> Dict[str, Any]:
    from ..defense import entropy_reduction
    from ..models import create_model

    cuda = _compared_device()
    if cuda is None:
        return _skip("no CUDA device: CUDA-vs-CPU parity needs one")
    rows, ok = [], True
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for model_name, solvers in (("deq-tiny", ("fixed_point", "anderson", "broyden")), ("lyadeq-tiny", ("anderson",))):
        torch.manual_seed(0)
        cpu_model = create_model(model_name).double().eval()
        gpu_model = create_model(model_name).double().eval().to(cuda)
        gpu_model.load_state_dict(cpu_model.state_dict())
        for solver in solvers:
            kwargs = {"m": 5} if solver == "anderson" else ({"m": 8} if solver == "broyden" else {})
            with torch.no_grad():
                a = cpu_model.trajectory(x, solver=cpu_model.make_solver(solver, **kwargs))
                b = gpu_model.trajectory(x.to(cuda), solver=gpu_model.make_solver(solver, **kwargs))
            diffs = {
                "states": max(_rel(sb, sa) for sa, sb in zip(a.states[1:], b.states[1:])),
                "residuals": _rel(b.residuals, a.residuals),
                "entropies": _rel(b.entropies(), a.entropies()),
            }
            passed = all(v <= TOL64 for v in diffs.values())
            ok &= passed
            rows.append({"model": model_name, "what": f"dynamics, {solver}", "max_rel_diff": diffs, "pass": passed})
    # Algorithm 1: sign() of the input gradient may differ where a component is ~0, so compare
    # the defended predictions and entropies, and the share of input entries that moved differently
    torch.manual_seed(0)
    cpu_model = create_model("deq-tiny").double().eval()
    gpu_model = create_model("deq-tiny").double().eval().to(cuda)
    gpu_model.load_state_dict(cpu_model.state_dict())
    a = entropy_reduction(cpu_model, x, T_f=2, R=10 if not quick else 3)
    b = entropy_reduction(gpu_model, x.to(cuda), T_f=2, R=10 if not quick else 3)
    moved = float(((a.x_defended - b.x_defended.cpu()).abs() > 1e-9).double().mean())
    same_labels = bool(torch.equal(a.trajectory.predict(-1), b.trajectory.predict(-1).cpu()))
    entropy_diff = _rel(b.trajectory.entropies(), a.trajectory.entropies())
    passed = same_labels and moved <= 1e-3 and entropy_diff <= 1e-5
    ok &= passed
    rows.append(
        {
            "model": "deq-tiny",
            "what": "Algorithm 1 (T_f = 2, R = 10)",
            "inputs_moved_differently": moved,
            "entropy_max_rel_diff": entropy_diff,
            "same_labels": same_labels,
            "pass": passed,
        }
    )
    return {"status": "pass" if ok else "fail", "tolerance": TOL64, "rows": rows}


# ---- 2. float32 served answers -----------------------------------------------------------------
def _engine(device: str):
    from ..card import load_card
    from ..checkpoint import load_checkpoint
    from ..serving.engine import InferenceEngine
    from ..serving.options import Limits

    card = load_card(SHIPPED)
    return InferenceEngine(
        load_checkpoint(SHIPPED / "model.pt"), card, Limits(lane="defended", default_defense="on"), device
    )


def _test_images(n: int) -> torch.Tensor:
    from ..data import load_cifar10

    test = load_cifar10("test", progress=False)
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n]
    return test.images[idx].float() / 255


def served32(quick: bool) -> Dict[str, Any]:
    from ..serving.options import RequestOptions

    cuda = _compared_device()
    if cuda is None:
        return _skip("no CUDA device: the CUDA-vs-CPU served answers need one")
    x = _test_images(32 if quick else 64)
    cpu, gpu = _engine("cpu"), _engine(str(cuda))
    rows, ok = [], True
    for mode in ("off", "on"):
        options = [RequestOptions(state=cpu.default_state, defense=mode, top_k=10)] * len(x)
        a, _ = cpu.predict(x, options)
        b, _ = gpu.predict(x, options)
        agree = sum(p["index"] == q["index"] for p, q in zip(a, b)) / len(a)
        diff = max(
            abs(pa["probability"] - pb["probability"])
            for p, q in zip(a, b)
            for pa, pb in zip(
                sorted(p["top_k"], key=lambda t: t["index"]), sorted(q["top_k"], key=lambda t: t["index"])
            )
        )
        # plain: the same computation in float32; defended: sign() steps may flip near-zero gradients
        passed = agree == 1.0 and diff <= TOL32_PROBS if mode == "off" else agree >= 0.95
        ok &= passed
        rows.append({"defense": mode, "labels_agree": agree, "max_prob_diff": diff, "pass": passed})
    return {"status": "pass" if ok else "fail", "n": len(x), "rows": rows}


# ---- 3. a real TorchServe ----------------------------------------------------------------------
def torchserve(quick: bool, workdir: Path) -> Dict[str, Any]:
    import shutil

    from ..serving.client import Client
    from ..serving.runfolder import http_get, read_keys
    from ..serving.server import Ports, start_server, stop_server

    if shutil.which("java") is None:
        return _skip("TorchServe needs Java 17")
    cuda = _cuda()
    gpus = torch.cuda.device_count() if cuda is not None else 0
    run_dir = workdir / "serve"
    try:
        import pynvml  # noqa: F401

        have_nvml = True
    except ImportError:
        have_nvml = False
    started = time.perf_counter()
    info = start_server(run_dir, models=[SERVED], ports=Ports.free(), gpus=gpus, log=lambda *a: None)
    try:
        client = Client(info.inference_url, read_keys(run_dir)["inference"])
        from io import BytesIO

        from PIL import Image

        image = (_test_images(1)[0] * 255).round().byte().permute(1, 2, 0).numpy()
        buf = BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        answers = {}
        for defense in ("off", "on"):
            status, answer = client.predict(SERVED, buf.getvalue(), "image/png", defense=defense)
            answers[defense] = {"status": status, "timing_ms": answer.get("timing_ms"), "index": answer.get("index")}
        _, described = client.describe(SERVED)
        device = described.get("device")
        _, metrics = http_get(info.metrics_url + "/metrics")
        text = metrics.decode()
        gpu_series = sorted({line.split("{")[0] for line in text.splitlines() if line.startswith("GPU")})
    finally:
        stop_server(run_dir)
    ok = all(a["status"] == 200 and a["timing_ms"] for a in answers.values())
    expected_device = "cuda:0" if gpus else "cpu"
    ok &= device == expected_device
    notes = []
    if gpus and have_nvml:
        ok &= bool(gpu_series)
    elif gpus:
        notes.append("pynvml is not installed: TorchServe exports no GPU series (pip install nvidia-ml-py)")
    else:
        notes.append("no CUDA device: served on the CPU (number_of_gpu = 0); GPU series not checked")
    return {
        "status": "pass" if ok else "fail",
        "number_of_gpu": gpus,
        "device": device,
        "expected_device": expected_device,
        "answers": answers,
        "gpu_series": gpu_series,
        "seconds": round(time.perf_counter() - started, 1),
        "notes": notes,
    }


# ---- 4. training throughput --------------------------------------------------------------------
def training(quick: bool) -> Dict[str, Any]:
    from ..training.throughput import VARIANTS, measure_training_throughput, speedups

    cuda = _cuda()
    model, batch, device = ("mdeq-large", 96, cuda) if cuda is not None else ("deq-tiny", 32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    rows = measure_training_throughput(model, x, y, rounds=2 if quick else 4, variants=VARIANTS[:2], progress=False)
    ratio = speedups(rows).get("PGD-AT + Sec. 3.3")
    result = {
        "status": "pass",
        "model": model,
        "batch": batch,
        "device": str(device),
        "rows": [{k: v for k, v in r.items() if k != "depths"} for r in rows],
        "sec33_speedup": ratio,
        "paper_table9": PAPER_TABLE9,
        "paper_speedup": round(PAPER_TABLE9["PGD-AT + Sec. 3.3"] / PAPER_TABLE9["PGD-AT"], 2),
    }
    if cuda is None:
        result["notes"] = ["no CUDA device: deq-tiny at batch 32 on the CPU stands in for mdeq-large at batch 96"]
    return result


# ---- 5. the defense's cost ---------------------------------------------------------------------
def defense_cost(quick: bool) -> Dict[str, Any]:
    from ..defense import entropy_reduction
    from ..models import create_model

    cuda = _cuda()
    model_name, batch, device = ("mdeq-large", 96, cuda) if cuda is not None else ("deq-tiny", 32, torch.device("cpu"))
    torch.manual_seed(0)
    model = create_model(model_name).to(device).eval()
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)

    def plain():
        with torch.no_grad():
            model.trajectory(x)

    def defended():
        entropy_reduction(model, x, T_f=2, R=10, with_plain=False)

    times: Dict[str, List[float]] = {"plain": [], "defended": []}
    plain(), defended()  # warm-up
    for _ in range(2 if quick else 4):  # interleaved, so that machine noise hits both alike
        for name, fn in (("plain", plain), ("defended", defended)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    result = {
        "status": "pass",
        "model": model_name,
        "batch": batch,
        "device": str(device),
        "samples_per_s": {k: round(batch / v, 2) for k, v in med.items()},
        "slowdown": round(med["defended"] / med["plain"], 2),
        "paper_table10": PAPER_TABLE10,
    }
    if cuda is None:
        result["notes"] = ["no CUDA device: deq-tiny at batch 32 on the CPU stands in for mdeq-large at batch 96"]
    return result


# ---- 6. ONNX Runtime ---------------------------------------------------------------------------
def onnx(quick: bool, workdir: Path) -> Dict[str, Any]:
    import onnxruntime as ort

    from ..checkpoint import load_checkpoint
    from ..export import OnnxPlainSession, export_onnx, parity

    cuda = _cuda()
    providers = ort.get_available_providers()
    on_gpu = cuda is not None and "CUDAExecutionProvider" in providers
    device = str(cuda) if on_gpu else "cpu"
    model = load_checkpoint(SHIPPED / "model.pt").build_model(torch.device(device)).eval()
    path = export_onnx(model.cpu(), workdir / f"{SERVED}.onnx")
    model = model.to(device)
    session = OnnxPlainSession(path, device=device)
    x = _test_images(64)
    check = parity(model.cpu(), session, x)
    model = model.to(device)
    xd = x.to(device)
    times: Dict[str, List[float]] = {"eager": [], "onnxruntime": []}
    for _ in range(3 if quick else 6):
        for name in times:
            _sync(device if on_gpu else None)
            t0 = time.perf_counter()
            if name == "eager":
                with torch.no_grad():
                    model.trajectory(xd)
            else:
                session.run(x)
            _sync(device if on_gpu else None)
            times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    ok = check["labels_agree"] == check["n"] and check["max_abs_logit_diff"] < 1e-3
    result = {
        "status": "pass" if ok else "fail",
        "provider": session.session.get_providers()[0],
        "available_providers": providers,
        "parity": check,
        "speedup_vs_eager": round(med["eager"] / med["onnxruntime"], 2),
        "ms_per_batch_64": {k: round(1000 * v, 2) for k, v in med.items()},
    }
    if not on_gpu:
        why = "no CUDA device" if cuda is None else "the CUDA build of onnxruntime is not installed"
        result["notes"] = [f"{why}: ONNX Runtime's CPU provider against eager on the CPU"]
    return result


SECTIONS: Dict[str, Callable[..., Dict[str, Any]]] = {
    "parity64": parity64,
    "served32": served32,
    "torchserve": torchserve,
    "training": training,
    "defense_cost": defense_cost,
    "onnx": onnx,
}
_NEEDS_WORKDIR = {"torchserve", "onnx"}


def _environment() -> Dict[str, Any]:
    env: Dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:  # pragma: no cover
        env["onnxruntime"] = None
    return env


def run_gpu_check(out_dir: Path, sections=None, quick: bool = False, log=print) -> Dict[str, Any]:
    """Run the sections into ``out_dir`` (gpu-check.json, gpu-check.md); returns the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "work"
    work.mkdir(exist_ok=True)
    report: Dict[str, Any] = {"environment": _environment(), "sections": {}, "quick": quick}
    started = time.perf_counter()
    for name in sections or SECTIONS:
        log(f"gpu-check: {name} ...")
        t0 = time.perf_counter()
        try:
            fn = SECTIONS[name]
            result = fn(quick, work) if name in _NEEDS_WORKDIR else fn(quick)
        except Exception as exc:  # a section that breaks is a failed check, and the others still run
            result = {
                "status": "fail",
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc()[-3000:],
            }
        result["seconds"] = round(time.perf_counter() - t0, 1)
        report["sections"][name] = result
        log(f"gpu-check: {name}: {result['status']}" + (f" ({result['why']})" if result.get("why") else ""))
        (out_dir / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str))
    report["seconds"] = round(time.perf_counter() - started, 1)
    statuses = [s["status"] for s in report["sections"].values()]
    report["verdict"] = "fail" if "fail" in statuses else "pass"
    (out_dir / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "gpu-check.md").write_text(markdown(report))
    return report


def markdown(report: Dict[str, Any]) -> str:
    env = report["environment"]
    gpus = ", ".join(env.get("gpus", [])) or "none"
    lines = [
        "# GPU check",
        "",
        f"torch {env['torch']} (CUDA build {env['cuda_build']}), GPUs: {gpus}; onnxruntime {env.get('onnxruntime')} "
        f"({', '.join(env.get('onnxruntime_providers') or [])}). Verdict: **{report['verdict']}** in "
        f"{report['seconds']:.0f} s.",
        "",
        "| section | status | summary |",
        "|---|---|---|",
    ]
    for name, s in report["sections"].items():
        lines.append(f"| {name} | {s['status']} | {_summary(name, s)} |")
    lines += ["", "Details: `gpu-check.json`."]
    return "\n".join(lines) + "\n"


def _summary(name: str, s: Dict[str, Any]) -> str:
    if s["status"] == "skipped":
        return s["why"]
    if "error" in s:
        return s["error"][:200]
    notes = "; ".join(s.get("notes", []))
    if name == "parity64":
        text = "; ".join(f"{r['model']} {r['what']}: {'ok' if r['pass'] else 'MISMATCH'}" for r in s["rows"])
    elif name == "served32":
        text = "; ".join(
            f"{r['defense']}: labels {r['labels_agree']:.0%}, probs {r['max_prob_diff']:.1e}" for r in s["rows"]
        )
    elif name == "torchserve":
        text = f"device {s['device']}, number_of_gpu {s['number_of_gpu']}, GPU series {len(s['gpu_series'])}"
    elif name == "training":
        sps = ", ".join(f"{r['variant']} {r['samples_per_s']:.1f}" for r in s["rows"])
        text = f"{s['model']} batch {s['batch']} on {s['device']}: {sps} samples/s (paper Table 9: 30.2 -> 39.9)"
    elif name == "defense_cost":
        sps = s["samples_per_s"]
        text = (
            f"{s['model']} batch {s['batch']} on {s['device']}: {sps['plain']} -> {sps['defended']} samples/s, "
            f"{s['slowdown']}x (paper Table 10: 94.9 -> 11.7, 8.1x)"
        )
    elif name == "onnx":
        text = (
            f"{s['provider']}: {s['speedup_vs_eager']}x eager, labels {s['parity']['labels_agree']}/{s['parity']['n']}"
        )
    else:  # pragma: no cover
        text = ""
    return text + (f" ({notes})" if notes else "")
