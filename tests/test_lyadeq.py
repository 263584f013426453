import pytest
import torch

from robustdeq import create_model
from robustdeq.models.lyadeq import ICNN, LyapunovFunction, project_dynamics, smooth_relu


def test_smooth_relu_is_monotone_convex_and_c1():
    x = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    y = smooth_relu(x, 0.1)
    dy = torch.diff(y)
    assert (dy >= 0).all(), "not monotone"
    assert (torch.diff(dy) >= -1e-12).all(), "not convex"
    assert y[x <= 0].abs().max() == 0
    assert torch.allclose(
        smooth_relu(torch.tensor([0.05, 0.1, 0.5], dtype=torch.float64), 0.1),
        torch.tensor([0.0125, 0.05, 0.45], dtype=torch.float64),
    )


def test_icnn_is_convex():
    torch.manual_seed(0)
    g = ICNN(8, 32).double()
    a, b = torch.randn(256, 8, dtype=torch.float64), torch.randn(256, 8, dtype=torch.float64)
    for t in (0.25, 0.5, 0.75):
        assert (g(t * a + (1 - t) * b) <= t * g(a) + (1 - t) * g(b) + 1e-10).all()


def test_lyapunov_function_is_positive_definite_and_finite_at_zero():
    torch.manual_seed(0)
    V = LyapunovFunction(16).double()
    z = torch.randn(64, 16, dtype=torch.float64)
    zero = torch.zeros(3, 16, dtype=torch.float64)
    assert (V(z) > 0).all()
    assert V(zero).abs().max() < 1e-12
    v0, g0 = V.value_and_grad(zero)
    assert torch.isfinite(g0).all()
    # g(0) is recomputed: after changing the parameters V(0) is still exactly 0
    with torch.no_grad():
        for p in V.parameters():
            p.add_(0.3)
    assert V(zero).abs().max() < 1e-12  # not g(new params)(0) - g(old params)(0)


def test_projection_guarantees_lyapunov_decrease():
    """grad V^T F_hat <= -alpha V wherever the projection is applied (paper 2, Eq. 8)."""
    torch.manual_seed(0)
    V = LyapunovFunction(16).double()
    alpha = 0.1
    z = torch.randn(512, 16, dtype=torch.float64) * 3
    F = torch.randn(512, 16, dtype=torch.float64) * 5
    v, gv = V.value_and_grad(z)
    F_hat = project_dynamics(F, v, gv, alpha)
    lhs = (gv * F_hat).sum(-1)
    assert (lhs <= -alpha * v + 1e-9 * (1 + v.abs())).all()
    untouched = (gv * F).sum(-1) + alpha * v <= 0
    assert untouched.any() and torch.equal(F_hat[untouched], F[untouched])
    # at z = 0 no NaN
    zero = torch.zeros(4, 16, dtype=torch.float64)
    v0, g0 = V.value_and_grad(zero)
    assert torch.isfinite(project_dynamics(torch.randn(4, 16, dtype=torch.float64), v0, g0, alpha)).all()


def test_decrease_holds_on_the_model_dynamics():
    torch.manual_seed(0)
    model = create_model("lyadeq-tiny").eval().double()
    x = torch.rand(32, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        traj = model.trajectory(x)
    for k in (1, 5, -1):
        z, u = traj.states[k], traj.injections[k]
        v, gv = model.lyapunov.value_and_grad(z)
        F_hat = project_dynamics(model.cell(z, u) - z, v, gv, model.alpha)
        assert ((gv * F_hat).sum(-1) <= -model.alpha * v + 1e-9).all()


def test_orthogonal_fc_is_orthogonal():
    model = create_model("lyadeq-tiny")
    W = model.orth_fc.weight
    assert torch.allclose(W.T @ W, torch.eye(W.shape[0]), atol=1e-5)


@pytest.mark.slow
def test_lyadeq_predictions_are_not_constant(cifar_train, cifar_test):
    """The collapse trap (docs/design.md §5) would give one prediction for every input."""
    torch.manual_seed(0)
    from robustdeq.training import train_clean

    model = create_model("lyadeq-tiny")
    train_clean(model, cifar_train.images, cifar_train.labels, steps=150, lr=2e-3, seed=0)
    idx = torch.arange(0, len(cifar_test), 25)
    x, y = cifar_test.float_images(idx), cifar_test.labels[idx]
    with torch.no_grad():
        traj = model.trajectory(x)
        pred = traj.predict()
        fixed_points = traj.states[-1]
    assert pred.unique().numel() >= 5
    assert (pred == y).float().mean() > 0.2  # chance is 0.1
    spread = torch.cdist(fixed_points[:50], fixed_points[:50]).mean()
    assert spread > 1e-2 * fixed_points.norm(dim=1).mean()
    assert traj.residuals[:, -1].median() < 1e-2
