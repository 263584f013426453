"""Helpers shared by the tests that talk to a real TorchServe (the server fixture is in conftest.py)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from robustdeq.data import PROJECT_ROOT
from robustdeq.serving.runfolder import http_get

SHIPPED = PROJECT_ROOT / "training" / "shipped" / "deq-tiny-trades-rs"


def robustdeq_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "robustdeq", *args], capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT
    )


def png(images_uint8: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(images_uint8.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def scrape(server) -> dict:
    """The live metrics port, parsed with prometheus-client: {family name: family}."""
    status, body = http_get(server.metrics_url + "/metrics")
    assert status == 200
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def family(families, name):
    """A family by its exposed name (the parser drops a counter's ``_total``)."""
    return families.get(name) or families.get(name.removesuffix("_total"))


def sample_value(families, name, suffix="", **labels):
    fam = family(families, name)
    if fam is None:
        return 0.0
    total = 0.0
    for s in fam.samples:
        if s.name.endswith(suffix) and all(s.labels.get(k) == v for k, v in labels.items()):
            if suffix or not s.name.endswith(("_bucket", "_count", "_sum", "_created")):
                total += s.value
    return total


def entropy_extremes(reference, cifar_test, n: int = 200, seed: int = 3):
    """The highest- and lowest-entropy test images (uint8 CHW) among ``n`` seeded ones: on either
    side of the gate threshold, so that ``defense=gated`` runs on the first and not on the second."""
    model, gate = reference
    idx = torch.randperm(len(cifar_test), generator=torch.Generator().manual_seed(seed))[:n]
    with torch.no_grad():
        entropy = model.trajectory(cifar_test.images[idx].float() / 255).entropy(gate["state"])
    assert float(entropy.max()) > gate["threshold"] > float(entropy.min())
    return cifar_test.images[idx[entropy.argmax()]], cifar_test.images[idx[entropy.argmin()]]


#: what every tritonclient script starts with: its imports and ``error(call)``
TRITONCLIENT_PRELUDE = r"""
import base64, json, sys
import numpy as np
from tritonclient.utils import InferenceServerException


def error(call):
    try:
        call()
    except InferenceServerException as exc:
        return {"status": exc.status(), "message": exc.message()}
    return None
"""


def run_tritonclient(script: str, *args: str, modules=("http", "grpc")) -> dict:
    """Run a tritonclient script (a client this project did not write) with the Python of the
    KServe environment, where tritonclient is installed, and return the JSON of its last line;
    skip when there is none."""
    from robustdeq.serving.kserve_runtime import runtime_python

    python = runtime_python()
    wanted = ", ".join(f"tritonclient.{m}" for m in modules)
    if python is None or subprocess.run([python, "-c", f"import {wanted}"], capture_output=True).returncode:
        pytest.skip(f"no {wanted} (the KServe environment, pyproject extra 'kserve')")
    run = subprocess.run([python, "-c", TRITONCLIENT_PRELUDE + script, *args], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
