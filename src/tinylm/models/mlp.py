"""Multilayer perceptrons: the neural network before language (`tinylm basics`).

A neuron takes a weighted sum of its inputs plus a bias, z = w . x + b, and passes it through
a nonlinearity, a = f(z): the weights set how strongly each input pulls on it. A layer is many
neurons reading the same inputs; an MLP stacks layers, each reading the one below, and ends in
a linear `head` that gives one number per class (logits) or per predicted value. This is the
network of Rumelhart, Hinton and Williams 1986 ("Learning representations by
back-propagating errors"), trained by the same backpropagation every model in tinylm uses.

`n_layer` counts hidden layers: 0 is a single neuron per output straight on the inputs (a
linear model: logistic regression with `loss = "cross_entropy"` and one output), 1 is the
classic *shallow* network, several make it *deep*. `shallow_twin(cfg)` gives the one-hidden-
layer network with the same number of weights as a deep one, so the two can be compared at
equal size (`tinylm basics spirals`).

Choices: every layer has a bias (unlike the transformer stacks, a 2-D input needs one for a
neuron's boundary to leave the origin); weights start from He (ReLU) or Glorot (tanh) normal
initialisation with zero biases, so a deep stack neither explodes nor dies at the start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.models.layers import optim_groups

ACTIVATIONS = ("relu", "tanh")
LOSSES = ("cross_entropy", "mse")


@dataclass
class MLPConfig:
    d_in: int = 2  # input features
    n_out: int = 2  # classes (cross_entropy; 1 = yes/no, a logistic output) or values (mse)
    n_layer: int = 1  # hidden layers: 0 = linear model, 1 = shallow, more = deep
    d_model: int = 16  # neurons per hidden layer
    activation: str = "relu"  # relu | tanh
    loss: str = "cross_entropy"  # cross_entropy | mse

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not one of "
                             f"{', '.join(ACTIVATIONS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.d_in < 1 or self.n_out < 1 or self.n_layer < 0 or self.d_model < 1:
            raise ValueError("need d_in, n_out, d_model >= 1 and n_layer >= 0")


def count_weights(c: MLPConfig) -> int:
    """Weights and biases of an MLP with config c, without building it."""
    widths = [c.d_in] + [c.d_model] * c.n_layer + [c.n_out]
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def shallow_twin(deep: MLPConfig) -> MLPConfig:
    """The one-hidden-layer MLP whose weight count is closest to `deep`'s: with h neurons it
    has (d_in + 1) h + (h + 1) n_out weights, solved for h."""
    per_neuron = deep.d_in + 1 + deep.n_out
    h = max(1, round((count_weights(deep) - deep.n_out) / per_neuron))
    return MLPConfig(d_in=deep.d_in, n_out=deep.n_out, n_layer=1, d_model=h,
                     activation=deep.activation, loss=deep.loss)


class MLP(nn.Module):
    family = "mlp"

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = c = config
        widths = [c.d_in] + [c.d_model] * c.n_layer
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], c.n_out)
        gain = math.sqrt(2.0) if c.activation == "relu" else 1.0
        for layer in self.hidden:  # He / Glorot: activations keep their scale with depth
            fan = layer.in_features if c.activation == "relu" else \
                (layer.in_features + layer.out_features) / 2
            nn.init.normal_(layer.weight, std=gain / math.sqrt(fan))
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(widths[-1]))
        nn.init.zeros_(self.head.bias)

    def act(self, z: torch.Tensor) -> torch.Tensor:
        return torch.relu(z) if self.config.activation == "relu" else torch.tanh(z)

    def hidden_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every hidden layer's activations for inputs x (B, d_in): a list of (B, d_model)."""
        states = []
        for layer in self.hidden:
            x = self.act(layer(x))  # (B, d_model)
            states.append(x)
        return states

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, d_in) -> logits / predicted values (B, n_out), or the mean loss against
        targets: class ids (B,) for cross_entropy (0/1 with one output), values (B, n_out)
        or (B,) for mse."""
        h = x
        for layer in self.hidden:
            h = self.act(layer(h))  # (B, d_model)
        out = self.head(h)  # (B, n_out)
        if targets is None:
            return out
        return self.loss(out, targets)

    def loss(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.config.loss == "mse":
            return F.mse_loss(out, targets.reshape(out.shape).to(out.dtype))
        if self.config.n_out == 1:  # yes/no: a logistic output, the log-loss of its sigmoid
            return F.binary_cross_entropy_with_logits(out[:, 0], targets.to(out.dtype))
        return F.cross_entropy(out, targets)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class ids (B,) for a classifier, values (B, n_out) for a regression."""
        out = self(x)
        if self.config.loss == "mse":
            return out
        return (out[:, 0] > 0).long() if self.config.n_out == 1 else out.argmax(-1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        return optim_groups(self, [])
