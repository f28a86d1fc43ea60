"""The MLP family: linear, shallow and deep networks, their losses, and equal-size twins."""

import pytest
import torch
import torch.nn.functional as F

from tinylm import config as configlib
from tinylm.errors import UserError
from tinylm.models.mlp import MLP, MLPConfig, count_weights, shallow_twin


def tiny(**kw) -> MLP:
    torch.manual_seed(0)
    return MLP(MLPConfig(**kw)).eval()


@pytest.mark.parametrize("kw", [{}, {"n_layer": 0}, {"n_layer": 3, "activation": "tanh"},
                                {"n_out": 1}, {"n_out": 3, "loss": "mse", "d_in": 5}])
def test_forward_gives_logits_without_targets_and_a_scalar_loss_with_them(kw):
    model = tiny(**kw)
    c = model.config
    x = torch.randn(7, c.d_in)
    out = model(x)
    assert out.shape == (7, c.n_out)
    if c.loss == "mse":
        targets = torch.randn(7, c.n_out)
    else:
        targets = torch.randint(max(2, c.n_out), (7,))
    loss = model(x, targets)
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_losses_are_the_textbook_ones():
    x = torch.randn(6, 2)
    clf = tiny(n_out=3)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    torch.testing.assert_close(clf(x, y), F.cross_entropy(clf(x), y))
    yes_no = tiny(n_out=1)
    b = torch.tensor([1, 0, 1, 1, 0, 0])
    p = torch.sigmoid(yes_no(x)[:, 0])
    torch.testing.assert_close(yes_no(x, b), -(b * p.log() + (1 - b) * (1 - p).log()).mean())
    assert yes_no.predict(x).tolist() == (p > 0.5).long().tolist()
    reg = tiny(n_out=1, loss="mse")
    v = torch.randn(6)  # (B,) targets for one output are fine
    torch.testing.assert_close(reg(x, v), ((reg(x)[:, 0] - v) ** 2).mean())


def test_no_hidden_layer_is_a_linear_model():
    model = tiny(d_in=4, n_out=1, n_layer=0)
    a, b = torch.randn(1, 4), torch.randn(1, 4)
    torch.testing.assert_close(model(0.3 * a + 0.7 * b), 0.3 * model(a) + 0.7 * model(b))
    assert len(model.hidden) == 0 and model.num_params() == 5


def test_a_hidden_layer_makes_it_nonlinear():
    model = tiny(d_in=2, n_layer=1, d_model=8)
    a, b = torch.randn(1, 2), torch.randn(1, 2)
    mid = model(0.5 * a + 0.5 * b)
    assert not torch.allclose(mid, 0.5 * model(a) + 0.5 * model(b))


def test_hidden_states_are_what_the_head_reads():
    model = tiny(n_layer=3, d_model=5)
    x = torch.randn(4, 2)
    states = model.hidden_states(x)
    assert [s.shape for s in states] == [(4, 5)] * 3
    assert (states[0] >= 0).all()  # ReLU
    torch.testing.assert_close(model.head(states[-1]), model(x))


@pytest.mark.parametrize("deep", [MLPConfig(n_layer=4, d_model=16), MLPConfig(n_layer=2),
                                  MLPConfig(d_in=3, n_out=4, n_layer=6, d_model=10)])
def test_the_shallow_twin_has_one_hidden_layer_and_the_same_weight_count(deep):
    twin = shallow_twin(deep)
    assert twin.n_layer == 1 and twin.d_model > deep.d_model
    assert count_weights(deep) == MLP(deep).num_params()
    assert count_weights(twin) == MLP(twin).num_params()
    per_neuron = deep.d_in + 1 + deep.n_out  # one neuron more or less is the closest it gets
    assert abs(count_weights(twin) - count_weights(deep)) <= per_neuron / 2


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="activation"):
        configlib.build(MLPConfig, {"activation": "swish"})
    with pytest.raises(UserError, match="loss"):
        configlib.build(MLPConfig, {"loss": "hinge"})
    with pytest.raises(ValueError, match="n_layer"):
        MLPConfig(n_layer=-1)
