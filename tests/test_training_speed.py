"""The training-speed levers of issue 30: the cheaper Jacobian estimate, the shorter attack
unroll, and the benchmark that times them against a recipe."""

from __future__ import annotations

import pytest
import torch

from robustdeq import create_model
from robustdeq.training import Objective
from robustdeq.training.config import AttackSection, ObjectiveSection, load_config
from robustdeq.training.loss_terms import jacobian_regularizer
from robustdeq.training.speed import LEVERS, format_levers, time_levers


def _state(model, n=16):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 32, 32, generator=g)
    u = model.inject(x)
    z = model.initial_state(u) + 0.1 * torch.randn(u.shape[0], model.state_dim(u), generator=g)
    return z, u


def test_the_jacobian_on_part_of_the_batch_estimates_the_same_mean_and_has_parameter_gradients():
    torch.manual_seed(0)
    model = create_model("deq-tiny").eval()
    z, u = _state(model, 32)
    full = torch.stack(
        [jacobian_regularizer(model, z, u, generator=torch.Generator().manual_seed(s)) for s in range(40)]
    ).mean()
    quarter = [jacobian_regularizer(model, z, u, generator=torch.Generator().manual_seed(s), fraction=0.25)
               for s in range(40)]  # fmt: skip
    est = torch.stack(quarter).mean().detach()
    assert abs(float(est) - float(full.detach())) < 0.15 * float(full.detach())  # unbiased: the averages agree
    # it really probes a quarter of the samples: the cell sees 8 of the 32
    seen = []
    cell = model.cell
    model.cell = lambda z_, u_: (seen.append(z_.shape[0]), cell(z_, u_))[1]
    jacobian_regularizer(model, z, u, fraction=0.25)
    del model.cell
    assert seen == [8]
    params = [p for p in model.block.parameters() if p.requires_grad]
    grads = torch.autograd.grad(quarter[0], params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_fraction_keeps_at_least_one_sample():
    model = create_model("deq-tiny").eval()
    z, u = _state(model, 2)
    assert torch.isfinite(jacobian_regularizer(model, z, u, fraction=0.01))


@pytest.mark.parametrize("attack_unroll", [0, 2])
def test_the_attack_unroll_changes_only_the_attack(attack_unroll):
    torch.manual_seed(0)
    model = create_model("deq-tiny").eval()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    attack = AttackSection(kind="pgd", steps=2, step_size=2 / 255)

    def adv(obj):
        return Objective(obj, attack).prepare(model, x, y, torch.Generator().manual_seed(1)).x_adv

    default = adv(ObjectiveSection(kind="pgd_at"))
    same = adv(ObjectiveSection(kind="pgd_at", attack_unroll=5))  # K = the loss's K: the recipe as before
    other = adv(ObjectiveSection(kind="pgd_at", attack_unroll=attack_unroll))
    assert torch.equal(default, same)
    assert not torch.equal(default, other)
    assert (other - x).abs().max() <= 8 / 255 + 1e-6


def test_bad_lever_settings_are_refused():
    with pytest.raises(ValueError, match="jacobian_fraction"):
        load_config(None, ["objective.jacobian_fraction=0"])
    with pytest.raises(ValueError, match="attack_unroll"):
        load_config(None, ["objective.attack_unroll=-1"])


def test_the_lever_benchmark_times_each_lever_against_the_recipe():
    overrides = ["model.name=deq-tiny", "optim.batch_size=8", "pretrain.steps=0", "attack.kind=nfgsm",
                 "attack.step_size=8/255", "objective.jacobian_weight=1.0"]  # fmt: skip
    res = time_levers(["recipe", "jacobian-every-2", "attack-unroll-0"], None, overrides, rounds=1, steps=2,
                      progress=False)  # fmt: skip
    assert set(res) == {"recipe", "jacobian-every-2", "attack-unroll-0"}
    assert res["recipe"]["speedup"] == pytest.approx(1.0)
    for rec in res.values():
        assert rec["s_per_step"] > 0 and rec["samples_per_s"] == pytest.approx(8 / rec["s_per_step"])
    table = format_levers(res)
    assert "`attack-unroll-0`" in table and LEVERS["attack-unroll-0"].description in table
