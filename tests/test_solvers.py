import pytest
import torch

from robustdeq.dynamics import CellMap
from robustdeq.solvers import SOLVERS, Anderson, FixedPointIteration, create_solver, relative_residual, solve

from .conftest import available_devices


def contractive_map(batch=6, dim=20, seed=0, device="cpu", dtype=torch.float64):
    """z -> tanh(W z + b_i): a contraction (||W||_2 = 0.8), a different b per sample."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(dim, dim, generator=g, dtype=dtype)
    W = 0.8 * W / torch.linalg.matrix_norm(W, 2)
    b = torch.randn(batch, dim, generator=g, dtype=dtype)
    W, b = W.to(device), b.to(device)

    def f(z, idx=None):
        bb = b if idx is None else b[idx]
        return torch.tanh(z @ W.T + bb)

    return f, torch.zeros(batch, dim, dtype=dtype, device=device)


SOLVER_CONFIGS = [
    ("fixed_point", {}),
    ("fixed_point", {"damping": 0.7}),
    ("anderson", {"m": 5}),
    ("broyden", {"m": 8}),
    ("broyden", {"m": 3}),
]


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("name,kwargs", SOLVER_CONFIGS)
def test_all_solvers_reach_the_same_fixed_point(name, kwargs, device):
    f, z0 = contractive_map(device=device)
    reference = solve(f, z0, FixedPointIteration(), 400).states[-1]
    assert relative_residual(reference, f(reference)).max() < 1e-12
    out = solve(f, z0, create_solver(name, **kwargs), 60)
    assert torch.allclose(out.states[-1], reference, atol=1e-8)
    assert out.residuals.shape == (z0.shape[0], 61)
    assert out.residuals[:, -1].max() < 1e-8


@pytest.mark.parametrize("name,kwargs", SOLVER_CONFIGS)
def test_samples_are_independent(name, kwargs):
    """No batch-global choices: each sample's trajectory equals its trajectory when solved alone."""
    f, z0 = contractive_map()
    batched = solve(f, z0, create_solver(name, **kwargs), 12)
    for i in range(z0.shape[0]):
        idx = torch.tensor([i])
        alone = solve(lambda z, sub=None, i=idx: f(z, i), z0[idx], create_solver(name, **kwargs), 12)
        for zb, za in zip(batched.states, alone.states):
            assert torch.allclose(zb[i], za[0], atol=1e-12)
        assert torch.allclose(batched.residuals[i], alone.residuals[0], atol=1e-12)


@pytest.mark.parametrize("name,kwargs", SOLVER_CONFIGS)
def test_tolerance_stop_keeps_trajectory_length(name, kwargs):
    f, z0 = contractive_map()
    out = solve(f, z0, create_solver(name, **kwargs), 200, tol=1e-6)
    assert len(out.states) == 201 and out.residuals.shape[1] == 201
    # once a sample stops, its recorded states and residuals repeat
    first = (out.residuals <= 1e-6).float().argmax(1)
    assert (out.residuals[:, -1] <= 1e-6).all()
    for i, k in enumerate(first.tolist()):
        assert k < 200
        assert torch.equal(out.states[k][i], out.states[-1][i])


def test_tolerance_stop_is_per_sample():
    """A sample that converges early stops while the others continue."""
    f, z0 = contractive_map(batch=2)

    def g(z, idx=None):  # sample 0: constant map (converges in one step); sample 1: contraction
        out = f(z, idx)
        rows = torch.arange(z.shape[0]) if idx is None else idx
        return torch.where((rows == 0).view(-1, 1), torch.full_like(out, 0.5), out)

    out = solve(g, z0, create_solver("broyden"), 30, tol=1e-9)
    assert out.residuals[0, 1] == 0 and out.residuals[1, 1] > 1e-3
    assert out.final.step[0] == 1 and out.final.step[1] > 1


def test_solvers_are_deterministic():
    f, z0 = contractive_map()
    for name, kwargs in SOLVER_CONFIGS:
        a = solve(f, z0, create_solver(name, **kwargs), 10)
        b = solve(f, z0, create_solver(name, **kwargs), 10)
        assert all(torch.equal(x, y) for x, y in zip(a.states, b.states))


def test_anderson_with_memory_one_is_plain_iteration():
    f, z0 = contractive_map()
    a = solve(f, z0, Anderson(m=1), 10).states
    b = solve(f, z0, FixedPointIteration(), 10).states
    assert all(torch.allclose(x, y, atol=1e-14) for x, y in zip(a, b))


def iterations_to(residuals, target):
    hit = residuals <= target
    return torch.where(
        hit.any(1), hit.float().argmax(1), torch.full_like(hit[:, 0], residuals.shape[1], dtype=torch.long)
    ).float()


def test_quasi_newton_solvers_beat_plain_iteration_on_a_deq_cell(trained_deq_tiny, test_batch, capsys):
    """On a (briefly) trained deq-tiny cell, Broyden and Anderson reach a relative
    residual of 1e-3 in fewer steps than plain fixed-point iteration."""
    model = trained_deq_tiny
    x = test_batch[0][:16]
    counts = {}
    with torch.no_grad():
        u = model.inject(x)
        for name, kwargs in [("fixed_point", {}), ("anderson", {"m": 5}), ("broyden", {"m": 30})]:
            out = solve(CellMap(model, u), model.initial_state(u), create_solver(name, **kwargs), 40)
            counts[name] = iterations_to(out.residuals, 1e-3).mean().item()
    with capsys.disabled():
        print(f"\n  mean steps to relative residual 1e-3 on trained deq-tiny (16 test images): {counts}")
    assert counts["broyden"] < counts["fixed_point"]
    assert counts["anderson"] < counts["fixed_point"]
    assert counts["broyden"] < 40 and counts["anderson"] < 40


def test_registry_and_bad_arguments():
    assert set(SOLVERS) == {"fixed_point", "anderson", "broyden"}
    with pytest.raises(ValueError, match="unknown solver"):
        create_solver("newton")
    with pytest.raises(ValueError):
        create_solver("fixed_point", damping=0.0)
    with pytest.raises(ValueError):
        create_solver("anderson", m=0)
    with pytest.raises(ValueError):
        create_solver("broyden", m=0)
