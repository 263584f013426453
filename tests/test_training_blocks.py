import pytest
import torch

from robustdeq import create_model
from robustdeq.attacks import pgd_linf
from robustdeq.data import augment
from robustdeq.training import (
    draw_intermediate_step,
    jacobian_regularizer,
    phantom_forward,
)


def test_intermediate_draw_is_in_range_and_controlled_by_the_caller():
    draws = [draw_intermediate_step(8, torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(draws) == set(range(1, 9))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert [draw_intermediate_step(8, g1) for _ in range(20)] == [draw_intermediate_step(8, g2) for _ in range(20)]
    with pytest.raises(ValueError):
        draw_intermediate_step(0)


def test_phantom_forward_reads_the_requested_state():
    torch.manual_seed(0)
    model = create_model("deq-tiny").eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        traj = model.trajectory(x)
    out = phantom_forward(model, x, n_steps=3, unroll=0)
    assert torch.allclose(out.state, traj.states[3])
    # with no unroll steps the logits are h(f(z[3])), i.e. computed from z[4] of fixed-point iteration
    assert torch.allclose(out.logits, model.head(model.cell(traj.states[3], traj.injections[3]), None), atol=1e-5)


def test_jacobian_regularizer_matches_the_exact_frobenius_norm():
    """Hutchinson's estimate is unbiased: E ||v^T J||^2 = ||J||_F^2."""
    torch.manual_seed(0)
    model = create_model("lyadeq-tiny").eval().double()
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    u = model.inject(x)
    z = torch.randn(1, model.dim, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda zz: model.cell(zz, u), z).reshape(model.dim, model.dim)
    exact = J.pow(2).sum() / model.dim
    est = jacobian_regularizer(model, z, u, n_vectors=4000, generator=torch.Generator().manual_seed(0))
    assert abs(est.item() - exact.item()) / exact.item() < 0.1
    est.backward()
    assert model.W1.weight.grad is not None


def test_pgd_stays_in_the_ball_and_raises_the_loss():
    torch.manual_seed(0)
    model = create_model("deq-tiny").eval()
    x = torch.rand(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))

    def loss(xa):
        return torch.nn.functional.cross_entropy(phantom_forward(model, xa).logits, y, reduction="none")

    x_adv = pgd_linf(loss, x, eps=8 / 255, steps=5, generator=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert loss(x_adv).mean() > loss(x).mean()


def test_augment_crops_and_flips():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    no_pad = augment(x, torch.Generator().manual_seed(0), padding=0)
    for i in range(2):
        assert torch.equal(no_pad[i], x[i]) or torch.equal(no_pad[i], x[i].flip(-1))


def test_the_old_module_paths_still_import_for_one_release():
    from robustdeq import dynamics
    from robustdeq.training import blocks, clean_training, loss_terms, quick

    assert blocks.jacobian_regularizer is loss_terms.jacobian_regularizer
    assert blocks.draw_intermediate_step is loss_terms.draw_intermediate_step
    assert blocks.phantom_forward is dynamics.phantom_forward
    assert quick.train_clean is clean_training.train_clean
