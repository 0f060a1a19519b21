"""What is measured on the query batch after adaptation (DESIGN §3; Eqs. 11-12)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metaplast.core.learner import Learner, State
from metaplast.core.pathways import Backprop


def vector_angle(u: Tensor, v: Tensor) -> Tensor:
    """Angle in degrees between the last-dimension vectors of ``u`` and ``v``."""
    cos = F.cosine_similarity(u, v, dim=-1, eps=1e-30)
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


@torch.no_grad()
def episode_metrics(
    learner: Learner, state: State, x_query: Tensor, y_query: Tensor, meta=None
) -> dict[str, Tensor]:
    """Per-trial query metrics of adapted weights.

    - ``loss`` (T,), ``acc`` (T,): loss and (for classification) accuracy;
    - ``angle`` (T, L): α_ℓ for ℓ = 0..L-1, the angle between the query mean of e_ℓ under the
      run's feedback and the mean of e_ℓ that BP would send with the same adapted W;
    - ``orth`` (T, L): E_W,ℓ = Σ_query ‖z_ℓ - W W^T y_ℓ‖² for ℓ = 1..L (Eqs. 11-12).
    """
    net, weights = learner.network, state.weights
    ys, zs = net.forward(weights, x_query, state.biases)
    output_error = net.output_error(zs[-1], ys[-1], y_query)
    run = learner.pathway.teaching_signals(net, ys, zs, output_error, weights, state.feedback, meta=meta)
    bp = Backprop().teaching_signals(net, ys, zs, output_error, weights, [])
    angle = torch.stack([vector_angle(a.mean(1), b.mean(1)) for a, b in zip(run[:-1], bp[:-1])], dim=1)
    orth = torch.stack(
        [(z - (y @ w) @ w.transpose(-1, -2)).pow(2).sum((1, 2)) for w, z, y in zip(weights, zs, ys[1:])],
        dim=1,
    )
    metrics = {"loss": net.sample_loss(zs[-1], y_query).mean(1), "angle": angle, "orth": orth}
    if net.loss == "cross_entropy":
        metrics["acc"] = (zs[-1].argmax(-1) == y_query).to(zs[-1].dtype).mean(1)
    return metrics
