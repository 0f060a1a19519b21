"""The papers' literal formulation: one trial, dense terms, plain loops.

This is the independent second implementation that tests and the benchmark
compare the factorised, batched code against. It builds every term exactly as
written in Eqs. 14-23 — ``(y y^T) W`` for Oja, ``y y^T W e e^T`` for F^6 — and
is deliberately slow.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dense_terms(W: Tensor, y_pre: Tensor, y_post: Tensor, e_pre: Tensor, e_post: Tensor) -> list[Tensor]:
    """F^0..F^9 of one layer as dense matrices (Eqs. 14-23); vectors are 1-D."""
    col = lambda v: v.reshape(-1, 1)  # noqa: E731
    ones = torch.ones_like(y_post)
    return [
        -col(e_post) @ col(y_pre).T,
        -col(y_post) @ col(e_pre).T,
        -col(e_post) @ col(e_pre).T,
        -W,
        -col(ones) @ col(e_pre).T,
        -col(e_post) @ col(ones).T @ col(y_post) @ col(y_pre).T,
        -col(y_post) @ col(y_post).T @ W @ col(e_pre) @ col(e_pre).T,
        -col(e_post) @ col(y_post).T @ W @ col(e_pre) @ col(y_pre).T,
        -col(y_post) @ col(y_pre).T @ W.T @ col(e_post) @ col(e_pre).T,
        col(y_post) @ col(y_pre).T - (col(y_post) @ col(y_post).T) @ W,
    ]


def softplus(z: Tensor, beta: float) -> Tensor:
    return torch.log1p(torch.exp(beta * z)) / beta


def inner_step(
    weights: list[Tensor],
    feedback: list[Tensor],
    kind: str,
    theta: dict[int, Tensor] | list[dict[int, Tensor]],
    x: Tensor,
    label: int,
    beta: float,
) -> list[Tensor]:
    """One online step of Algorithm 1 for one trial, written out literally.

    ``theta`` maps term id to coefficient, shared by all layers, or is a list
    with one such map per layer.
    """
    L = len(weights)
    per_layer = theta if isinstance(theta, list) else [theta] * L
    ys, zs = [x], []
    for i, W in enumerate(weights):
        z = W @ ys[-1]
        zs.append(z)
        ys.append(torch.softmax(z, 0) if i == L - 1 else softplus(z, beta))
    onehot = torch.zeros_like(ys[-1])
    onehot[label] = 1
    es = [None] * (L + 1)
    es[L] = ys[-1] - onehot
    for l in range(L, 0, -1):
        if kind == "bp":
            B = weights[l - 1].T
            sent = B @ es[l]
        elif kind == "fa":
            sent = feedback[l - 1] @ es[l]
        else:
            sent = feedback[l - 1] @ es[L]
        es[l - 1] = sent * (1 - torch.exp(-beta * ys[l - 1]))
    new = []
    for l in range(1, L + 1):
        terms = dense_terms(weights[l - 1], ys[l - 1], ys[l], es[l - 1], es[l])
        update = sum(coef * terms[r] for r, coef in per_layer[l - 1].items())
        new.append(weights[l - 1] + update)
    return new


def episode(weights, feedback, kind, theta, x_train, y_train, x_query, y_query, beta):
    """Adapt on the stream (Algorithm 1 inner loop), return the query cross-entropy."""
    for x, label in zip(x_train, y_train):
        weights = inner_step(weights, feedback, kind, theta, x, int(label), beta)
    h = x_query
    for i, W in enumerate(weights):
        h = h @ W.T
        if i < len(weights) - 1:
            h = softplus(h, beta)
    return torch.nn.functional.cross_entropy(h, y_query), weights
