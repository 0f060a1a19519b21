"""Networks over stacked trial weights: the MLP of Eqs. 1-2 and 13, its activations, losses and
weight-initialisation schemes (Eqs. S.17-S.18; the Oja paper's naive N(0, std²)).

Every tensor carries the trials as its leading dimension: a weight ``W_{ℓ-1,ℓ}`` has shape
``(trials, dim y_ℓ, dim y_{ℓ-1})``, a bias ``(trials, 1, dim y_ℓ)`` and activations
``(trials, batch, dim)``; the online inner loop uses ``batch = 1``. Each registry takes a new
entry with one function and one line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

BETA = 10.0


def softplus(z: Tensor, beta: float = BETA) -> Tensor:
    """σ(z) = log(1 + exp(βz)) / β (Eq. 13)."""
    return F.softplus(z, beta=beta)


def softplus_slope(y: Tensor, beta: float = BETA) -> Tensor:
    """σ'(z) written through y = σ(z): 1 - exp(-β y), the form of Eq. 24."""
    return -torch.expm1(-beta * y)


class Activation(NamedTuple):
    """``fn(z, beta)`` and its slope σ'(z) written through ``(y, z, beta)``."""

    fn: Callable[[Tensor, float], Tensor]
    slope: Callable[[Tensor, Tensor, float], Tensor]


ACTIVATIONS: dict[str, Activation] = {
    "softplus": Activation(softplus, lambda y, z, beta: softplus_slope(y, beta)),
    "relu": Activation(lambda z, beta: torch.relu(z), lambda y, z, beta: (z > 0).to(z.dtype)),
}


class Loss(NamedTuple):
    """``output(z_L)`` = y_L, the per-sample loss ``loss(z_L, target) (T, B)``, and
    ``error(z_L, y_L, target)`` = e_L = ∂loss/∂z_L of one sample."""

    output: Callable[[Tensor], Tensor]
    loss: Callable[[Tensor, Tensor], Tensor]
    error: Callable[[Tensor, Tensor, Tensor], Tensor]


def _cross_entropy(z: Tensor, label: Tensor) -> Tensor:
    return F.cross_entropy(z.flatten(0, 1), label.flatten(), reduction="none").view(label.shape)


LOSSES: dict[str, Loss] = {
    # softmax output, cross-entropy; e_L = softmax(z_L) - onehot(label)
    "cross_entropy": Loss(
        lambda z: torch.softmax(z, dim=-1),
        _cross_entropy,
        lambda z, y, label: y - F.one_hot(label, z.shape[-1]).to(y.dtype),
    ),
    # linear output, mean over output units of the squared error; e_L = 2 (z_L - target) / dim
    "mse": Loss(
        lambda z: z,
        lambda z, target: (z - target).pow(2).mean(-1),
        lambda z, y, target: 2 * (z - target) / z.shape[-1],
    ),
}


def _stacked(draw: Callable[[torch.Generator], Tensor], generators) -> Tensor:
    return torch.stack([draw(g) for g in generators])


def xavier_uniform(fan_out: int, fan_in: int, generators, std: float | None = None) -> Tensor:
    """U(±sqrt(6 / (fan_in + fan_out))) per trial, each from its own generator (Eq. S.17)."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return _stacked(lambda g: (torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound, generators)


def xavier_normal(fan_out: int, fan_in: int, generators, std: float | None = None) -> Tensor:
    """N(0, 2 / (fan_in + fan_out)) per trial (Eq. S.18)."""
    scale = math.sqrt(2.0 / (fan_in + fan_out))
    return _stacked(lambda g: torch.randn(fan_out, fan_in, generator=g) * scale, generators)


def kaiming_normal(fan_out: int, fan_in: int, generators, std: float | None = None) -> Tensor:
    """N(0, 2 / fan_in) per trial (He et al. 2015, for ReLU)."""
    scale = math.sqrt(2.0 / fan_in)
    return _stacked(lambda g: torch.randn(fan_out, fan_in, generator=g) * scale, generators)


def normal(fan_out: int, fan_in: int, generators, std: float | None = None) -> Tensor:
    """N(0, std²) per trial: the Oja paper's naive initialisation (``std`` given)."""
    if std is None or not std > 0:
        raise ValueError(f"init 'normal' needs a standard deviation std > 0, got {std!r}")
    return _stacked(lambda g: torch.randn(fan_out, fan_in, generator=g) * std, generators)


#: Weight initialisations: name -> fn(fan_out, fan_in, generators, std) -> (T, fan_out, fan_in).
INITIALISERS: dict[str, Callable[..., Tensor]] = {
    "xavier_uniform": xavier_uniform,
    "xavier_normal": xavier_normal,
    "kaiming": kaiming_normal,
    "normal": normal,
}


