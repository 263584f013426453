"""``robustdeq gpu-check`` runs on a machine without a GPU: the GPU-only sections say why they
were skipped, the CPU stand-ins run, and the report files are written. The parity sections'
code paths run here against a second CPU copy (``ROBUSTDEQ_GPU_CHECK_DEVICE=cpu``)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from robustdeq.bench.gpu_check import SECTIONS, run_gpu_check

from .serving_helpers import robustdeq_cli


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only mode")
def test_gpu_check_in_cpu_mode_passes_and_says_what_it_skipped(tmp_path):
    proc = robustdeq_cli("gpu-check", "--quick", "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    sections = report["sections"]
    assert list(sections) == list(SECTIONS) and report["verdict"] == "pass"
    for name in ("parity64", "served32"):
        assert sections[name]["status"] == "skipped" and "no CUDA device" in sections[name]["why"]
    for name in ("torchserve", "training", "defense_cost", "onnx"):
        assert sections[name]["status"] == "pass", (name, sections[name])
        assert any("no CUDA device" in note for note in sections[name]["notes"]), name
    assert sections["torchserve"]["number_of_gpu"] == 0 and sections["torchserve"]["device"] == "cpu"
    assert all(a["status"] == 200 and a["timing_ms"] for a in sections["torchserve"]["answers"].values())
    assert sections["defense_cost"]["slowdown"] > 2  # R = 10 input steps every 2 solver steps cost
    assert [r["variant"] for r in sections["training"]["rows"]] == ["PGD-AT", "PGD-AT + Sec. 3.3"]
    assert sections["onnx"]["parity"]["labels_agree"] == sections["onnx"]["parity"]["n"]
    markdown = (tmp_path / "gpu-check.md").read_text()
    assert "| parity64 | skipped | no CUDA device" in markdown and "Verdict: **pass**" in markdown


def test_the_parity_sections_run_against_a_second_device(tmp_path, monkeypatch):
    monkeypatch.setitem(os.environ, "ROBUSTDEQ_GPU_CHECK_DEVICE", "cpu")
    report = run_gpu_check(tmp_path, ["parity64", "served32"], quick=True, log=lambda *a: None)
    parity = report["sections"]["parity64"]
    assert parity["status"] == "pass", parity
    assert {r["what"] for r in parity["rows"]} >= {
        "dynamics, broyden",
        "dynamics, anderson",
        "Algorithm 1 (T_f = 2, R = 10)",
    }
    served = report["sections"]["served32"]
    assert served["status"] == "pass" and [r["defense"] for r in served["rows"]] == ["off", "on"]


def test_a_broken_section_fails_the_run_without_stopping_the_others(tmp_path, monkeypatch):
    from robustdeq.bench import gpu_check

    def broken(quick):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setitem(gpu_check.SECTIONS, "parity64", broken)
    report = run_gpu_check(tmp_path, ["parity64", "defense_cost"], quick=True, log=lambda *a: None)
    assert report["verdict"] == "fail"
    assert "illegal memory access" in report["sections"]["parity64"]["error"]
    assert report["sections"]["defense_cost"]["status"] == "pass"
