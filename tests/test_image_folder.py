"""Your own images (issue 32): the ImageFolder index, its bad-data answers, the input-size
policy, and in-memory and streaming splits that agree."""

from __future__ import annotations

import io
import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustdeq.data import CLASSES
from robustdeq.data import image_folder as imf
from robustdeq.data.image_folder import DatasetError, fit_image, index_folder, load_image_folder

KEEP = ("cat", "dog", "ship")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def build_folder(root: Path, cifar, per_class: int = 12, size: int = 64, layout: str = "splits") -> Path:
    """3 CIFAR-10 classes upscaled to ``size``, plus a truncated PNG, random bytes named .jpg
    and a README that is not an image."""
    for name in KEEP:
        label = CLASSES.index(name)
        idx = (cifar.labels == label).nonzero().squeeze(1)[:per_class]
        for j, i in enumerate(idx.tolist()):
            img = Image.fromarray(cifar.images[i].permute(1, 2, 0).numpy()).resize((size, size), Image.BILINEAR)
            split = "test" if layout == "splits" and j >= per_class - 3 else "train"
            folder = root / split / name if layout == "splits" else root / name
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{j:03d}.png")
    first = root / "train" / "cat" if layout == "splits" else root / "cat"
    good = (first / "000.png").read_bytes()
    (first / "truncated.png").write_bytes(good[: len(good) // 2])
    (first / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (first / "README.txt").write_text("not an image")
    return root


@pytest.fixture
def folder(tmp_path, cifar_train, monkeypatch):
    monkeypatch.setenv("ROBUSTDEQ_CACHE", str(tmp_path / "cache"))
    return build_folder(tmp_path / "data", cifar_train)


def test_the_index_names_classes_lists_bad_files_and_ignores_other_files(folder):
    index = index_folder(folder, 64, progress=False)
    assert index.layout == "splits" and index.classes == sorted(KEEP)
    assert sorted(b["path"] for b in index.bad_files) == ["train/cat/noise.jpg", "train/cat/truncated.png"]
    assert index.ignored_files == 1
    assert len(index.files["train"]) == 3 * 9 and len(index.files["test"]) == 3 * 3
    assert set(index.labels["test"]) == {0, 1, 2}
    assert all(0.1 < m < 0.9 for m in index.mean) and all(0.05 < s < 0.5 for s in index.std)


def test_bad_files_are_skipped_with_their_paths_or_fail_the_run(folder, capsys):
    data = load_image_folder(folder, 64, progress=False)
    out = capsys.readouterr().out
    assert "skipping 2 unreadable image file(s)" in out and "train/cat/truncated.png" in out
    assert data.record()["bad_files"] == 2 and data.record()["classes"] == sorted(KEEP)
    with pytest.raises(DatasetError, match="noise.jpg"):
        load_image_folder(folder, 64, on_bad_file="fail", progress=False)


def test_broken_layouts_get_clear_errors_before_training(tmp_path, cifar_train, monkeypatch):
    monkeypatch.setenv("ROBUSTDEQ_CACHE", str(tmp_path / "cache"))
    root = build_folder(tmp_path / "a", cifar_train)
    (root / "train" / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty holds no image files"):
        index_folder(root, 64, progress=False)
    root = build_folder(tmp_path / "b", cifar_train)
    (root / "test" / "horse").mkdir()
    (root / "test" / "horse" / "x.png").write_bytes((root / "train" / "dog" / "000.png").read_bytes())
    with pytest.raises(DatasetError, match="train/ does not: horse"):
        index_folder(root, 64, progress=False)
    single = tmp_path / "c" / "train" / "only"
    single.mkdir(parents=True)
    (single / "x.png").write_bytes((root / "train" / "dog" / "000.png").read_bytes())
    with pytest.raises(DatasetError, match="at least 2"):
        index_folder(tmp_path / "c", 64, progress=False)
    with pytest.raises(DatasetError, match="does not exist"):
        index_folder(tmp_path / "nowhere", 64, progress=False)


def test_one_pool_is_split_by_seed_stratified_and_reproducibly(tmp_path, cifar_train, monkeypatch):
    monkeypatch.setenv("ROBUSTDEQ_CACHE", str(tmp_path / "cache"))
    root = build_folder(tmp_path / "pool", cifar_train, per_class=20, layout="pool")
    a = index_folder(root, 32, val_fraction=0.1, test_fraction=0.2, seed=3, progress=False, use_cache=False)
    b = index_folder(root, 32, val_fraction=0.1, test_fraction=0.2, seed=3, progress=False, use_cache=False)
    c = index_folder(root, 32, val_fraction=0.1, test_fraction=0.2, seed=4, progress=False, use_cache=False)
    assert a.layout == "pool" and a.files == b.files and a.files["test"] != c.files["test"]
    for split, per in (("test", 4), ("val", 2)):
        assert sorted(a.labels[split]) == sorted([0, 1, 2] * per)  # every class, in proportion
    all_files = a.files["train"] + a.files["val"] + a.files["test"]
    assert len(all_files) == len(set(all_files)) == 3 * 20  # disjoint, and the 2 bad cat files left out


def test_the_size_policy_keeps_the_aspect_and_crops_the_centre():
    wide = np.zeros((50, 150, 3), np.uint8)
    wide[:, :50] = (255, 0, 0)  # red left third
    wide[:, 50:100] = (0, 255, 0)  # green centre
    wide[:, 100:] = (0, 0, 255)
    out = np.asarray(fit_image(Image.fromarray(wide), 32))
    assert out.shape == (32, 32, 3)
    assert (out[:, 4:28, 1] > 200).all() and (out[:, 4:28, 0] < 50).all()  # only the green centre survives
    grey = Image.fromarray(np.full((10, 20), 128, np.uint8), "L")
    assert np.asarray(fit_image(grey, 16)).shape == (16, 16, 3)


def test_streaming_and_in_memory_splits_hold_the_same_pixels(folder):
    memory = load_image_folder(folder, 64, progress=False)
    stream = load_image_folder(folder, 64, in_memory_mb=0, progress=False)
    assert isinstance(stream.splits["train"], imf.StreamingSplit)
    assert not isinstance(memory.splits["train"], imf.StreamingSplit)
    idx = torch.tensor([0, 5, 26])
    assert torch.equal(stream.splits["train"].load(idx), memory.splits["train"].images[idx])
    assert torch.equal(stream.splits["train"].labels, memory.splits["train"].labels)
    batches = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])]
    serial = list(stream.splits["train"].batches(batches))
    parallel = list(stream.splits["train"].batches(batches, workers=2))
    for (xa, ya), (xb, yb) in zip(serial, parallel):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.dtype == torch.uint8 and xa.shape[1:] == (3, 64, 64)


def test_the_index_is_cached_until_the_folder_changes(folder, monkeypatch):
    first = index_folder(folder, 64, progress=False)
    calls = []
    real = imf._check_file
    monkeypatch.setattr(imf, "_check_file", lambda job: calls.append(job) or real(job))
    assert index_folder(folder, 64, progress=False) == first and not calls  # cached: nothing decoded
    (folder / "train" / "dog" / "extra.png").write_bytes((folder / "train" / "dog" / "000.png").read_bytes())
    again = index_folder(folder, 64, progress=False)
    assert calls and len(again.files["train"]) == len(first.files["train"]) + 1


@pytest.mark.parametrize("name", ["deq-tiny", "deq-small", "lyadeq-tiny", "lyadeq-small", "resnet-peer", "mdeq-small"])
def test_every_preset_takes_its_classes_and_input_size_and_a_checkpoint_restores_them(name, tmp_path):
    from robustdeq import create_model
    from robustdeq.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    kwargs = dict(num_classes=3, input_size=64, class_names=list(KEEP), mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2])
    model = create_model(name, **kwargs).eval()
    small = create_model(name, num_classes=3).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 3)
        traj = model.trajectory(x)
    # the stem adapts: a 64-pixel input keeps the DEQ state of the 32-pixel design
    assert traj.state(-1).shape[1] == small.trajectory(torch.rand(2, 3, 32, 32)).state(-1).shape[1]
    assert model.class_names == list(KEEP) and model.input_shape == (3, 64, 64)
    path = tmp_path / "m.pt"
    save_checkpoint(Checkpoint(model_name=name, model_config=model.config(), state_dict=model.state_dict()), path)
    again = load_checkpoint(path).build_model()
    assert again.class_names == list(KEEP) and again.input_size == 64
    assert torch.allclose(_normalize(again).mean, torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
    with torch.no_grad():
        assert torch.allclose(again(x), model(x), atol=1e-5)


def _normalize(model):
    from robustdeq.models.blocks import Normalize

    return next(m for m in model.modules() if isinstance(m, Normalize))


def test_cifar_presets_keep_their_names_size_and_weights():
    from robustdeq import create_model

    model = create_model("deq-small")
    assert model.class_names == list(CLASSES) and model.input_size == 32 and "input_size" not in model.config()
    with pytest.raises(ValueError, match="class names"):
        create_model("deq-tiny", num_classes=3, class_names=["a", "b"])


def test_the_augmentation_padding_scales_with_the_image():
    from robustdeq.data import augment

    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    x = torch.rand(8, 3, 32, 32)
    assert torch.equal(augment(x, g()), augment(x, g(), padding=4))  # the CIFAR recipe unchanged
    big = torch.ones(64, 3, 64, 64)
    shifted = augment(big, g())
    # zero padding shows where the crop moved: up to 8 pixels at 64x64, more than 32x32's 4
    zero_cols = (shifted.sum((1, 2)) == 0).sum(1)
    assert zero_cols.max() > 4 and zero_cols.max() <= 8


def test_the_server_applies_the_same_size_policy_and_names_the_models_classes(tmp_path):
    from robustdeq import create_model
    from robustdeq.checkpoint import Checkpoint, save_checkpoint
    from robustdeq.serving.engine import InferenceEngine
    from robustdeq.serving.inputs import decode_image
    from robustdeq.serving.options import parse_options

    wide = np.zeros((50, 150, 3), np.uint8)
    wide[:, 50:100] = (0, 255, 0)  # only the centre third is green
    served = decode_image(_png(wide), (3, 64, 64))
    trained = torch.from_numpy(np.asarray(fit_image(Image.fromarray(wide), 64)).copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(served, trained)  # the server sees what training saw
    model = create_model("deq-tiny", num_classes=3, input_size=64, class_names=list(KEEP))
    path = tmp_path / "m.pt"
    save_checkpoint(Checkpoint(model_name="deq-tiny", model_config=model.config(), state_dict=model.state_dict()), path)
    from robustdeq.checkpoint import load_checkpoint

    engine = InferenceEngine(load_checkpoint(path))
    options = parse_options({}, {}, engine.limits, engine.n_steps, engine.default_state)
    answers, _ = engine.predict(served.unsqueeze(0), [options])
    assert engine.input_shape == (3, 64, 64) and answers[0]["label"] in KEEP
    assert {p["label"] for p in answers[0]["top_k"]} <= set(KEEP)


@pytest.mark.slow
def test_a_folder_goes_from_training_to_a_served_model_with_its_own_classes(tmp_path, cifar_train, monkeypatch):
    """Issue 32's path end to end: train a few steps on an image folder (bad files included),
    evaluate on its test split, archive it and serve it through a real TorchServe, which must
    answer with the folder's class names for an image of another size."""
    import json
    import shutil
    import subprocess
    import sys

    from robustdeq.checkpoint import load_checkpoint
    from robustdeq.serving.client import Client
    from robustdeq.serving.runfolder import read_keys, read_server_info
    from robustdeq.serving.server import Ports

    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java 17")
    monkeypatch.setenv("ROBUSTDEQ_CACHE", str(tmp_path / "cache"))
    root = build_folder(tmp_path / "shapes", cifar_train, per_class=24)
    run = tmp_path / "run"

    def cli(*args, timeout=600):
        proc = subprocess.run([sys.executable, "-m", "robustdeq", *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc

    overrides = ["data.source=imagefolder", f"data.root={root}", "data.input_size=64", "optim.batch_size=16",
                 "optim.epochs=1", "pretrain.steps=0", "attack.steps=1", "validation.n_clean=6", "run.threads=1",
                 "validation.n_robust=6", "validation.selection_n=6", "validation.pgd_steps=1"]  # fmt: skip
    trained = cli("train", "--config", "training/configs/deq-tiny-pgd-rs.yaml", "--out", str(run), "--no-progress",
                  *[a for o in overrides for a in ("--set", o)])  # fmt: skip
    assert "skipping 2 unreadable image file(s)" in trained.stdout + trained.stderr
    ckpt = load_checkpoint(run / "model.pt")
    assert ckpt.data["dataset"] == "imagefolder" and ckpt.data["bad_files"] == 2
    model = ckpt.build_model()
    assert model.class_names == sorted(KEEP) and model.input_size == 64
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["bad_files"] == 2
    cli("evaluate", "--checkpoint", str(run / "model.pt"), "--n", "6", "--attacks", "pgd", "--defense", "none",
        "--out", str(tmp_path / "eval"), "--no-progress")  # fmt: skip
    card = json.loads((tmp_path / "eval" / "robustness_card.json").read_text())
    assert card["clean"]["n"] == 6
    split = json.loads((tmp_path / "eval" / "results.json").read_text())["subset"]["split"]
    assert split.startswith(f"test split of the image folder {root} (3 classes, 64x64"), split
    store = tmp_path / "store"
    cli("archive", "--checkpoint", str(run / "model.pt"), "--name", "shapes", "--out", str(store),
        "--card", str(tmp_path / "eval" / "robustness_card.json"))  # fmt: skip
    ports = Ports.free()
    serve_dir = tmp_path / "serve"
    cli("serve", "--run-dir", str(serve_dir), "--models", "shapes", "--store", str(store),
        "--inference-port", str(ports.inference), "--management-port", str(ports.management),
        "--metrics-port", str(ports.metrics), "--grpc-ports", str(ports.grpc_inference),
        str(ports.grpc_management), "--timeout", "240")  # fmt: skip
    try:
        info = read_server_info(serve_dir)
        client = Client(info.inference_url, read_keys(serve_dir)["inference"])
        photo = np.asarray(Image.open(root / "test" / "dog" / f"{21:03d}.png").resize((90, 70)))
        status, answer = client.predict("shapes", _png(photo))
        assert status == 200, answer
        assert answer["label"] in KEEP and {p["label"] for p in answer["top_k"]} <= set(KEEP)
        status, answer = client.predict("shapes-defended", _png(photo), T_f=2, R=2)
        assert status == 200 and answer["label"] in KEEP, answer
    finally:
        cli("stop", "--run-dir", str(serve_dir), timeout=120)
    _serve_on_the_kserve_runtime(cli, tmp_path, store, _png(photo))


def _serve_on_the_kserve_runtime(cli, tmp_path, store, photo_png: bytes):
    """The same archives in KServe's layout (``robustdeq kserve-layout``), served from its
    model-store by the KServe runtime as the k8s-kserve overlay does: OIP v2 answers with the
    folder's classes and metadata with the 64x64 input shape."""
    import base64
    import json

    from robustdeq.serving.kserve_runtime import launch, runtime_python
    from robustdeq.serving.runfolder import http_get
    from robustdeq.serving.server import Ports

    layout = tmp_path / "layout"
    cli("kserve-layout", "--out", str(layout), "--models", "shapes", "--store", str(store))
    props = (layout / "config" / "config.properties").read_text()
    assert "shapes-defended.mar" in props and sorted(p.name for p in (layout / "model-store").iterdir()) == [
        "shapes-defended.mar", "shapes.mar"]  # fmt: skip
    if runtime_python() is None:
        return  # no kserve here: the TorchServe half above still ran
    served = launch(["shapes"], layout / "model-store", tmp_path / "kserve-run", Ports.free().inference,
                    env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        status, meta = http_get(f"{served.url}/v2/models/shapes", served.token)
        inputs = {i["name"]: i["shape"] for i in json.loads(meta)["inputs"]}
        assert status == 200 and inputs["array"] == [-1, 3, 64, 64], meta
        body = {"parameters": {"T_f": 2, "R": 2}, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                "data": [base64.b64encode(photo_png).decode()]}]}  # fmt: skip
        req = urllib.request.Request(f"{served.url}/v2/models/shapes-defended/infer", json.dumps(body).encode(),
                                     {"Authorization": f"Bearer {served.token}",
                                      "Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())
        outputs = {o["name"]: o for o in answer["outputs"]}
        assert outputs["label"]["data"][0] in KEEP and outputs["probabilities"]["shape"] == [1, len(KEEP)]
        assert outputs["defense_ran"]["data"] == [True]
    finally:
        served.stop()


def test_cifar_folder_writes_a_folder_the_index_reads(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROBUSTDEQ_CACHE", str(tmp_path / "cache"))
    from robustdeq.cli import main

    assert main(["cifar-folder", str(tmp_path / "cf"), "--size", "48", "--classes", "cat,ship", "--per-class", "4",
                 "--test-per-class", "2", "--no-progress"]) == 0  # fmt: skip
    index = index_folder(tmp_path / "cf", 48, progress=False)
    assert index.classes == ["cat", "ship"] and len(index.files["train"]) == 8 and len(index.files["test"]) == 4
    assert Image.open(tmp_path / "cf" / index.files["test"][0]).size == (48, 48)
    assert main(["cifar-folder", str(tmp_path / "x"), "--classes", "unicorn", "--no-progress"]) != 0
    assert "unknown CIFAR-10 class(es) unicorn" in capsys.readouterr().err
