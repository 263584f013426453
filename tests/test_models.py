import pytest
import torch

from robustdeq import create_model, list_models
from robustdeq.models import model_from_config

EXPECTED = {"deq-tiny", "mdeq-small", "mdeq-large", "lyadeq-tiny", "lyadeq-resnet20"}


def test_registry():
    assert EXPECTED <= set(list_models())
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet-9000")
    with pytest.raises(TypeError, match="bad override"):
        create_model("deq-tiny", no_such_argument=1)
    m = create_model("deq-tiny", n_steps=5, channels=16)
    assert m.n_steps == 5 and m.channels == 16
    rebuilt = model_from_config(m.config())
    assert rebuilt.config() == m.config()


def test_mdeq_large_matches_the_paper_size():
    """Paper 1 App. A: DEQ-Large has a parameter count similar to ResNet-18 (about 11.1M)."""
    n = create_model("mdeq-large").num_parameters()
    assert abs(n - 11.1e6) / 11.1e6 < 0.02, n


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_model_exposes_the_same_parts_and_trains(name):
    torch.manual_seed(0)
    model = create_model(name, n_steps=4)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    u = model.inject(x)
    z0 = model.initial_state(u)
    z1 = model.cell(z0, u)
    assert z1.shape == z0.shape == (2, model.state_dim(u))
    logits = model.head(z1, u)
    assert logits.shape == (2, 10)
    traj = model.trajectory(x.detach())
    assert traj.n_steps == 4 and traj.residuals.shape == (2, 5)
    # forward + backward through a differentiable unroll reach parameters and input
    from robustdeq.training import phantom_forward

    out = phantom_forward(model, x, n_steps=2, unroll=2)
    out.logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
