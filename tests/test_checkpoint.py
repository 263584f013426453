"""Checkpoint files load with weights_only=True, and bad files fail with clear errors."""

from __future__ import annotations

import pytest
import torch

from robustdeq import create_model
from robustdeq.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint


class ArbitraryObject:
    """Stands for any pickled Python object (which could run code when unpickled)."""


def make_checkpoint(name: str = "deq-tiny") -> Checkpoint:
    torch.manual_seed(0)
    model = create_model(name, readout_state=5)
    return Checkpoint(
        model_name=name,
        model_config=model.config(),
        state_dict=model.state_dict(),
        recipe={"objective": {"kind": "trades"}},
        val_metrics={"clean_acc": 0.5, "pgd_acc": 0.3, "n": 100},
        early_state={"index": 5, "robust_acc_per_state": [0.1] * 8},
        data={"train_fingerprint": "abc", "val_size": 5000},
    )


def test_round_trip_rebuilds_the_same_model(tmp_path):
    ckpt = make_checkpoint()
    path = save_checkpoint(ckpt, tmp_path / "m.pt")
    torch.load(path, weights_only=True)  # the contract: no pickled objects inside
    loaded = load_checkpoint(path, expect_model="deq-tiny")
    model = loaded.build_model()
    assert loaded.early_state_index == 5 and model.readout_state == 5 and not model.training
    x = torch.rand(2, 3, 32, 32)
    reference = create_model("deq-tiny", readout_state=5)
    reference.load_state_dict(ckpt.state_dict)
    assert torch.allclose(model(x), reference.eval()(x))
    assert loaded.val_metrics["pgd_acc"] == 0.3 and loaded.data["val_size"] == 5000


def test_missing_empty_and_truncated_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_checkpoint(tmp_path / "empty.pt")
    path = save_checkpoint(make_checkpoint(), tmp_path / "m.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "noise.pt").write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated|does not load with weights_only"):
        load_checkpoint(tmp_path / "noise.pt")


def test_files_with_pickled_objects_are_refused(tmp_path):
    blob = make_checkpoint().to_dict()
    blob["recipe"] = ArbitraryObject()
    torch.save(blob, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(tmp_path / "unsafe.pt")


def test_foreign_and_mismatched_files(tmp_path):
    torch.save(create_model("deq-tiny").state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="not a RobustDEQ checkpoint"):
        load_checkpoint(tmp_path / "bare.pt")
    future = make_checkpoint().to_dict()
    future["format_version"] = 99
    torch.save(future, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "future.pt")
    path = save_checkpoint(make_checkpoint(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="holds model 'deq-tiny', not 'lyadeq-tiny'"):
        load_checkpoint(path, expect_model="lyadeq-tiny")
    # weights of another model under this model's config
    wrong = make_checkpoint()
    wrong.state_dict = create_model("lyadeq-tiny").state_dict()
    with pytest.raises(CheckpointError, match="weights do not match model 'deq-tiny'.*missing"):
        load_checkpoint(save_checkpoint(wrong, tmp_path / "wrong.pt")).build_model()
    # same keys, different shapes (config says 48 channels, weights have 32)
    narrow = make_checkpoint()
    narrow.state_dict = create_model("deq-tiny", channels=32).state_dict()
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(save_checkpoint(narrow, tmp_path / "narrow.pt")).build_model()
    ckpt = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="fingerprint"):
        ckpt.check_dataset("other")
