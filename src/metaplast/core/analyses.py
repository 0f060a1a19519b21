"""Per-layer analyses of a network during online training (Oja paper, Figs. 2-4, 6 and S1).

All functions take trial-batched tensors (``(T, B, dim)`` activations, ``(T, n, m)`` weights) and
return per-trial values, so they run on every trial at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metaplast.core.learner import Learner, State
from metaplast.core.networks import ACTIVATIONS, MLP


def activation_norms(ys: list[Tensor]) -> Tensor:
    """Mean ``‖y_ℓ‖`` over the batch for ℓ = 0..L, shape ``(T, L + 1)`` (Fig. 6)."""
    return torch.stack([y.norm(dim=-1).mean(1) for y in ys], dim=1)


def reconstruction_error(network: MLP, weights: list[Tensor], ys: list[Tensor]) -> Tensor:
    """The Oja paper's Eq. 2 for each layer ℓ = 1..L-1 (hidden layers), shape ``(T, L - 1)``:
    ``(1/B) Σ_i ‖y_{ℓ-1} - W^T σ(W y_{ℓ-1})‖²`` with σ the hidden activation.

    Not metaplast's E_W,ℓ (Eqs. 11-12 of the 2023 paper, :mod:`metaplast.core.metrics`), which
    compares ``z_ℓ`` with ``W W^T y_ℓ``.
    """
    fn = ACTIVATIONS[network.activation].fn
    errors = []
    for weight, y_pre in zip(weights[:-1], ys[:-2]):
        code = fn(y_pre @ weight.transpose(-1, -2), network.beta)
        errors.append((y_pre - code @ weight).pow(2).sum(-1).mean(1))
    return torch.stack(errors, dim=1)


def explained_variance(activations: Tensor) -> Tensor:
    """Cumulative fraction of variance explained by the first k principal components of each
    trial's activations ``(T, N, dim)``, k = 1..min(N, dim): shape ``(T, min(N, dim))`` (Fig. 3).

    The singular values of the centred activations give the component variances.
    """
    centred = activations - activations.mean(1, keepdim=True)
    variances = torch.linalg.svdvals(centred).pow(2)
    return variances.cumsum(-1) / variances.sum(-1, keepdim=True).clamp_min(torch.finfo(variances.dtype).tiny)


def reconstruct_input(weights: list[Tensor], y: Tensor, layer: int) -> Tensor:
    """The input reconstructed from hidden activations ``y_ℓ`` (layer ``ℓ = layer``) through the
    transposed forward weights, layer by layer: ``x̂ = W_1^T W_2^T … W_ℓ^T y_ℓ`` (Fig. 4).

    The paper does not state its decoder; this is the linear one that Eq. 2 trains each layer
    to be (``y_{ℓ-1} ≈ W_ℓ^T σ(W_ℓ y_{ℓ-1}) = W_ℓ^T y_ℓ``).
    """
    for weight in reversed(weights[:layer]):
        y = y @ weight
    return y


def update_norms(learner: Learner, state: State, meta, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Frobenius norms of one online step's update ``ΔW_ℓ`` of the learner's rule, and of
    backprop's step ``-θ_0 ∂L/∂W_ℓ`` on the same sample (θ_0: the rule's F^0 coefficient, shared
    Θ), each ``(T, L)`` (Oja paper, Supp. Fig. S1)."""
    with torch.no_grad():
        after = learner.step(state, meta, x, target)
    rule = torch.stack([(a - b).flatten(1).norm(dim=1) for a, b in zip(after.weights, state.weights)], 1)
    with torch.enable_grad():
        leaves = [w.detach().requires_grad_() for w in state.weights]
        _, zs = learner.network.forward(leaves, x, state.biases)
        loss = learner.network.sample_loss(zs[-1], target).sum()
        grads = torch.autograd.grad(loss, leaves)
    theta = meta["theta"]
    theta_0 = (
        theta[:, learner.rule.terms.index(0)].abs() if 0 in learner.rule.terms else torch.ones(len(theta))
    )
    backprop = torch.stack([g.flatten(1).norm(dim=1) for g in grads], 1) * theta_0[:, None].to(rule)
    return rule, backprop
