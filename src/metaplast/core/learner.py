"""The learner of Algorithm 1's inner loop: a network, a feedback pathway and a plasticity rule.

One :meth:`Learner.step` is: forward pass, teaching signals of every layer from that one pass
(before any weight changes), then ``W ← W + Σ_r θ_r F^r`` in every layer and the pathway's own
update of its matrices. ``meta`` maps names to tensors (see :mod:`metaplast.core.meta`):
``theta`` (always), ``psi`` (a plastic pathway's coefficients), ``feedback`` (meta-learned
initial matrices) and ``init`` (meta-learned initial weights).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from metaplast.core.networks import MLP, Products
from metaplast.core.pathways import Pathway
from metaplast.core.rules import Rule
from metaplast.core.terms import (
    TERMS,
    LayerSignals,
    apply_update,
    dense_update,
    update_factors,
    uses_wt_y,
)

#: How Θ is shared (``rule.share``): one row per trial for all layers (the 2023 paper), one
#: per layer, or one per synapse (as FLP's α).
SHARING = ("all", "layer", "synapse")


@dataclass
class State:
    """What changes during an episode: forward weights, the pathway's matrices, biases (fixed)."""

    weights: list[Tensor]
    feedback: list[Tensor] = field(default_factory=list)
    biases: list[Tensor] = field(default_factory=list)

    def detach(self) -> State:
        return State(*([t.detach() for t in part] for part in (self.weights, self.feedback, self.biases)))


def expand_theta(theta: Tensor, terms, layer_terms) -> Tensor:
    """Dense ``(trials, 10)`` coefficients of one layer: Θ's entries for ``layer_terms``, zero elsewhere."""
    dense = theta.new_zeros(theta.shape[0], max(TERMS) + 1)
    columns = [terms.index(r) for r in layer_terms]
    index = torch.tensor(layer_terms, dtype=torch.long, device=theta.device)  # may be empty: a frozen layer
    return dense.index_copy(1, index, theta[:, columns])


@dataclass(frozen=True)
class Learner:
    """The 2023 paper's learner, generalised: an :class:`MLP`, a :class:`Pathway`, a :class:`Rule`.

    ``exact_bp`` (BP only) differentiates the meta-gradient through ``B = W^T``; ``share`` is
    one of :data:`SHARING`.
    """

    network: MLP
    pathway: Pathway
    rule: Rule
    exact_bp: bool = True
    share: str = "all"

    def __post_init__(self):
        if self.share not in SHARING:
            raise ValueError(f"rule.share={self.share!r} is unknown; allowed: {', '.join(SHARING)}")
        if len(self.rule.layer_terms) != self.network.depth:
            raise ValueError(
                f"the rule has {len(self.rule.layer_terms)} layers, the network {self.network.depth}"
            )

    # ---------------------------------------------------------------- meta-parameters
    def theta_shape(self, trials: int) -> list[tuple[int, ...]]:
        """Shapes of Θ: ``[(T, R)]``, ``[(T, L, R)]`` or per synapse ``[(T, n_ℓ, m_ℓ, R) per layer]``."""
        R = len(self.rule.terms)
        if self.share == "all":
            return [(trials, R)]
        if self.share == "layer":
            return [(trials, self.network.depth, R)]
        sizes = self.network.sizes
        return [(trials, n, m, R) for m, n in zip(sizes, sizes[1:])]

    def layer_coefficients(self, theta) -> list:
        """Per layer: dense ``(T, 10)`` coefficients, or for per-synapse Θ ``{r: (T, n, m)}``."""
        rule = self.rule
        if self.share == "all":
            theta = theta[0] if isinstance(theta, (list, tuple)) else theta
            return [expand_theta(theta, rule.terms, terms) for terms in rule.layer_terms]
        if self.share == "layer":
            theta = theta[0] if isinstance(theta, (list, tuple)) else theta
            return [expand_theta(theta[:, i], rule.terms, terms) for i, terms in enumerate(rule.layer_terms)]
        return [
            {r: th[..., rule.terms.index(r)] for r in terms} for th, terms in zip(theta, rule.layer_terms)
        ]

    # ---------------------------------------------------------------- the episode
    def init_state(
        self, generators, feedback_init: str = "xavier_uniform", meta: Mapping | None = None, like=None
    ) -> State:
        """Fresh weights and matrices (cast to the dtype and device of ``like``); meta-learned ones
        (``meta['init']``, ``meta['feedback']``) replace them. The random draws are the same
        whether or not some are replaced, so every trial's streams stay the same."""
        meta = meta or {}
        cast = (lambda t: t.to(like)) if like is not None else (lambda t: t)
        weights = [cast(w) for w in self.network.init_weights(generators)]
        feedback = [
            cast(b) for b in self.pathway.init_feedback(self.network.sizes, generators, feedback_init)
        ]
        for index, learned in (meta.get("init") or {}).items():
            weights[int(index)] = learned
        if meta.get("feedback") is not None:
            feedback = list(meta["feedback"])
        if meta.get("bias") is not None:
            return State(weights, feedback, list(meta["bias"]))
        return State(weights, feedback, [cast(b) for b in self.network.init_biases(len(generators))])

    def signals(self, state: State, meta: Mapping, x: Tensor, target: Tensor, products: Products):
        """Forward pass and teaching signals of one step: per layer the :class:`LayerSignals`, and ``es``."""
        net, pathway = self.network, self.pathway
        ys, zs = net.forward(state.weights, x, state.biases, products.forward)
        output_error = net.output_error(zs[-1], ys[-1], target)
        es = pathway.teaching_signals(
            net, ys, zs, output_error, state.weights, state.feedback, products, self.exact_bp, meta
        )
        post = pathway.feedback_activations(ys, zs, target, state.feedback, meta) or ys
        layers = []
        for i, terms in enumerate(self.rule.layer_terms):
            wt_y = products.wt_y(i, post[i + 1]) if uses_wt_y(terms) else None
            layers.append(LayerSignals(ys[i], post[i + 1], es[i], es[i + 1], zs[i], wt_y))
        return layers, ys, es

    def step_factors(self, state, meta, coefficients, x, target, products):
        """One step up to the update: per layer ``(left, right, decay)`` of :func:`update_factors`."""
        layers, ys, es = self.signals(state, meta, x, target, products)
        factors = [
            update_factors(c, terms, s) for c, terms, s in zip(coefficients, self.rule.layer_terms, layers)
        ]
        return factors, ys, es

    def step(self, state: State, meta: Mapping, x: Tensor, target: Tensor, coefficients=None) -> State:
        """One online step of Algorithm 1 (all trials at once)."""
        coefficients = coefficients or self.layer_coefficients(meta["theta"])
        products = Products(state.weights)
        if self.share == "synapse":
            layers, ys, es = self.signals(state, meta, x, target, products)
            after = [w + dense_update(c, w, s) for w, c, s in zip(state.weights, coefficients, layers)]
        else:
            factors, ys, es = self.step_factors(state, meta, coefficients, x, target, products)
            after = [apply_update(w, *f) for w, f in zip(state.weights, factors)]
        weights, feedback = self.pathway.update(state.feedback, state.weights, after, ys, es, meta.get("psi"))
        return replace(state, weights=weights, feedback=feedback)

    def query_loss(self, state: State, x: Tensor, target: Tensor) -> Tensor:
        """Per-trial loss of the adapted network on a query batch, shape ``(T,)`` (the meta-loss)."""
        _, zs = self.network.forward(state.weights, x, state.biases)
        return self.network.sample_loss(zs[-1], target).mean(1)
