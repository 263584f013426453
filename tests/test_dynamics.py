import math

import pytest
import torch

from robustdeq import DEFAULT_READOUT, create_model, prediction_entropy


@pytest.fixture(scope="module")
def traj():
    torch.manual_seed(0)
    model = create_model("deq-tiny").eval()
    with torch.no_grad():
        return model.trajectory(torch.rand(4, 3, 32, 32))


def test_entropy_matches_definition():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, -10.0, -10.0, -10.0], [1.0, 2.0, 3.0, 4.0]])
    p = logits.softmax(-1)
    expected = -(p * p.log()).sum(-1)
    assert torch.allclose(prediction_entropy(logits), expected, atol=1e-6)
    assert math.isclose(prediction_entropy(logits)[0].item(), math.log(4), rel_tol=1e-6)
    assert prediction_entropy(logits)[1] < 1e-6


def test_trajectory_shape_and_indexing(traj):
    assert traj.n_steps == 8 and len(traj.states) == 9 and traj.residuals.shape == (4, 9)
    assert torch.count_nonzero(traj.states[0]) == 0  # z[0] = 0
    assert DEFAULT_READOUT == -2 and traj.index(-2) == 7 and traj.index(-1) == 8 and traj.index(3) == 3
    assert torch.equal(traj.state(), traj.states[7])
    for bad in (9, -10):
        with pytest.raises(IndexError, match="out of range"):
            traj.logits(bad)


def test_readouts_are_lazy_and_consistent(traj):
    assert not traj._logits
    logits = traj.logits(5)
    assert set(traj._logits) == {5} and traj.logits(5) is logits
    assert torch.allclose(traj.probabilities(5).sum(-1), torch.ones(4))
    assert torch.equal(traj.predict(5), logits.argmax(-1))
    H = traj.entropies()
    assert H.shape == (4, 8) and torch.allclose(H[:, 4], traj.entropy(5))
    assert (H >= 0).all() and (H <= math.log(10) + 1e-5).all()


def test_residuals_are_relative_residuals(traj):
    model = traj.model
    with torch.no_grad():
        for k in (1, 4, 8):
            z = traj.states[k]
            fz = model.cell(z, traj.injections[k])
            expected = (fz - z).norm(dim=1) / fz.norm(dim=1)
            assert torch.allclose(traj.residuals[:, k], expected, rtol=1e-4, atol=1e-6)


def test_forward_reads_the_configured_state():
    torch.manual_seed(0)
    model = create_model("deq-tiny", readout_state=-1).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        t = model.trajectory(x)
        assert torch.allclose(model(x), t.logits(-1), atol=1e-6)
        assert torch.allclose(model(x, state=3), t.logits(3), atol=1e-6)
