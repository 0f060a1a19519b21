"""What is measured on the query batch after adaptation (DESIGN §3; Eqs. 11-12)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metaplast.feedback import backward_matrices, teaching_signals
from metaplast.network import BETA, forward


def vector_angle(u: Tensor, v: Tensor) -> Tensor:
    """Angle in degrees between the last-dimension vectors of ``u`` and ``v``."""
    cos = F.cosine_similarity(u, v, dim=-1, eps=1e-30)
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


@torch.no_grad()
def episode_metrics(
    weights: list[Tensor],
    feedback: list[Tensor],
    kind: str,
    x_query: Tensor,
    y_query: Tensor,
    beta: float = BETA,
) -> dict[str, Tensor]:
    """Per-trial query metrics of adapted weights.

    - ``loss`` (T,), ``acc`` (T,): cross-entropy and accuracy;
    - ``angle`` (T, L): α_l for l = 0..L-1, the angle between the query mean of
      e_l under the run's feedback and the mean of e_l that BP would send;
    - ``orth`` (T, L): E_W,l = Σ_query ‖z_l - W W^T y_l‖² for l = 1..L (Eqs. 11-12).
    """
    ys, zs = forward(weights, x_query, beta)
    width = weights[-1].shape[1]
    output_error = ys[-1] - F.one_hot(y_query, width).to(ys[-1].dtype)
    errors_run = teaching_signals(kind, backward_matrices(kind, weights, feedback), ys, output_error, beta)
    errors_bp = teaching_signals("bp", backward_matrices("bp", weights, []), ys, output_error, beta)
    angle = torch.stack(
        [vector_angle(run.mean(1), bp.mean(1)) for run, bp in zip(errors_run[:-1], errors_bp[:-1])], dim=1
    )
    orth = torch.stack(
        [(z - (y @ w) @ w.transpose(-1, -2)).pow(2).sum((1, 2)) for w, z, y in zip(weights, zs, ys[1:])],
        dim=1,
    )
    logits = zs[-1]
    loss = (
        F.cross_entropy(logits.flatten(0, 1), y_query.flatten(), reduction="none").view(y_query.shape).mean(1)
    )
    acc = (logits.argmax(-1) == y_query).to(logits.dtype).mean(1)
    return {"loss": loss, "acc": acc, "angle": angle, "orth": orth}
