"""A vanilla recurrent network trained online by BPTT or BPTT+Oja (Oja paper, Fig. 7, Eqs. 4-6).

``z_{t+1} = W_h σ(z_t) + W_x x_{t+1}`` (z_0 = 0), readout ``y_T = W_o σ(z_T)`` from the last state,
softmax cross-entropy. The delayed-memory task is built into the network's input: an image is
shown for ``show`` steps, then blank inputs until step ``length``, and the label is asked at the
end. One online step learns from one sequence:

- BPTT (Eqs. 4-5, with Eq. 4's sign slip corrected so that the step is ``-θ_1`` × the gradient):
  ``e_T = ∂L/∂z_T``, ``e_t = (W_h^T e_{t+1}) ⊙ σ'(z_t)``, ``ΔW_h = -θ_1 Σ_{t=1}^{T-1} e_{t+1} σ(z_t)^T``,
  ``ΔW_x = -θ_1 Σ_t e_t x_t^T``, ``ΔW_o = -θ_1 (ŷ - onehot) σ(z_T)^T``;
- BPTT+Oja adds to W_h Oja's subspace rule for the map ``z_t ↦ W_h σ(z_t)`` (from Eq. 6's
  criterion ``Σ_t ‖z_t - W_h^T W_h σ(z_t)‖²``, output ``u_t = W_h σ(z_t)``, input ``z_t``):
  ``ΔW_h += θ_2 Σ_{t=1}^{T-1} (u_t z_t^T - u_t u_t^T W_h)
  = θ_2 Σ_t (W_h σ(z_t) z_t^T - W_h σ(z_t) σ(z_t)^T W_h^T W_h)``, with ``z_t`` taken *before*
  the nonlinearity, as the paper's combined update writes it.

The coefficients are Θ's columns of the rule's terms: term 0 (F^0, the gradient step) is θ_1,
term 9 (F^9, Oja) is θ_2 — rule ``f0`` is BPTT, rule ``oja`` is BPTT+Oja.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from metaplast.core.learner import State
from metaplast.core.networks import ACTIVATIONS, BETA, INITIALISERS
from metaplast.core.rules import Rule

#: The rules an RNN learner takes: BPTT (term 0) and BPTT+Oja (terms 0 and 9).
RECURRENT_TERMS = ((0,), (0, 9))


@dataclass(frozen=True)
class RNN:
    """``n_in → n_hidden (recurrent) → n_out``; ``show`` steps of input, then blanks to ``length``."""

    n_in: int
    n_hidden: int
    n_out: int
    show: int = 5
    length: int = 50
    activation: str = "softplus"
    beta: float = BETA
    init: str = "xavier_uniform"
    init_std: float | None = None

    def __post_init__(self):
        if not 1 <= self.show <= self.length:
            raise ValueError(f"rnn show={self.show}, length={self.length}: allowed 1 <= show <= length")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"model.activation={self.activation!r} is unknown; allowed: {', '.join(ACTIVATIONS)}"
            )

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.n_in, self.n_hidden, self.n_out)

    def init_weights(self, generators) -> list[Tensor]:
        """``[W_x (T, h, in), W_h (T, h, h), W_o (T, out, h)]``."""
        draw = INITIALISERS[self.init]
        shapes = ((self.n_hidden, self.n_in), (self.n_hidden, self.n_hidden), (self.n_out, self.n_hidden))
        return [draw(rows, cols, generators, self.init_std) for rows, cols in shapes]

    def inputs(self, x: Tensor) -> list[Tensor]:
        """The sequence of one image batch ``x (T, B, in)``: x for ``show`` steps, then zeros."""
        blank = torch.zeros_like(x)
        return [x if t < self.show else blank for t in range(self.length)]

    def states(self, weights: list[Tensor], x: Tensor) -> list[Tensor]:
        """``[z_1 .. z_T]`` (each ``(T, B, h)``)."""
        w_x, w_h, _ = weights
        fn = ACTIVATIONS[self.activation].fn
        zs = []
        for step, x_t in enumerate(self.inputs(x)):
            drive = x_t @ w_x.transpose(-1, -2)
            zs.append(drive if step == 0 else fn(zs[-1], self.beta) @ w_h.transpose(-1, -2) + drive)
        return zs

    def logits(self, weights: list[Tensor], x: Tensor) -> Tensor:
        z_last = self.states(weights, x)[-1]
        return ACTIVATIONS[self.activation].fn(z_last, self.beta) @ weights[2].transpose(-1, -2)


@dataclass(frozen=True)
class RecurrentLearner:
    """The :class:`RNN` trained online by BPTT (rule ``f0``) or BPTT+Oja (rule ``oja``)."""

    network: RNN
    rule: Rule = field(default_factory=lambda: Rule.build("f0", 1))
    share: str = "all"

    def __post_init__(self):
        if self.rule.terms not in RECURRENT_TERMS:
            terms = list(self.rule.terms)
            raise ValueError(
                f"the recurrent network takes rule f0 (BPTT) or oja (BPTT+Oja), got terms {terms}"
            )

    def theta_shape(self, trials: int) -> list[tuple[int, ...]]:
        return [(trials, len(self.rule.terms))]

    def layer_coefficients(self, theta):
        return theta

    def init_state(self, generators, feedback_init: str = "xavier_uniform", meta=None, like=None) -> State:
        weights = self.network.init_weights(generators)
        return State([w.to(like) if like is not None else w for w in weights])

    def step(self, state: State, meta, x: Tensor, target: Tensor, coefficients=None) -> State:
        """One sequence (the image batch ``x``, its labels ``target``): the BPTT(+Oja) update."""
        net = self.network
        theta = meta["theta"]
        act = ACTIVATIONS[net.activation]
        w_x, w_h, w_o = state.weights
        xs = net.inputs(x)
        zs = net.states(state.weights, x)
        hs = [act.fn(z, net.beta) for z in zs]
        logits = hs[-1] @ w_o.transpose(-1, -2)
        e_y = torch.softmax(logits, -1) - F.one_hot(target, net.n_out).to(logits.dtype)
        errors = [(e_y @ w_o) * act.slope(hs[-1], zs[-1], net.beta)]  # e_T = ∂L/∂z_T
        for t in range(len(zs) - 2, -1, -1):  # e_t = (W_h^T e_{t+1}) ⊙ σ'(z_t)
            errors.insert(0, (errors[0] @ w_h) * act.slope(hs[t], zs[t], net.beta))
        outer = lambda a, b: a.transpose(-1, -2) @ b  # noqa: E731  Σ over the batch of a b^T
        theta_1 = theta[:, 0, None, None]
        d_h = -sum(outer(errors[t + 1], hs[t]) for t in range(len(zs) - 1))
        d_x = -sum(outer(errors[t], xs[t]) for t in range(len(zs)))
        d_o = -outer(e_y, hs[-1])
        new_h = w_h + theta_1 * d_h
        if 9 in self.rule.terms:  # Oja on z_t ↦ u_t = W_h σ(z_t): Σ_t (u_t z_t^T - u_t u_t^T W_h)
            us = [h @ w_h.transpose(-1, -2) for h in hs[:-1]]
            oja = sum(outer(u, z) - outer(u, u) @ w_h for u, z in zip(us, zs[:-1]))
            new_h = new_h + theta[:, 1, None, None] * oja
        return replace(state, weights=[w_x + theta_1 * d_x, new_h, w_o + theta_1 * d_o])

    def query_loss(self, state: State, x: Tensor, target: Tensor) -> Tensor:
        logits = self.network.logits(state.weights, x)
        return (
            F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
            .view(target.shape)
            .mean(1)
        )

    @torch.no_grad()
    def metrics(self, state: State, x: Tensor, target: Tensor, meta=None) -> dict[str, Tensor]:
        logits = self.network.logits(state.weights, x)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
        norms = torch.stack([z.norm(dim=-1).mean(1) for z in self.network.states(state.weights, x)], 1)
        return {
            "loss": loss.mean(1),
            "acc": (logits.argmax(-1) == target).to(logits.dtype).mean(1),
            "state_norm": norms,  # ‖z_t‖, t = 1..T
        }
