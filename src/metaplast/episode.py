"""The differentiable inner loop of Algorithm 1 and the meta-loss (Eq. 6, Eq. S.16)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from metaplast.feedback import backward_matrices, teaching_signals
from metaplast.network import BETA, forward
from metaplast.rules import expand_theta, plasticity_update, resolve_rule

REGULARISERS = ("none", "l1", "l2")


@dataclass(frozen=True)
class Rule:
    """Which terms Θ holds (its columns) and which of them each layer uses."""

    terms: tuple[int, ...]
    layer_terms: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, spec, depth: int, per_layer: Sequence | None = None) -> Rule:
        """One rule shared by all ``depth`` layers, or one rule per layer (Table 1)."""
        if per_layer is None:
            terms = resolve_rule(spec)
            return cls(terms, (terms,) * depth)
        if len(per_layer) != depth:
            raise ValueError(
                f"rule.per_layer has {len(per_layer)} entries but the network has {depth} layers; "
                f"give one rule per layer"
            )
        layer_terms = tuple(resolve_rule(s) for s in per_layer)
        return cls(tuple(sorted(set().union(*layer_terms))), layer_terms)


def inner_loop(
    theta: Tensor,
    rule: Rule,
    weights: list[Tensor],
    feedback: list[Tensor],
    kind: str,
    x_train: Tensor,
    y_train: Tensor,
    beta: float = BETA,
    grad_through_b: bool = True,
) -> list[Tensor]:
    """Train fresh weights online on ``x_train (T, S, d)``, one sample per step (Algorithm 1).

    Errors of all layers come from one forward pass before any weight changes;
    every weight then takes ``W + Σ_r θ_r F^r``. Nothing is detached, so the
    result is differentiable in Θ through the whole unrolled loop.
    """
    thetas = [expand_theta(theta, rule.terms, terms) for terms in rule.layer_terms]
    width = weights[-1].shape[1]
    for step in range(x_train.shape[1]):
        ys, zs = forward(weights, x_train[:, step : step + 1], beta)
        output_error = ys[-1] - F.one_hot(y_train[:, step : step + 1], width).to(ys[-1].dtype)
        matrices = backward_matrices(kind, weights, feedback, grad_through_b)
        es = teaching_signals(kind, matrices, ys, output_error, beta)
        weights = [
            plasticity_update(w, th, terms, ys[i], ys[i + 1], es[i], es[i + 1], zs[i])
            for i, (w, th, terms) in enumerate(zip(weights, thetas, rule.layer_terms))
        ]
    return weights


def query_loss(weights: list[Tensor], x_query: Tensor, y_query: Tensor, beta: float = BETA) -> Tensor:
    """Per-trial cross-entropy of the adapted network on the query set, shape ``(T,)``."""
    _, zs = forward(weights, x_query, beta)
    logits = zs[-1]
    losses = F.cross_entropy(logits.flatten(0, 1), y_query.flatten(), reduction="none")
    return losses.view(y_query.shape).mean(1)


def regulariser(theta: Tensor, kind: str) -> Tensor:
    """R(Θ) per trial: ‖Θ‖₁ (Eq. 6), ‖Θ‖₂ — the norm, not its square (Eq. S.16) — or 0."""
    if kind == "l1":
        return theta.abs().sum(1)
    if kind == "l2":
        return theta.norm(dim=1)
    if kind == "none":
        return theta.new_zeros(theta.shape[0])
    raise ValueError(f"regulariser {kind!r} is unknown; allowed: {', '.join(REGULARISERS)}")
