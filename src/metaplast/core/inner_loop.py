"""Algorithm 1's inner loop, readable: a learner adapts fresh weights online, one step per sample.

:func:`adapt` runs :meth:`metaplast.core.learner.Learner.step` under autograd, so the
meta-gradient (with respect to every meta-parameter in ``meta``) flows through the whole
unrolled loop — the general estimator. :mod:`metaplast.core.fused` computes the same gradient
with a hand-scheduled backward where it applies; :func:`inner_loop` picks one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

from torch import Tensor

from metaplast.core import fused
from metaplast.core.learner import Learner, State


def adapt(
    learner: Learner,
    state: State,
    meta: Mapping,
    x_train: Tensor,
    y_train: Tensor,
    batch: int = 1,
    truncate: int | None = None,
) -> State:
    """Train on the stream ``x_train (T, S, d)``, ``batch`` samples per step, under autograd.

    Differentiable in every tensor of ``meta`` and ``state`` through the whole unrolled loop;
    ``truncate = k`` cuts the gradient before the last k steps (truncated backpropagation).
    """
    coefficients = learner.layer_coefficients(meta["theta"])
    steps = math.ceil(x_train.shape[1] / batch)
    for index in range(steps):
        if truncate is not None and index == steps - truncate:
            state = state.detach()
        chunk = slice(index * batch, (index + 1) * batch)
        state = learner.step(state, meta, x_train[:, chunk], y_train[:, chunk], coefficients)
    return state


#: Meta-gradient estimators (``meta.gradient``): ``auto`` picks ``fused`` where it applies.
ESTIMATORS = ("auto", "autograd", "fused")


def inner_loop(
    learner: Learner,
    state: State,
    meta: Mapping,
    x_train: Tensor,
    y_train: Tensor,
    estimator: str = "auto",
    batch: int = 1,
    truncate: int | None = None,
    recompute_segment: int = fused.RECOMPUTE_SEGMENT,
    compile: bool = False,
) -> State:
    """Adapt with the chosen meta-gradient estimator; both give the same numbers (tested to 1e-10).
    ``compile`` compiles the fused estimator's step (``trainer.compile``)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"meta.gradient={estimator!r} is unknown; allowed: {', '.join(ESTIMATORS)}")
    why_not = fused.unsupported(learner, state, meta, truncate)
    if estimator == "fused" and why_not:
        raise ValueError(f"meta.gradient='fused' does not apply here ({why_not}); use autograd or auto")
    if estimator == "autograd" or why_not:
        if compile:
            reason = why_not or "meta.gradient=autograd"
            message = f"trainer.compile applies to the fused estimator only, not used here ({reason})"
            warnings.warn(message, stacklevel=2)
        return adapt(learner, state, meta, x_train, y_train, batch, truncate)
    return fused.adapt(learner, state, meta, x_train, y_train, batch, recompute_segment, compile)
