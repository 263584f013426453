"""The budget recipes: single-step attacks, SGD + one-cycle, the weight EMA, collapse
detection, the explicit peer, validation-split ranking and the budget-study report."""

from __future__ import annotations

import json

import pytest
import torch

from robustdeq import create_model
from robustdeq.attacks import single_step_linf
from robustdeq.checkpoint import load_checkpoint
from robustdeq.training.budget import markdown_table, read_pilots, update_document
from robustdeq.training.config import OptimSection, load_config
from robustdeq.training.optim import WeightEMA, learning_rate
from robustdeq.training.trainer import Trainer

from .test_training import CONFIGS, TINY, records, tiny_trainer

EPS = 8 / 255


def _linear_loss(w):
    return lambda x: (x * w).flatten(1).sum(1)


def test_nfgsm_takes_one_eps_step_from_2eps_noise_without_projection():
    x = torch.full((64, 3, 8, 8), 0.5)
    w = torch.randn(1, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    adv = single_step_linf(_linear_loss(w), x, EPS, EPS, noise=2 * EPS, project=False, generator=g)
    delta = adv - x
    assert delta.abs().max() <= 3 * EPS + 1e-6 and delta.abs().max() > 2 * EPS  # beyond the eps-ball
    # the step is eps along sign(w) on top of noise in [-2 eps, 2 eps]
    noise = delta - EPS * w.sign()
    assert noise.abs().max() <= 2 * EPS + 1e-6
    # FGSM-RS projects back to the ball
    fgsm = single_step_linf(_linear_loss(w), x, EPS, 1.25 * EPS, noise=EPS, project=True, generator=g)
    assert (fgsm - x).abs().max() <= EPS + 1e-6
    assert ((fgsm - x).sign() == w.sign().expand_as(x)).float().mean() > 0.9


def test_onecycle_and_cosine_schedules():
    cfg = OptimSection(name="sgd", lr=0.1, schedule="onecycle", onecycle_peak=0.4)
    lrs = [learning_rate(cfg, s, 100) for s in range(100)]
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 39
    assert lrs[0] < 0.01 and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a <= b for a, b in zip(lrs[:39], lrs[1:40])) and all(a >= b for a, b in zip(lrs[39:], lrs[40:]))
    cos = [learning_rate(OptimSection(lr=1e-3), s, 100) for s in (0, 50, 99)]
    assert cos[0] == pytest.approx(1e-3) and cos[1] == pytest.approx(5e-4, rel=0.05) and cos[2] < 1e-5


def test_weight_ema_averages_parameters_and_copies_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    ema = WeightEMA(model, decay=0.5)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema.update(model)  # warm-up decay min(0.5, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.model[0].weight, d * start + (1 - d) * (start + 1))
    assert torch.equal(ema.model[1].running_mean, torch.full((4,), 3.0))
    restored = WeightEMA(model, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1 and torch.equal(restored.model[0].weight, ema.model[0].weight)


def test_budget_recipe_runs_resumes_exactly_and_ships_the_ema(tmp_path, cifar_train):
    extra = [
        "attack.kind=nfgsm",
        "attack.step_size=8/255",
        "optim.name=sgd",
        "optim.lr=0.02",
        "optim.schedule=onecycle",
        "optim.ema_decay=0.9",
        "optim.epochs=2",
    ]
    full, split = tmp_path / "full", tmp_path / "split"
    tiny_trainer("deq-tiny-pgd-rs", full, *extra).run()
    tiny_trainer("deq-tiny-pgd-rs", split, *extra).run(max_steps=5)
    resumed = tiny_trainer("deq-tiny-pgd-rs", split, *extra).run()
    assert resumed.completed
    a, b = load_checkpoint(full / "model.pt"), load_checkpoint(split / "model.pt")
    for key in a.state_dict:
        assert torch.allclose(a.state_dict[key], b.state_dict[key], atol=1e-6), key
    last = load_checkpoint(full / "last.pt")
    assert "ema" in last.training_state and last.training_state["wall_s"] > 0 and last.training_state["cpu_s"] > 0
    # model.pt holds the average, last.pt the raw weights
    key = "block.conv1.weight"
    assert torch.allclose(a.state_dict[key], last.training_state["ema"]["weights"][key])
    assert not torch.allclose(a.state_dict[key], last.state_dict[key])
    assert all("wall_s" in r for r in records(full, "step") + records(full, "epoch"))
    summary = json.loads((full / "summary.json").read_text())
    assert summary["threads"] >= 1 and summary["wall_s"] > 0 and summary["collapses"] == []


def test_collapse_stops_from_the_best_epoch(tmp_path, cifar_train, monkeypatch):
    """A validation PGD drop beyond validation.collapse_drop ends the run from best.pt."""
    trainer = tiny_trainer("deq-tiny-pgd", tmp_path, "optim.epochs=3", "attack.kind=fgsm_rs")
    real = trainer.validate
    fake_pgd = iter([0.30, 0.05, 0.05])

    def rigged(n_clean, n_robust, desc=""):
        acc = real(n_clean, n_robust, desc)
        if desc.startswith("validating"):
            value = next(fake_pgd)
            acc.robust = lambda k, v=value: v
        return acc

    monkeypatch.setattr(trainer, "validate", rigged)
    result = trainer.run()
    assert result.completed and result.step == trainer.steps_per_epoch * 2  # stopped after epoch 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_early"] and summary["collapses"][0]["epoch"] == 2
    assert summary["best_epoch"]["epoch"] == 1
    best, shipped = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "model.pt")
    for key in best.state_dict:
        assert torch.equal(best.state_dict[key], shipped.state_dict[key]), key
    assert [r.get("collapse", False) for r in records(tmp_path, "epoch")] == [False, True]


