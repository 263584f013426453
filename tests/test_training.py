"""The training subproject end to end: every recipe family on a few hundred images."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from robustdeq import create_model
from robustdeq.checkpoint import load_checkpoint
from robustdeq.training import Objective
from robustdeq.training.config import AttackSection, ObjectiveSection, load_config
from robustdeq.training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "training" / "configs"
RECIPES = sorted(p.stem for p in CONFIGS.glob("*.yaml") if not p.name.startswith("_"))

#: a few hundred images, batch 32, attacks of 2 steps: seconds per run
TINY = [
    "data.val_size=200",
    "data.train_subset=256",
    "data.epoch_size=null",
    "optim.batch_size=32",
    "optim.epochs=3",
    "optim.lr=3e-3",
    "pretrain.steps=0",
    "attack.steps=2",
    "attack.step_size=4/255",
    "validation.n_clean=64",
    "validation.n_robust=32",
    "validation.selection_n=32",
    "validation.pgd_steps=2",
    "validation.pgd_step_size=4/255",
    "validation.batch_size=64",
    "run.log_every=2",
    "run.checkpoint_every=4",
]


def tiny_trainer(recipe: str, out: Path, *extra: str, **kwargs) -> Trainer:
    return Trainer(load_config(CONFIGS / f"{recipe}.yaml", TINY + list(extra)), out, progress=False, **kwargs)


def records(out: Path, kind: str):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_every_shipped_recipe_is_valid_and_follows_the_paper_where_it_says_so():
    assert {"deq-tiny-pgd", "deq-tiny-pgd-rs", "deq-tiny-trades", "deq-tiny-trades-rs"} <= set(RECIPES)
    assert {"lyadeq-tiny-clean", "lyadeq-tiny-pgd", "lyadeq-tiny-trades"} <= set(RECIPES)
    assert {"mdeq-large-pgd", "mdeq-large-trades-rs", "lyadeq-resnet20"} <= set(RECIPES)
    for r in RECIPES:
        load_config(CONFIGS / f"{r}.yaml")
    big = load_config(CONFIGS / "mdeq-large-trades-rs.yaml")
    assert (big.optim.lr, big.optim.batch_size, big.optim.epochs, big.pretrain.steps) == (1e-3, 96, 210, 16000)
    assert (big.objective.trades_beta, big.objective.jacobian_weight, big.objective.unroll) == (6.0, 0.4, 5)
    assert big.objective.random_depth and (big.attack.steps, big.attack.eps) == (10, 8 / 255)
    assert load_config(CONFIGS / "mdeq-large-pgd.yaml").objective.jacobian_weight == 2.0
    lya = load_config(CONFIGS / "lyadeq-resnet20.yaml")
    assert (lya.model.name, lya.optim.epochs) == ("lyadeq-resnet20", 50)
    assert create_model("lyadeq-resnet20").n_steps == 50


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown config key.*optim.lrr"):
        load_config(CONFIGS / "deq-tiny-pgd.yaml", ["optim.lrr=1"])
    with pytest.raises(ValueError, match="objective.kind must be one of"):
        load_config(CONFIGS / "deq-tiny-pgd.yaml", ["objective.kind=fgsm"])
    with pytest.raises(ValueError, match="write 8/255, not 8"):
        load_config(CONFIGS / "deq-tiny-pgd.yaml", ["attack.eps=8"])
    with pytest.raises(ValueError, match="must be an integer"):
        load_config(CONFIGS / "deq-tiny-pgd.yaml", ["optim.epochs=two"])
    with pytest.raises(FileNotFoundError):
        load_config(CONFIGS / "nope.yaml")
    with pytest.raises(ValueError, match="validation.select must be one of robust, clean, final"):
        load_config(CONFIGS / "deq-tiny-pgd.yaml", ["validation.select=best"])
    cfg = load_config(CONFIGS / "deq-tiny-trades-rs.yaml", ["attack.eps=4/255"])
    assert cfg.attack.eps == pytest.approx(4 / 255) and cfg.name == "deq-tiny-trades-rs"
    assert cfg.objective.kind == "trades" and cfg.objective.random_depth  # inherited through `extends`


def test_the_readout_rules_choose_as_documented():
    from robustdeq.evaluation import StateAccuracy, choose_readout_state

    # a plain-trained model: PGD accuracy is noise (highest at z[1]), clean accuracy rises to z[6]
    acc = StateAccuracy(clean_correct=[46, 57, 61, 64, 67, 69, 68, 68], clean_n=100,
                        robust_correct=[2, 1, 1, 0, 0, 0, 0, 0], robust_n=100)  # fmt: skip
    assert choose_readout_state(acc, "robust") == 1
    assert choose_readout_state(acc, "clean") == 6
    assert choose_readout_state(acc, "final") == 8
    # ties go to the later state under both accuracy rules
    tied = StateAccuracy([50, 60, 60], 100, [30, 30, 20], 100)
    assert choose_readout_state(tied, "robust") == 2 and choose_readout_state(tied, "clean") == 3
    for r in ("deq-small-clean", "lyadeq-small-clean"):
        assert load_config(CONFIGS / f"{r}.yaml").validation.select == "final"


@pytest.mark.parametrize(
    "recipe", ["deq-tiny-pgd", "deq-tiny-pgd-rs", "deq-tiny-trades", "deq-tiny-trades-rs", "lyadeq-tiny-clean",
               "lyadeq-tiny-pgd", "lyadeq-tiny-trades"]
)  # fmt: skip
def test_tiny_run_learns_and_writes_a_safe_checkpoint(recipe, tmp_path, cifar_train):
    result = tiny_trainer(recipe, tmp_path).run()
    assert result.completed and result.step == 3 * 8
    steps = records(tmp_path, "step")
    first, last = steps[0]["ce"], min(r["ce"] for r in steps[-3:])
    assert last < first, f"{recipe}: cross-entropy did not fall ({first:.3f} -> {last:.3f})"
    assert len(records(tmp_path, "epoch")) == 3
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert len((tmp_path / "epochs.csv").read_text().splitlines()) == 4
    blob = torch.load(tmp_path / "model.pt", weights_only=True)  # must load safely
    expected_kind = {"pgd": "pgd_at", "trades": "trades", "clean": "clean"}[recipe.split("-")[2]]
    assert "training_state" not in blob and blob["recipe"]["objective"]["kind"] == expected_kind
    ckpt = load_checkpoint(tmp_path / "model.pt")
    model = ckpt.build_model()
    k = ckpt.early_state_index
    assert 1 <= k <= model.n_steps and model.readout_state == k
    assert len(ckpt.early_state["robust_acc_per_state"]) == model.n_steps
    assert ckpt.data["train_fingerprint"] == cifar_train.fingerprint and ckpt.data["val_size"] == 200
    assert ckpt.library_version and ckpt.val_metrics["state"] == k
    assert set(ckpt.val_metrics) >= {"clean_acc", "pgd_acc", "n"}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["mdeq-large-pgd", "mdeq-large-trades-rs", "lyadeq-resnet20"])
def test_gpu_recipes_run_a_few_steps_on_cpu(recipe, tmp_path, cifar_train):
    trainer = tiny_trainer(recipe, tmp_path, "optim.batch_size=4", "attack.steps=1", "data.train_subset=16")
    result = trainer.run(max_steps=2)
    assert not result.completed and result.step == 2
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt.training_state["step"] == 2 and ckpt.model_name == trainer.cfg.model.name
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records(tmp_path, "step"))


def test_resume_continues_exactly_where_it_stopped(tmp_path, cifar_train):
    full, split = tmp_path / "full", tmp_path / "split"
    tiny_trainer("deq-tiny-trades-rs", full, "optim.epochs=2").run()
    first = tiny_trainer("deq-tiny-trades-rs", split, "optim.epochs=2").run(max_steps=4)
    assert not first.completed and first.step == 4
    assert load_checkpoint(split / "last.pt").training_state["step"] == 4
    second = tiny_trainer("deq-tiny-trades-rs", split, "optim.epochs=2").run()
    assert second.completed and second.step == 16
    a, b = load_checkpoint(full / "model.pt"), load_checkpoint(split / "model.pt")
    for key in a.state_dict:
        assert torch.allclose(a.state_dict[key], b.state_dict[key], atol=1e-6), key
    assert [r["loss"] for r in records(full, "step")] == pytest.approx([r["loss"] for r in records(split, "step")])
    # the stop is logged as the end of a chunk (the account of long runs is read from these)
    (chunk,) = records(split, "chunk")
    assert (chunk["step"], chunk["steps_this_call"], chunk["reason"]) == (4, 4, "--max-steps 4")
    assert chunk["cpu_s"] > 0 and not records(full, "chunk")
    with pytest.raises(ValueError, match="different recipe.*objective.kind"):
        tiny_trainer("deq-tiny-pgd", split, "optim.epochs=2")


def test_depth_draw_follows_the_seed(tmp_path, cifar_train):
    def depths(seed: int, out: Path):
        tiny_trainer("deq-tiny-trades-rs", out, f"run.seed={seed}", "objective.kind=clean", "optim.epochs=1").run()
        return [d for r in records(out, "step") for d in r["depths"]]

    a, b, c = depths(0, tmp_path / "a"), depths(0, tmp_path / "b"), depths(1, tmp_path / "c")
    assert a == b and a != c and len(set(a)) > 1 and set(a) <= set(range(1, 9))


@pytest.mark.parametrize("kind", ["pgd_at", "trades"])
def test_attack_sees_the_steps_depth_unless_redraw_is_configured(kind):
    torch.manual_seed(0)
    model = create_model("deq-tiny")
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    attack = AttackSection(steps=5)
    fixed = Objective(ObjectiveSection(kind=kind, random_depth=True, unroll=1), attack)
    redraw = Objective(ObjectiveSection(kind=kind, random_depth=True, redraw_depth_in_attack=True, unroll=1), attack)
    seen_redrawn = set()
    for step in range(3):
        inp = fixed.prepare(model, x, y, torch.Generator().manual_seed(step))
        assert inp.attack_depths == [inp.depth] * 5 and 1 <= inp.depth <= 8
        inp = redraw.prepare(model, x, y, torch.Generator().manual_seed(step))
        seen_redrawn |= set(inp.attack_depths)
    assert len(seen_redrawn) > 2
    assert model.training  # prepare restores the mode it found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_port_exposes_live_progress(tmp_path, cifar_train):
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    trainer = tiny_trainer("deq-tiny-pgd", tmp_path, "optim.epochs=6", metrics_port=port)
    thread = threading.Thread(target=trainer.run, daemon=True)
    thread.start()
    seen = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and thread.is_alive():
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            time.sleep(0.2)
            continue
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                seen[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        if any(name == "robustdeq_train_val_accuracy" for name, _ in seen) and any(
            name == "robustdeq_train_step" and v > 0 for (name, _), v in seen.items()
        ):
            break
        time.sleep(0.2)
    thread.join(timeout=300)
    names = {name for name, _ in seen}
    assert {
        "robustdeq_train_step",
        "robustdeq_train_epoch",
        "robustdeq_train_loss",
        "robustdeq_train_samples_per_second",
        "robustdeq_train_val_accuracy",
        "robustdeq_train_total_steps",
    } <= names
    assert seen[("robustdeq_train_total_steps", (("run", "deq-tiny-pgd"),))] == 48
    val = {dict(labels)["kind"]: v for (name, labels), v in seen.items() if name == "robustdeq_train_val_accuracy"}
    assert set(val) == {"clean", "pgd"} and all(0 <= v <= 1 for v in val.values())


@pytest.mark.slow
def test_torchrun_two_process_gloo(tmp_path, cifar_train):
    """DistributedDataParallel on the CPU: 2 processes, gloo, a few steps; replicas stay identical."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "robustdeq", "train",
        "--config", str(CONFIGS / "deq-tiny-pgd-rs.yaml"), "--out", str(tmp_path), "--no-progress",
        *[a for s in TINY + ["optim.epochs=1"] for a in ("--set", s)],
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ddp_replicas_identical"] is True
    assert summary["steps"] == 8
    load_checkpoint(tmp_path / "model.pt").build_model()


