"""Shared fixtures: small models, real CIFAR-10 images, and a briefly trained deq-tiny."""

from __future__ import annotations

import pytest
import torch

from robustdeq import create_model
from robustdeq.data import default_archive, load_cifar10


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
