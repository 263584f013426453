"""Shared fixtures: small models, real CIFAR-10 images, and a briefly trained deq-tiny."""

from __future__ import annotations

import json
import shutil
from dataclasses import astuple
from pathlib import Path

import pytest
import torch

from robustdeq import create_model
from robustdeq.data import default_archive, load_cifar10

from .serving_helpers import SHIPPED, robustdeq_cli


@pytest.fixture(scope="session")
def cifar_test():
    if default_archive() is None:
        pytest.skip("no CIFAR-10 archive (../shared/data or $ROBUSTDEQ_DATA)")
    return load_cifar10("test", progress=False)


@pytest.fixture(scope="session")
def cifar_train():
    if default_archive() is None:
        pytest.skip("no CIFAR-10 archive (../shared/data or $ROBUSTDEQ_DATA)")
    return load_cifar10("train", progress=False)


@pytest.fixture(scope="session")
def test_batch(cifar_test):
    idx = torch.randperm(len(cifar_test), generator=torch.Generator().manual_seed(0))[:32]
    return cifar_test.float_images(idx), cifar_test.labels[idx]


@pytest.fixture(scope="session")
def trained_deq_tiny(cifar_train):
    """deq-tiny after 200 clean steps (about 20 s on 2 cores): 'trained for a short while'."""
    torch.manual_seed(0)
    model = create_model("deq-tiny")
    from robustdeq.training import train_clean

    train_clean(model, cifar_train.images, cifar_train.labels, steps=200, lr=2e-3, seed=0)
    return model.eval()


def available_devices():
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real TorchServe with the shipped deq-tiny archives (plain + defended lanes) on free loopback
    ports, started and stopped with the CLI; shared by every test that needs a server."""
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java 17")
    from robustdeq.serving.runfolder import read_server_info
    from robustdeq.serving.server import Ports

    run_dir = tmp_path_factory.mktemp("serve")
    inference, management, metrics, g1, g2 = astuple(Ports.free())
    proc = robustdeq_cli(
        "serve", "--run-dir", str(run_dir), "--models", "deq-tiny",
        "--inference-port", str(inference), "--management-port", str(management), "--metrics-port", str(metrics),
        "--grpc-ports", str(g1), str(g2), "--timeout", "240",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Authorization: Bearer $TOKEN" in proc.stdout and "key_file.json" in proc.stdout
    info = read_server_info(run_dir)
    yield info
    stopped = robustdeq_cli("stop", "--run-dir", str(run_dir), timeout=60)
    assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(scope="session")
def client(server):
    from robustdeq.serving.client import Client
    from robustdeq.serving.runfolder import read_keys

    return Client(server.inference_url, read_keys(Path(server.run_dir))["inference"])


@pytest.fixture(scope="session")
def reference():
    """The in-process library on the same checkpoint the archives hold, with its entropy gate."""
    from robustdeq.checkpoint import load_checkpoint
    from robustdeq.serving.engine import gate_from_card

    model = load_checkpoint(SHIPPED / "model.pt").build_model()
    card = json.loads((SHIPPED / "robustness_card.json").read_text())
    return model, gate_from_card(card)


def pytest_terminal_summary(terminalreporter):
    """Print the fuzz counts (inputs tried, answers by status, worst decode time)."""
    from .test_hostile_inputs import FUZZ_REPORTS

    if FUZZ_REPORTS:
        terminalreporter.section("hostile-input fuzzing")
        for where, report in FUZZ_REPORTS:
            terminalreporter.write_line(f"{where}: {report.summary()}")