def test_validation_split_is_stratified_disjoint_and_shuffled(cifar_train):
    from robustdeq.data import train_val_split

    train, val, idx = train_val_split(cifar_train, 1000, seed=0)
    assert len(train) == len(cifar_train) - 1000 and len(val) == 1000
    assert val.labels.bincount().tolist() == [100] * 10
    assert val.labels[:100].bincount(minlength=10).min() > 0  # prefixes are mixed, not grouped by class
    _, again, idx2 = train_val_split(cifar_train, 1000, seed=0)
    assert torch.equal(idx, idx2) and val.fingerprint == again.fingerprint
    _, other, _ = train_val_split(cifar_train, 1000, seed=1)
    assert other.fingerprint != val.fingerprint
    train_fp = {hash(img.numpy().tobytes()) for img in train.images[:2000]}
    assert not train_fp & {hash(img.numpy().tobytes()) for img in val.images}


def test_epochs_are_seeded_and_short_epochs_cover_the_data():
    from robustdeq.data import epoch_batches

    a = epoch_batches(1000, 100, epoch=3, seed=0)
    assert len(a) == 10 and torch.equal(torch.cat(a).sort().values, torch.arange(1000))
    assert all(torch.equal(x, y) for x, y in zip(a, epoch_batches(1000, 100, epoch=3, seed=0)))
    assert not torch.equal(a[0], epoch_batches(1000, 100, epoch=4, seed=0)[0])
    short = [torch.cat(epoch_batches(1000, 50, epoch=e, seed=0, epoch_size=250)) for e in range(4)]
    assert torch.equal(torch.cat(short).sort().values, torch.arange(1000))  # 4 short epochs = one pass


def test_training_throughput_table_runs():
    from robustdeq.training.throughput import VARIANTS, measure_training_throughput, speedups

    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    rows = measure_training_throughput("deq-tiny", x, y, rounds=2, attack_steps=1, progress=False)
    assert [r["variant"] for r in rows] == [v[0] for v in VARIANTS]
    assert all(r["samples_per_s"] > 0 for r in rows)
    assert all(r["mean_depth"] == 8 for r in rows if not r["random_depth"])
    assert set(speedups(rows)) == {"pgd_at", "trades"}


def test_rerunning_a_finished_run_is_a_no_op(tmp_path, cifar_train):
    tiny_trainer("lyadeq-tiny-clean", tmp_path, "optim.epochs=1").run()
    before = (tmp_path / "model.pt").stat().st_mtime_ns
    again = tiny_trainer("lyadeq-tiny-clean", tmp_path, "optim.epochs=1").run()
    assert again.completed and again.val_metrics and (tmp_path / "model.pt").stat().st_mtime_ns == before