def test_the_explicit_peer_fits_the_deq_interface(cifar_train):
    peer = create_model("resnet20")
    assert 0.25e6 < peer.num_parameters() < 0.3e6  # ResNet-20: 0.27M
    # the compared models of issue 15 are within 15% of the DEQ they are compared with
    for model, reference in [("resnet-peer", "deq-small"), ("lyadeq-small", "deq-small")]:
        ratio = create_model(model).num_parameters() / create_model(reference).num_parameters()
        assert abs(ratio - 1) < 0.15, (model, ratio)
    tiny_peer = create_model("resnet20", widths=(8, 16, 32)).num_parameters()
    assert abs(tiny_peer / create_model("deq-tiny").num_parameters() - 1) < 0.15
    lya = create_model("lyadeq-small")
    assert lya.features[1].body[1].num_features == 14  # the backbone widths reach the ResNet-20 features
    x = cifar_train.float_images(torch.arange(8))
    traj = peer.eval().trajectory(x)
    assert traj.n_steps == 1 and float(traj.residuals[:, -1].detach().max()) == 0.0
    assert torch.allclose(peer(x), traj.logits(-1))
    x.requires_grad_(True)
    from robustdeq.dynamics import phantom_forward

    phantom_forward(peer, x).logits.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="jacobian_weight must be 0"):
        load_config(CONFIGS / "deq-tiny-pgd.yaml", ["model.name=resnet20"])


def test_peer_trains_with_the_deq_recipe(tmp_path, cifar_train):
    trainer = Trainer(
        load_config(
            CONFIGS / "deq-tiny-pgd.yaml",
            TINY + ["model.name=resnet20", "model.overrides={widths: [8, 16, 32]}", "objective.jacobian_weight=0"],
        ),
        tmp_path,
        progress=False,
    )
    result = trainer.run()
    assert result.completed
    ckpt = load_checkpoint(tmp_path / "model.pt")
    assert ckpt.model_name == "resnet20" and ckpt.build_model().readout_index() == 1


