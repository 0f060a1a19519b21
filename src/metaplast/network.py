"""Functional MLP over stacked trial weights (Methods, Eqs. 1-2 and 13).

Every tensor carries the trials as its leading dimension: a weight
``W_{l-1,l}`` has shape ``(trials, dim y_l, dim y_{l-1})`` and activations
have shape ``(trials, batch, dim)``; the online inner loop uses ``batch = 1``.
"""

from __future__ import annotations

import math

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


def forward(
    weights: list[Tensor], x: Tensor, beta: float = BETA, linear=None
) -> tuple[list[Tensor], list[Tensor]]:
    """Forward pass (Eqs. 1-2): returns ``ys = [y_0..y_L]`` and ``zs = [z_1..z_L]``.

    Hidden layers use softplus, the output ``y_L = softmax(z_L)``. ``linear(y, index)``
    computes ``y W_index^T`` (default: a plain batched product).
    """
    ys, zs = [x], []
    for index, weight in enumerate(weights):
        z = ys[-1] @ weight.transpose(-1, -2) if linear is None else linear(ys[-1], index)
        zs.append(z)
        last = index == len(weights) - 1
        ys.append(torch.softmax(z, dim=-1) if last else softplus(z, beta))
    return ys, zs


def xavier_uniform(trials: int, fan_out: int, fan_in: int, generators: list[torch.Generator]) -> Tensor:
    """U(±sqrt(6 / (fan_in + fan_out))) per trial, each from its own generator (Eq. S.17)."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return torch.stack(
        [(torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound for g in generators[:trials]]
    )


def xavier_normal(trials: int, fan_out: int, fan_in: int, generators: list[torch.Generator]) -> Tensor:
    """N(0, 2 / (fan_in + fan_out)) per trial (Eq. S.18)."""
    std = math.sqrt(2.0 / (fan_in + fan_out))
    return torch.stack([torch.randn(fan_out, fan_in, generator=g) * std for g in generators[:trials]])


INITIALISERS = {"xavier_uniform": xavier_uniform, "xavier_normal": xavier_normal}


def init_weights(sizes: list[int], generators: list[torch.Generator]) -> list[Tensor]:
    """Fresh forward weights W_{l-1,l} (Xavier uniform), one set per trial/generator."""
    trials = len(generators)
    return [xavier_uniform(trials, n_out, n_in, generators) for n_in, n_out in zip(sizes, sizes[1:])]
