import pytest
import torch
import torch.nn.functional as F

from robustdeq import create_model
from robustdeq.attacks import pgd_linf
from robustdeq.defense import entropy_reduction, gated_entropy_reduction
from robustdeq.training import phantom_forward


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return create_model("deq-tiny").eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("solver", ["broyden", "anderson", "fixed_point"])
def test_r_zero_is_bit_identical_to_the_plain_solve(solver, images):
    torch.manual_seed(0)
    model = create_model("deq-tiny", solver=solver, solver_kwargs={}).eval()
    with torch.no_grad():
        plain = model.trajectory(images)
    res = entropy_reduction(model, images, T_f=1, R=0, with_plain=False)
    assert all(torch.equal(a, b) for a, b in zip(plain.states, res.trajectory.states))
    assert torch.equal(plain.residuals, res.trajectory.residuals)
    assert not res.ran.any() and torch.equal(res.x_defended, images)


def test_updates_stay_in_the_eps_box_and_image_range(small_model, images):
    x = images.clone()
    x[0] = 0.0  # the box [x - eps, x + eps] is cut by [0, 1] at both ends
    x[1] = 1.0
    eps = 4 / 255
    res = entropy_reduction(small_model, x, T_f=1, R=5, beta=3 / 255, eps=eps)
    d = res.x_defended - x
    assert d.abs().max() <= eps + 1e-7
    assert res.x_defended.min() >= 0 and res.x_defended.max() <= 1
    assert torch.allclose(res.perturbation, d.flatten(1).abs().amax(1))
    assert (res.perturbation > 0).all() and res.ran.all()


def test_mixed_settings_equal_running_each_sample_alone(images):
    """Per-sample T_f / R / beta / eps inside one batch are vectorised, not looped."""
    torch.manual_seed(0)
    model = create_model("deq-tiny").eval().double()
    x = images.double()
    T_f = torch.tensor([1, 2, 4, 2, 8, 3])
    R = torch.tensor([3, 0, 5, 1, 2, 4])
    beta = torch.tensor([1, 2, 2, 3, 1, 2], dtype=torch.float64) / 255
    eps = torch.tensor([8, 8, 4, 16, 8, 2], dtype=torch.float64) / 255
    mixed = entropy_reduction(model, x, T_f=T_f, R=R, beta=beta, eps=eps, with_plain=False)
    for i in range(x.shape[0]):
        alone = entropy_reduction(
            model, x[i : i + 1], T_f=int(T_f[i]), R=int(R[i]), beta=float(beta[i]), eps=float(eps[i]), with_plain=False
        )
        assert torch.allclose(mixed.x_defended[i], alone.x_defended[0], atol=1e-10)
        for a, b in zip(mixed.trajectory.states, alone.trajectory.states):
            assert torch.allclose(a[i], b[0], atol=1e-9)
        assert torch.allclose(mixed.entropy_after()[i], alone.entropy_after()[0], atol=1e-9)
    assert mixed.ran.tolist() == [True, False, True, True, True, True]


def test_deterministic(small_model, images):
    a = entropy_reduction(small_model, images, T_f=2, R=3)
    b = entropy_reduction(small_model, images, T_f=2, R=3)
    assert torch.equal(a.x_defended, b.x_defended)
    assert all(torch.equal(s, t) for s, t in zip(a.trajectory.states, b.trajectory.states))


def test_result_reports_entropies_before_and_after(small_model, images):
    res = entropy_reduction(small_model, images, T_f=2, R=2)
    N = small_model.n_steps
    assert res.entropy_before().shape == res.entropy_after().shape == (6, N)
    assert torch.allclose(res.entropy_reduction(), res.entropy_before()[:, -1] - res.entropy_after()[:, -1])
    with pytest.raises(ValueError, match="plain"):
        entropy_reduction(small_model, images, R=1, with_plain=False).entropy_before()


def test_bad_settings_are_rejected(small_model, images):
    for kwargs, match in [
        ({"T_f": 0}, "T_f"),
        ({"R": -1}, "R"),
        ({"eps": -0.1}, "eps"),
        ({"R": torch.tensor([1, 2])}, "one value per sample"),
    ]:
        with pytest.raises(ValueError, match=match):
            entropy_reduction(small_model, images, **kwargs)
    with pytest.raises(RuntimeError, match="eval"):
        entropy_reduction(create_model("deq-tiny").train(), images)


def test_gate_thresholds(small_model, images):
    with torch.no_grad():
        plain = small_model.trajectory(images)
    none = gated_entropy_reduction(small_model, images, threshold=float("inf"), R=3)
    assert not none.ran.any()
    assert all(torch.equal(a, b) for a, b in zip(none.trajectory.states, plain.states))
    full = gated_entropy_reduction(small_model, images, threshold=-1.0, T_f=2, R=3)
    ungated = entropy_reduction(small_model, images, T_f=2, R=3, with_plain=False)
    assert full.ran.all()
    assert torch.allclose(full.x_defended, ungated.x_defended)
    # a threshold in the middle: exactly the high-entropy samples run, the others are untouched
    H = plain.entropy(-2)
    tau = H.median()
    half = gated_entropy_reduction(small_model, images, threshold=tau, gate_state=-2, T_f=2, R=3)
    assert torch.equal(half.ran, H > tau)
    calm = ~half.ran
    assert torch.equal(half.x_defended[calm], images[calm])
    assert torch.equal(half.trajectory.states[-1][calm], plain.states[-1][calm])
    assert torch.allclose(half.x_defended[half.ran], ungated.x_defended[half.ran])


@pytest.mark.slow
def test_defense_lowers_entropy_on_perturbed_inputs(trained_deq_tiny, test_batch, capsys):
    """Paper 1 Fig. 3b: on a (briefly) trained DEQ, Algorithm 1 lowers the final-state
    entropy of PGD-perturbed inputs."""
    model = trained_deq_tiny
    x, y = test_batch

    def loss(xa):
        return F.cross_entropy(phantom_forward(model, xa).logits, y, reduction="none")

    x_adv = pgd_linf(loss, x, steps=10, generator=torch.Generator().manual_seed(0))
    res = entropy_reduction(model, x_adv, T_f=2, R=10)
    before, after = res.entropy_before()[:, -1], res.entropy_after()[:, -1]
    with capsys.disabled():
        print(f"\n  final-state entropy on PGD-10 inputs: plain {before.mean():.3f} -> defended {after.mean():.3f}")
    assert after.mean() < before.mean() - 0.05
    assert (after < before).float().mean() > 0.7