@dataclass(frozen=True)
class MLP:
    """``z_ℓ = y_{ℓ-1} W_ℓ^T (+ b_ℓ)``, ``y_ℓ = σ(z_ℓ)`` for hidden layers, ``y_L = output(z_L)``.

    ``sizes = [dim y_0, ..., dim y_L]``; ``activation`` and ``loss`` name entries of
    :data:`ACTIVATIONS` and :data:`LOSSES`, ``init`` one of :data:`INITIALISERS` (with
    ``init_std`` for ``normal``). Biases (``bias=True``) start at zero and are not plastic.
    """

    sizes: tuple[int, ...]
    activation: str = "softplus"
    beta: float = BETA
    bias: bool = False
    loss: str = "cross_entropy"
    init: str = "xavier_uniform"
    init_std: float | None = None

    def __post_init__(self):
        for name, value, registry in (
            ("activation", self.activation, ACTIVATIONS),
            ("loss", self.loss, LOSSES),
            ("init", self.init, INITIALISERS),
        ):
            if value not in registry:
                raise ValueError(f"model.{name}={value!r} is unknown; allowed: {', '.join(registry)}")

    @property
    def depth(self) -> int:
        return len(self.sizes) - 1

    def init_weights(self, generators) -> list[Tensor]:
        """Fresh forward weights ``W_{ℓ-1,ℓ}``, one set per trial/generator."""
        draw = INITIALISERS[self.init]
        return [
            draw(n_out, n_in, generators, self.init_std) for n_in, n_out in zip(self.sizes, self.sizes[1:])
        ]

    def init_biases(self, trials: int) -> list[Tensor]:
        return [torch.zeros(trials, 1, n) for n in self.sizes[1:]] if self.bias else []

    def forward(
        self, weights: list[Tensor], x: Tensor, biases: list[Tensor] | None = None, linear=None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Forward pass (Eqs. 1-2): ``ys = [y_0..y_L]`` and ``zs = [z_1..z_L]``.

        ``linear(index, y)`` computes ``y W_index^T`` (default: a plain batched product); the
        fused meta-gradient replaces it by its stored products.
        """
        fn = ACTIVATIONS[self.activation].fn
        output = LOSSES[self.loss].output
        ys, zs = [x], []
        for index, weight in enumerate(weights):
            z = ys[-1] @ weight.transpose(-1, -2) if linear is None else linear(index, ys[-1])
            if biases:
                z = z + biases[index]
            zs.append(z)
            ys.append(output(z) if index == len(weights) - 1 else fn(z, self.beta))
        return ys, zs

    def slope(self, y: Tensor, z: Tensor) -> Tensor:
        """σ'(z) of a hidden layer (for the input layer y_0 = x, z = x: Eq. 24's synthetic e_0)."""
        return ACTIVATIONS[self.activation].slope(y, z, self.beta)

    def output_error(self, z: Tensor, y: Tensor, target: Tensor) -> Tensor:
        """e_L = ∂loss/∂z_L of each sample."""
        return LOSSES[self.loss].error(z, y, target)

    def sample_loss(self, z: Tensor, target: Tensor) -> Tensor:
        """Per-sample loss ``(T, B)``."""
        return LOSSES[self.loss].loss(z, target)


def init_weights(sizes: list[int], generators) -> list[Tensor]:
    """Fresh forward weights W_{ℓ-1,ℓ} (Xavier uniform), one set per trial/generator."""
    return MLP(tuple(sizes)).init_weights(generators)


def forward(weights: list[Tensor], x: Tensor, beta: float = BETA) -> tuple[list[Tensor], list[Tensor]]:
    """The 2023 paper's network (softplus β, softmax output): ``ys`` and ``zs`` of :meth:`MLP.forward`."""
    sizes = (weights[0].shape[-1], *(w.shape[-2] for w in weights))
    return MLP(sizes, beta=beta).forward(weights, x)


class Products:
    """The matrix products of one online step, by name: the fused meta-gradient
    (:mod:`metaplast.core.fused`) replaces them by stored values, so the network, the pathways
    and the rules call them by name and layer, never by position.

    - ``forward(i, y)`` = ``y W_i^T`` (z of the layer above),
    - ``backward(i, e)`` = ``e W_i`` (BP's ``e B^T`` with ``B = W_i^T``, differentiable in W),
    - ``send(i, e, B)`` = ``e B^T`` for a matrix B that is not differentiated through W,
    - ``wt_y(i, y)`` = ``y W_i`` (the ``W^T y_ℓ`` of F^6, F^7, F^9).
    """

    def __init__(self, weights: list[Tensor]):
        self.weights = weights

    def forward(self, index: int, y: Tensor) -> Tensor:
        return y @ self.weights[index].transpose(-1, -2)

    def backward(self, index: int, e: Tensor) -> Tensor:
        return e @ self.weights[index]

    def send(self, index: int, e: Tensor, matrix: Tensor) -> Tensor:
        return e @ matrix.transpose(-1, -2)

    def wt_y(self, index: int, y: Tensor) -> Tensor:
        return y @ self.weights[index]
