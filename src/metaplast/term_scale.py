"""Per-term meta-step scaling, ``rule.term_scale``: Adam on ``s_r θ_r``, so term r moves by about lr / s_r.

The paper's plain Adam (``term_scale=null``) takes sign-like first steps of the same size on every
θ_r, although the terms F^r differ in size by up to two orders of magnitude (DESIGN §8: F^5 is
F^0 scaled by Σ y_ℓ ≈ 45); a step of 1e-3 on θ_5 already makes the inner loop diverge. Adam on
``φ_r = s_r θ_r`` (its moments live in φ-space) is plain Adam with a per-term step lr / s_r,
while Θ, the regulariser and every log stay in the paper's units. ``s_r = 1`` for every r is
plain Adam bit for bit. The scales are either given per term id or measured (``auto``) by
:func:`calibrate`: the size of each term relative to F^0 along the inner loops of a few
calibration episodes, with the run's initial Θ.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from metaplast.data.sampler import TaskSampler, stack_tasks, stream_seed, trial_generators
from metaplast.episode import Rule
from metaplast.feedback import backward_matrices, init_feedback, teaching_signals
from metaplast.network import forward, init_weights
from metaplast.rules import TERM_IDS, expand_theta, plasticity_update, term_norms

#: The quantile over all calibration steps of ``‖F^r‖ / ‖F^0‖`` that sets ``s_r`` (then the
#: maximum over layers, clamped at 1): high enough to see the late growth of a term.
QUANTILE = 0.9
CALIBRATION_EPISODES = 3
CALIBRATION_TRIALS = 5


def check_spec(spec) -> None:
    """``null``, ``auto`` or a mapping ``{term id: finite s > 0}``; raises ValueError naming the value."""
    if spec is None or spec == "auto":
        return
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{spec!r} is not allowed; allowed: null (plain Adam), auto (measured), "
            "or a mapping term id -> scale, e.g. {5: 45, 9: 25}"
        )
    for key, value in spec.items():
        try:
            r = int(key)
        except (TypeError, ValueError):
            r = None
        if r not in TERM_IDS:
            raise ValueError(f"{{{key!r}: {value!r}}}: {key!r} is not a term id; allowed: 0..9")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"{{{key!r}: {value!r}}}: the scale must be a finite number > 0")


def fixed_scales(spec: Mapping, terms) -> list[float]:
    """One scale per column of Θ (the rule's terms) from ``{term id: s}``; unnamed terms get 1."""
    given = {int(r): float(s) for r, s in spec.items()}
    return [given.get(r, 1.0) for r in terms]


@torch.no_grad()
def term_ratios(
    theta: Tensor,
    rule: Rule,
    weights: list[Tensor],
    feedback: list[Tensor],
    kind: str,
    x_train: Tensor,
    y_train: Tensor,
    beta: float,
) -> Tensor:
    """``‖F^r_ℓ‖ / ‖F^0_ℓ‖`` at every online step of the inner loop, shape ``(steps, T, L, 10)``.

    The loop is the one of :func:`metaplast.episode.inner_loop` (errors of all layers from one
    forward pass, then ``W + Σ_r θ_r F^r`` in every layer), with ``theta (T, R)``.
    """
    thetas = [expand_theta(theta, rule.terms, terms) for terms in rule.layer_terms]
    ratios = []
    for step in range(x_train.shape[1]):
        ys, zs = forward(weights, x_train[:, step : step + 1], beta)
        output_error = ys[-1] - F.one_hot(y_train[:, step : step + 1], ys[-1].shape[-1]).to(ys[-1].dtype)
        es = teaching_signals(kind, backward_matrices(kind, weights, feedback), ys, output_error, beta)
        norms = torch.stack(
            [term_norms(w, ys[i], ys[i + 1], es[i], es[i + 1], zs[i]) for i, w in enumerate(weights)], 1
        )
        ratios.append(norms / norms[..., :1])
        weights = [
            plasticity_update(w, th, terms, ys[i], ys[i + 1], es[i], es[i + 1], zs[i])
            for i, (w, th, terms) in enumerate(zip(weights, thetas, rule.layer_terms))
        ]
    return torch.stack(ratios)


def scales_from_ratios(ratios: Tensor, rule: Rule, quantile: float = QUANTILE) -> list[float]:
    """``s_r``: the ``quantile`` over steps and trials of each layer's ratio, the maximum over the
    layers whose rule has term r, clamped at 1 (no term's step is enlarged); one per column of Θ."""
    ratios = ratios.flatten(0, 1).double()  # (steps * T, L, 10)
    finite = ratios.masked_fill(~ratios.isfinite(), float("nan"))  # a step with F^0 = 0 says nothing
    per_layer = torch.nanquantile(finite, quantile, dim=0)  # (L, 10)
    scales = []
    for r in rule.terms:
        layers = [i for i, terms in enumerate(rule.layer_terms) if r in terms]
        scales.append(max(1.0, float(per_layer[layers, r].max())))
    return scales


def calibrate(
    images: Tensor,
    labels: Tensor,
    sizes: list[int],
    rule: Rule,
    theta_row: Tensor,
    kind: str,
    feedback_init: str,
    beta: float,
    M: int,
    K: int,
    Q: int,
    sampling: str = "fresh",
    remap_labels: bool = False,
    episodes: int = CALIBRATION_EPISODES,
    trials: int = CALIBRATION_TRIALS,
) -> list[float]:
    """Measured scales (``term_scale=auto``): :func:`term_ratios` over ``episodes`` fresh tasks of
    ``trials`` trials with the initial Θ ``theta_row``, then :func:`scales_from_ratios`.

    The calibration episodes draw from their own random stream (stream 2 of seed 0), so they
    change neither the run's tasks nor its weights, and the scales do not depend on the run's seed.
    """
    ids = range(trials)
    samplers = [
        TaskSampler(images, labels, M, K, Q, stream_seed(0, t, 2), remap_labels, sampling) for t in ids
    ]
    generators = trial_generators(0, ids, 3)
    theta = theta_row.to(torch.float32).expand(trials, -1)
    ratios = []
    for _ in range(episodes):
        task = stack_tasks([s.sample() for s in samplers])
        weights = init_weights(sizes, generators)
        feedback = init_feedback(kind, sizes, generators, feedback_init)
        ratios.append(term_ratios(theta, rule, weights, feedback, kind, task.x_train, task.y_train, beta))
    return scales_from_ratios(torch.cat(ratios), rule)
