"""The papers' literal formulation: one trial, dense terms, plain loops.

This is the independent second implementation that the tests and the benchmark
(:mod:`metaplast.bench`) compare the factorised, batched code against. It
mirrors the original formulation: one trial at a time, every term built as
the dense matrix written in Eqs. 14-23 — ``(y y^T) W`` for Oja,
``y y^T W e e^T`` for F^6 — and plain autograd through the unrolled loop,
every ``W`` of it kept alive. It is deliberately slow.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dense_term(r: int, W: Tensor, y_pre: Tensor, y_post: Tensor, e_pre: Tensor, e_post: Tensor) -> Tensor:
    """F^r of one layer as a dense matrix (Eqs. 14-23), evaluated left to right; vectors are 1-D."""
    col = lambda v: v.reshape(-1, 1)  # noqa: E731
    if r == 0:
        return -col(e_post) @ col(y_pre).T
    if r == 1:
        return -col(y_post) @ col(e_pre).T
    if r == 2:
        return -col(e_post) @ col(e_pre).T
    if r == 3:
        return -W
    if r == 4:
        return -col(torch.ones_like(y_post)) @ col(e_pre).T
    if r == 5:
        return -col(e_post) @ col(torch.ones_like(y_post)).T @ col(y_post) @ col(y_pre).T
    if r == 6:
        return -col(y_post) @ col(y_post).T @ W @ col(e_pre) @ col(e_pre).T
    if r == 7:
        return -col(e_post) @ col(y_post).T @ W @ col(e_pre) @ col(y_pre).T
    if r == 8:
        return -col(y_post) @ col(y_pre).T @ W.T @ col(e_post) @ col(e_pre).T
    if r == 9:
        return col(y_post) @ col(y_pre).T - (col(y_post) @ col(y_post).T) @ W
    raise ValueError(f"term id {r!r} is unknown; allowed: 0..9")


def dense_terms(W: Tensor, y_pre: Tensor, y_post: Tensor, e_pre: Tensor, e_post: Tensor) -> list[Tensor]:
    """F^0..F^9 of one layer as dense matrices (Eqs. 14-23); vectors are 1-D."""
    return [dense_term(r, W, y_pre, y_post, e_pre, e_post) for r in range(10)]


def softplus(z: Tensor, beta: float) -> Tensor:
    """log(1 + exp(βz)) / β (Eq. 13) as max(z, 0) + log(1 + exp(-β|z|)) / β, so exp cannot overflow."""
    return torch.clamp(z, min=0) + torch.log1p(torch.exp(-beta * z.abs())) / beta


def inner_step(
    weights: list[Tensor],
    feedback: list[Tensor],
    kind: str,
    theta: dict[int, Tensor] | list[dict[int, Tensor]],
    x: Tensor,
    label: int,
    beta: float,
    grad_through_b: bool = True,
) -> list[Tensor]:
    """One online step of Algorithm 1 for one trial, written out literally.

    ``theta`` maps term id to coefficient, shared by all layers, or is a list
    with one such map per layer. Only the terms it names are built.
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
            B = (weights[l - 1] if grad_through_b else weights[l - 1].detach()).T
            sent = B @ es[l]
        elif kind == "fa":
            sent = feedback[l - 1] @ es[l]
        else:
            sent = feedback[l - 1] @ es[L]
        es[l - 1] = sent * (1 - torch.exp(-beta * ys[l - 1]))
    new = []
    for l in range(1, L + 1):
        args = (weights[l - 1], ys[l - 1], ys[l], es[l - 1], es[l])
        update = sum(coef * dense_term(r, *args) for r, coef in per_layer[l - 1].items())
        new.append(weights[l - 1] + update)
    return new


def episode(weights, feedback, kind, theta, x_train, y_train, x_query, y_query, beta, grad_through_b=True):
    """Adapt on the stream (Algorithm 1 inner loop), return the query cross-entropy and adapted weights."""
    for x, label in zip(x_train, y_train):
        weights = inner_step(weights, feedback, kind, theta, x, int(label), beta, grad_through_b)
    h = x_query
    for i, W in enumerate(weights):
        h = h @ W.T
        if i < len(weights) - 1:
            h = softplus(h, beta)
    return torch.nn.functional.cross_entropy(h, y_query), weights


def layer_coefficients(theta_row: Tensor, terms, layer_terms) -> list[dict[int, Tensor]]:
    """Per-layer ``{term id: θ_r}`` maps of one trial's row of Θ (columns ordered as ``terms``)."""
    return [{r: theta_row[terms.index(r)] for r in layer} for layer in layer_terms]