def test_bad_budget_settings_are_refused():
    for bad, match in [
        ("attack.kind=fgsm", "attack.kind must be one of"),
        ("optim.name=rmsprop", "optim.name must be one of"),
        ("optim.schedule=step", "optim.schedule must be one of"),
        ("optim.ema_decay=1.5", "ema_decay"),
        ("validation.on_collapse=ignore", "on_collapse"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_config(CONFIGS / "deq-tiny-pgd.yaml", [bad])


@pytest.mark.slow
def test_validation_split_ranking_and_the_budget_report(tmp_path, cifar_train):
    """A pilot folder -> evaluate --split val -> the ranked table with its command."""
    from robustdeq.evaluation.suite import EvalConfig, Evaluator

    pilot = tmp_path / "budget" / "tiny-pilot"
    tiny_trainer("deq-tiny-pgd", pilot, "optim.epochs=1").run()
    (pilot / "command.txt").write_text("robustdeq train --config x.yaml --out tiny-pilot\n")
    config = EvalConfig(n=16, split="val", families=("pgd", "apgd-ce"), defenses=(), apgd_iters=5, batch_size=16)
    ev = Evaluator(str(pilot / "model.pt"), str(pilot / "val-eval"), config, device="cpu", progress=False)
    from robustdeq.evaluation.report import write_outputs

    write_outputs(ev.run(), pilot / "val-eval")
    results = json.loads((pilot / "val-eval" / "results.json").read_text())
    assert results["subset"]["split"].startswith("validation split")
    pilots = read_pilots(tmp_path / "budget")
    assert len(pilots) == 1 and pilots[0].worst is not None and pilots[0].params == 66474
    table = markdown_table(pilots)
    assert "`tiny-pilot`" in table and "robustdeq train --config x.yaml" in table
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- budget-table:start -->\nold\n<!-- budget-table:end -->\noutro\n")
    update_document(doc, table)
    text = doc.read_text()
    assert "old" not in text and "tiny-pilot" in text and text.startswith("intro") and text.endswith("outro\n")
    with pytest.raises(ValueError, match="split must be one of"):
        EvalConfig(split="train")


def test_the_step_profile_names_every_part_and_the_attack_dominates_pgd10():
    from robustdeq.training.profile import format_profile, profile_step

    prof = profile_step("deq-tiny", "trades", attack_steps=10, batch=16, rounds=1, validation_seconds_per_step=0.01)
    parts = {k: v for k, v in prof.items() if k != "full step (measured)"}
    assert all(v > 0 for v in prof.values())
    attack = prof["attack: solves (no grad)"] + prof["attack: unroll + input backward"]
    assert attack > 0.4 * sum(parts.values())  # ten attack iterations against one loss pass
    table = format_profile(prof, batch=16)
    assert "| TRADES clean target |" in table and "samples/s" in table


def test_the_long_run_account_splits_runs_into_chunks(tmp_path):
    from robustdeq.training.long_runs import chunk_rows, markdown_table

    run = tmp_path / "deq-small-nfgsm-rs"
    run.mkdir()
    log = [
        {"type": "step", "step": 10, "phase": "train", "samples_per_s": 60.0, "cpu_s": 100, "wall_s": 60},
        {"type": "epoch", "epoch": 1, "val_clean_acc": 0.30, "val_pgd_acc": 0.20, "cpu_s": 200, "wall_s": 110},
        {"type": "chunk", "step": 15, "reason": "--time-limit", "cpu_s": 250, "wall_s": 140},
        {"type": "step", "step": 20, "phase": "train", "samples_per_s": 70.0, "cpu_s": 300, "wall_s": 170},
        {"type": "epoch", "epoch": 2, "val_clean_acc": 0.40, "val_pgd_acc": 0.25, "cpu_s": 3600, "wall_s": 1800},
    ]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (run / "config.yaml").write_text("optim:\n  epochs: 2\n")
    rows = chunk_rows(run)
    assert [(r["chunk"], r["status"], r["epoch"], r["samples_per_s"]) for r in rows] == [
        (1, "stopped", 1, 60.0), (2, "running", 2, 70.0)
    ]  # fmt: skip
    assert rows[1]["cpu_h"] == 1.0 and rows[0]["val_pgd"] == 0.20
    (run / "summary.json").write_text("{}")
    (run / "model.pt").write_bytes(b"")
    assert chunk_rows(run)[-1]["status"] == "finished"
    table = markdown_table(tmp_path, ["deq-small-nfgsm-rs", "resnet-peer-nfgsm"])
    assert "| `deq-small-nfgsm-rs` | 2 | finished | 2 of 2 | 1.00 |" in table and "not started" in table
