"""Feedback pathways: how the output error reaches the hidden layers (Eq. 3, Eq. 24, Oja paper Eq. 9).

A pathway makes the teaching signals ``e_0..e_L`` of one online step from one forward pass,
before any weight of that step changes. Feedback matrices are stored in the paper's
orientation: ``B_{ℓ,ℓ-1}`` has shape ``(trials, dim y_{ℓ-1}, dim y_ℓ)`` and sends ``e_ℓ`` to
layer ℓ-1; a direct pathway's ``B_{L,ℓ}`` has shape ``(trials, dim y_ℓ, dim y_L)``. A pathway
may change its matrices during the episode (:meth:`Pathway.update`: plastic feedback,
Kolen–Pollack) and may change the activations that the rule sees
(:meth:`Pathway.feedback_activations`). A new pathway is a subclass and one line in
:data:`PATHWAYS`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from metaplast.core.networks import INITIALISERS, MLP, Products
from metaplast.core.terms import FEEDBACK_TERMS


class Pathway:
    """Base pathway: sends ``e_ℓ`` down through its own matrices ``B_{ℓ,ℓ-1}`` (feedback alignment)."""

    #: sends from the output straight to every layer (DFA) instead of layer by layer
    direct = False
    #: has matrices of its own, drawn fresh each episode (or meta-learned, ``feedback.learn``)
    has_matrices = True
    #: changes its matrices within an episode (:meth:`update`)
    plastic = False
    #: coefficients of its own plasticity rule (ψ, meta-learned), ``FEEDBACK_TERMS`` ids
    rule_terms: tuple[int, ...] = ()

    def matrix_shapes(self, sizes) -> list[tuple[int, int]]:
        """Shapes of the matrices, without the trials dimension."""
        if self.direct:
            return [(n, sizes[-1]) for n in sizes[:-1]]
        return list(zip(sizes, sizes[1:]))

    def init_feedback(self, sizes, generators, init: str = "xavier_uniform") -> list[Tensor]:
        """Fresh random matrices for one episode (``init`` as the forward weights' schemes)."""
        if not self.has_matrices:
            return []
        if init not in INITIALISERS:
            raise ValueError(f"feedback init {init!r} is unknown; allowed: {', '.join(INITIALISERS)}")
        draw = INITIALISERS[init]
        return [draw(rows, cols, generators) for rows, cols in self.matrix_shapes(sizes)]

    def send(
        self, index: int, e: Tensor, weights, feedback, products: Products, exact: bool, meta=None
    ) -> Tensor:
        """``e B^T`` into layer ``index`` (``B`` = ``feedback[index]``); ``meta`` holds the
        meta-parameters (the pathway's own among them, :meth:`meta_parameters`)."""
        return products.send(index, e, feedback[index])

    def teaching_signals(
        self,
        network: MLP,
        ys: list[Tensor],
        zs: list[Tensor],
        output_error: Tensor,
        weights: list[Tensor],
        feedback: list[Tensor],
        products: Products | None = None,
        exact: bool = True,
        meta=None,
    ) -> list[Tensor]:
        """Errors ``[e_0..e_L]`` (Eq. 3) with the synthetic ``e_0`` of Eq. 24.

        ``output_error`` is ``e_L``; ``exact`` (BP only) differentiates through ``B = W^T``.
        """
        products = products or Products(weights)
        errors = [output_error]
        for layer in range(len(ys) - 1, 0, -1):  # produce e_{layer-1}
            signal = output_error if self.direct else errors[0]
            sent = self.send(layer - 1, signal, weights, feedback, products, exact, meta)
            z = zs[layer - 2] if layer >= 2 else ys[0]
            errors.insert(0, sent * network.slope(ys[layer - 1], z))
        return errors

    def meta_parameters(self, trials: int, sizes) -> dict[str, Tensor]:
        """Meta-parameters of the pathway's own, by name, with their starting values ``(trials, ...)``:
        learned by Adam like Θ (each its own group) and handed to the pathway in ``meta``."""
        return {}

    def feedback_activations(self, ys, zs, target, feedback, meta) -> list[Tensor] | None:
        """Activations after feedback, seen by the rule as postsynaptic (None: unchanged)."""
        return None

    def update(self, feedback, before, after, ys, es, psi) -> tuple[list[Tensor], list[Tensor]]:
        """The step's end: ``(weights, feedback)`` from the weights before and after the rule."""
        return after, feedback


class FeedbackAlignment(Pathway):
    """FA: fixed random ``B_{ℓ,ℓ-1}``, drawn fresh each episode (Lillicrap et al. 2016)."""


class DirectFeedbackAlignment(Pathway):
    """DFA: fixed random ``B_{L,ℓ}`` from the output to every layer (Nøkland 2016)."""

    direct = True


class Backprop(Pathway):
    """BP: ``B = W^T`` of the current weights; ``exact`` differentiates the meta-gradient through it."""

    has_matrices = False

    def send(self, index, e, weights, feedback, products, exact, meta=None):
        if exact:
            return products.backward(index, e)
        return products.send(index, e, weights[index].detach().transpose(-1, -2))


class SignSymmetric(Pathway):
    """Sign-symmetric feedback (Liao et al. 2016): ``B = c sign(W^T)`` of the current weights, with
    ``c = sqrt(6 / (fan_in + fan_out)) / 2``, the mean |W| of Xavier-uniform weights, so errors keep
    W^T's size (unscaled ±1 entries multiply them by ~16 per layer at the paper's widths and the
    inner loop diverges). sign has derivative 0 almost everywhere: the meta-gradient is exact."""

    has_matrices = False

    def send(self, index, e, weights, feedback, products, exact, meta=None):
        weight = weights[index].detach()
        scale = math.sqrt(6.0 / sum(weight.shape[-2:])) / 2
        return products.send(index, e, (weight.sign() * scale).transpose(-1, -2))


class KolenPollack(Pathway):
    """Kolen–Pollack (Akrout et al. 2019): ``B`` receives the update of ``W^T``, and both decay:
    ``W ← W + ΔW - κ W``, ``B ← B + ΔW^T - κ B`` (κ = ``decay``), so ``W - B^T`` shrinks by ``1 - κ``."""

    plastic = True

    def __init__(self, decay: float = 0.0):
        self.decay = decay

    def update(self, feedback, before, after, ys, es, psi):
        kappa = self.decay
        weights = [w1 - kappa * w0 for w0, w1 in zip(before, after)]
        feedback = [
            b * (1 - kappa) + (w1 - w0).transpose(-1, -2) for b, w0, w1 in zip(feedback, before, after)
        ]
        return weights, feedback


class PlasticFeedback(Pathway):
    """Plastic feedback (Oja paper Eq. 9): ``B_{ℓ,ℓ-1} ← B + Σ_k ψ_k G^k`` with meta-learned ψ
    (:data:`metaplast.core.terms.FEEDBACK_TERMS`: G^0 = -(y_ℓ e_{ℓ-1}^T)^T, G^1 = B)."""

    plastic = True
    rule_terms = tuple(FEEDBACK_TERMS)

    def update(self, feedback, before, after, ys, es, psi):
        new = []
        for index, b in enumerate(feedback):
            delta = sum(
                psi[:, k, None, None] * FEEDBACK_TERMS[k][0](b, ys[index + 1], es[index])
                for k in self.rule_terms
            )
            new.append(b + delta)
        return after, new


class FeedbackLocalPlasticity(Pathway):
    """FLP's feedback (Lindsey & Litwin-Kumar 2020, §3): matrices ``B_ℓ`` from the output straight to
    each hidden layer change its activations, ``y_ℓ ← (1 - β_ℓ) y_ℓ + β_ℓ ReLU(B_ℓ s - b_ℓ)``, and the
    output is clamped to the target; the rule (FLP's ``flp``, F^10) then sees the changed
    activations as postsynaptic. ``s`` is the target (one-hot) for a classifier and the error
    ``target - y_L`` for a regressor, the paper's choices. ``β_ℓ = sigmoid(β̃_ℓ)`` (in [0, 1], the
    paper's interpolation) and the biases ``b_ℓ`` are this pathway's meta-parameters (``flp_beta``
    holds β̃, starting at 0: β = 0.5; ``flp_bias`` the biases of all hidden layers, starting at 0);
    ``B`` is meta-learned with ``feedback.learn=true``. The teaching signals (used by the metrics
    only) are DFA's through the same B."""

    direct = True

    def meta_parameters(self, trials: int, sizes) -> dict[str, Tensor]:
        hidden = list(sizes[1:-1])
        return {"flp_beta": torch.zeros(trials, len(hidden)), "flp_bias": torch.zeros(trials, sum(hidden))}

    def feedback_activations(self, ys, zs, target, feedback, meta) -> list[Tensor]:
        out = ys[-1]
        if target.dtype in (torch.int64, torch.int32):
            clamp = F.one_hot(target, out.shape[-1]).to(out.dtype)
            signal = clamp
        else:
            clamp, signal = target, target - out
        beta = torch.sigmoid(meta["flp_beta"])
        biases = torch.split(meta["flp_bias"], [y.shape[-1] for y in ys[1:-1]], dim=1)
        post = [ys[0]]
        for layer, (y, bias) in enumerate(zip(ys[1:-1], biases), start=1):
            drive = torch.relu(signal @ feedback[layer].transpose(-1, -2) - bias[:, None, :])
            b = beta[:, layer - 1, None, None]
            post.append((1 - b) * y + b * drive)
        post.append(clamp)
        return post


#: name -> factory of the pathway (``feedback.kind``).
PATHWAYS = {
    "bp": Backprop,
    "fa": FeedbackAlignment,
    "dfa": DirectFeedbackAlignment,
    "sign": SignSymmetric,
    "kolen_pollack": KolenPollack,
    "plastic": PlasticFeedback,
    "flp": FeedbackLocalPlasticity,
}


def make_pathway(kind: str, **options) -> Pathway:
    """The pathway ``kind`` of :data:`PATHWAYS` (``decay`` for Kolen–Pollack)."""
    if kind not in PATHWAYS:
        raise ValueError(f"feedback kind {kind!r} is unknown; allowed: {', '.join(PATHWAYS)}")
    factory = PATHWAYS[kind]
    return factory(**options) if factory is KolenPollack else factory()
