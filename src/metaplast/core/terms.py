"""The plasticity terms F^0..F^9 (Methods, Eqs. 14-23), factorised, and the feedback terms of Eq. 9.

Every forward term is a scaled outer product ``left^T right`` whose left vector is e_ℓ, y_ℓ or
1, plus or instead a decay of W (scalar, as F^3, or one factor per row, as FLP's local rule); so
the whole update of one layer is the rank-3 product ``e_ℓ a^T + y_ℓ b^T + 1 c^T - d ⊙ W``
(summed over the batch dimension, 1 online), and no ``(n × n)`` matrix is ever built. A term is
one entry of :data:`TERMS`: its left vector, functions giving its right vector and its decay. A
new term joins with one function and one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


class LayerSignals(NamedTuple):
    """What a term of layer ℓ may use, all ``(T, B, ·)``: presynaptic ``y_pre = y_{ℓ-1}``,
    ``e_pre = e_{ℓ-1}``, postsynaptic ``y_post = y_ℓ``, ``e_post = e_ℓ``, ``z_post = z_ℓ`` and
    ``wt_y = y_ℓ W`` (``(W^T y_ℓ)^T``, only computed when a term needs it)."""

    y_pre: Tensor
    y_post: Tensor
    e_pre: Tensor
    e_post: Tensor
    z_post: Tensor
    wt_y: Tensor | None = None


@dataclass(frozen=True)
class Term:
    """``F = left^T right + decay ⊙ W``: ``left`` one of ``e`` (e_ℓ), ``y`` (y_ℓ), ``1`` (or None: no
    outer product); ``decay(signals)`` a factor of W (or None), a number or ``(T, 1, 1)`` for all
    of W, ``(T, n, 1)`` per row (per postsynaptic neuron)."""

    left: str | None
    right: Callable[[LayerSignals], Tensor] | None
    formula: str
    needs_wt_y: bool = False
    decay: Callable[[LayerSignals], Tensor | float] | None = None


def _y_w_e(s: LayerSignals) -> Tensor:
    return (s.wt_y * s.e_pre).sum(-1, keepdim=True)  # y_ℓ^T W e_{ℓ-1}


#: The pool of Eqs. 14-23: term id -> Term (left vector, right vector, formula).
TERMS: dict[int, Term] = {
    0: Term("e", lambda s: -s.y_pre, "-e_l y_{l-1}^T"),
    1: Term("y", lambda s: -s.e_pre, "-y_l e_{l-1}^T"),
    2: Term("e", lambda s: -s.e_pre, "-e_l e_{l-1}^T"),
    3: Term(None, None, "-W", decay=lambda s: -1.0),
    4: Term("1", lambda s: -s.e_pre, "-1 e_{l-1}^T"),
    5: Term("e", lambda s: -s.y_post.sum(-1, keepdim=True) * s.y_pre, "-e_l 1^T y_l y_{l-1}^T"),
    6: Term("y", lambda s: -_y_w_e(s) * s.e_pre, "-y_l y_l^T W e_{l-1} e_{l-1}^T", needs_wt_y=True),
    7: Term("e", lambda s: -_y_w_e(s) * s.y_pre, "-e_l y_l^T W e_{l-1} y_{l-1}^T", needs_wt_y=True),
    8: Term(
        "y",
        lambda s: -(s.z_post * s.e_post).sum(-1, keepdim=True) * s.e_pre,
        "-y_l y_{l-1}^T W^T e_l e_{l-1}^T",
    ),
    9: Term("y", lambda s: s.y_pre - s.wt_y, "y_l y_{l-1}^T - y_l y_l^T W", needs_wt_y=True),
}
#: The paper's pool F^0..F^9 (Eqs. 14-23); terms added to :data:`TERMS` later are not in it.
TERM_IDS = tuple(range(10))

#: FLP's local rule (Lindsey & Litwin-Kumar 2020), ``w ← w + α (a b - b² w)`` per synapse, with a
#: the presynaptic activity and b the postsynaptic one (after feedback): ``F^10 = y_ℓ y_{ℓ-1}^T -
#: diag(y_ℓ²) W`` (a per-neuron decay, unlike F^9's ``(y_ℓ y_ℓ^T) W``).
TERMS[10] = Term(
    "y",
    lambda s: s.y_pre,
    "y_l y_{l-1}^T - diag(y_l^2) W",
    decay=lambda s: -s.y_post.pow(2).sum(1).unsqueeze(-1),
)
TERM_FORMULAS = {r: term.formula for r, term in TERMS.items()}  # the paper's; see :func:`formula`


def formula(r: int) -> str:
    """The formula of term ``r`` as text (reports, rule equations)."""
    return TERMS[r].formula


def uses_wt_y(active: Iterable[int]) -> bool:
    """Whether a term of ``active`` needs ``W^T y_ℓ`` (the product ``y_ℓ^T W`` of Eqs. 19, 20, 23)."""
    return any(TERMS[r].needs_wt_y for r in active)


def _left(name: str, s: LayerSignals) -> Tensor:
    if name == "1":
        return torch.ones_like(s.y_post)
    return s.e_post if name == "e" else s.y_post


def update_factors(
    theta: Tensor, active: Iterable[int], signals: LayerSignals
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``Σ_r θ_r F^r`` of one layer as ``(left, right, decay)``: the update is ``left^T right - decay W``.

    ``theta (T, 10)`` holds every term's coefficient (zero where inactive); ``active`` lists the
    terms to compute. ``left (T, k, n)`` stacks ``e_ℓ, y_ℓ, 1`` (those with a non-zero right
    vector), ``right (T, k, m)`` the sums of their terms' ``θ_r ·`` right vectors; ``decay`` is
    ``-Σ θ_r decay_r`` of the terms with a decay (θ_3 for F^3), ``(T, 1, 1)`` or per row
    ``(T, n, 1)``, or None.
    """
    rights: dict[str, Tensor] = {}
    decay = None
    columns = theta[:, :, None, None].unbind(1)  # one view per term (one op, not three per term)
    for r in sorted(set(active)):
        term, coefficient = TERMS[r], columns[r]
        if term.left is not None:
            value = coefficient * term.right(signals)
            rights[term.left] = value if term.left not in rights else rights[term.left] + value
        if term.decay is not None:
            value = -coefficient * term.decay(signals)
            decay = value if decay is None else decay + value
    order = [name for name in ("e", "y", "1") if name in rights]
    if not order:
        return None, None, decay
    lefts = [_left(name, signals) for name in order]
    if len(order) == 1:
        return lefts[0], rights[order[0]], decay
    return torch.cat(lefts, dim=1), torch.cat([rights[name] for name in order], dim=1), decay


def apply_update(
    weight: Tensor, left: Tensor | None, right: Tensor | None, decay: Tensor | None, out: Tensor | None = None
) -> Tensor:
    """``W (1 - decay) + left^T right``: one batched rank-k product (no ``(n × n)`` matrix).

    ``out`` (outside autograd only) receives the result: ``weight`` itself updates it in place, a
    spare tensor of its shape is reused; either saves allocating (and page-faulting) a new ``W``.
    """
    if out is None:
        base = weight * (1 - decay) if decay is not None else weight
        if left is None:
            return base
        return torch.baddbmm(base, left.transpose(1, 2), right)
    if decay is not None:
        torch.mul(weight, 1 - decay, out=out)
    elif out is not weight:
        out.copy_(weight)
    if left is not None:
        out.baddbmm_(left.transpose(1, 2), right)
    return out


def layer_signals(
    weight: Tensor, active: Iterable[int], y_pre, y_post, e_pre, e_post, z_post
) -> LayerSignals:
    """The :class:`LayerSignals` of one layer, with ``wt_y = y_ℓ W`` only when a term needs it."""
    wt_y = y_post @ weight if uses_wt_y(active) else None
    return LayerSignals(y_pre, y_post, e_pre, e_post, z_post, wt_y)


def plasticity_update(
    weight: Tensor,
    theta: Tensor,
    active: Iterable[int],
    y_pre: Tensor,
    y_post: Tensor,
    e_pre: Tensor,
    e_post: Tensor,
    z_post: Tensor,
) -> Tensor:
    """``W + Σ_r θ_r F^r`` for one layer (Eqs. 5, 14-23), all trials at once.

    Shapes: ``weight (T, n, m)``, ``theta (T, 10)``, ``y_pre, e_pre (T, B, m)``,
    ``y_post, e_post, z_post (T, B, n)``. ``active`` lists the terms to compute;
    the others are skipped (their θ is zero). With ``B > 1`` the outer products
    are summed over the batch.
    """
    signals = layer_signals(weight, active, y_pre, y_post, e_pre, e_post, z_post)
    return apply_update(weight, *update_factors(theta, active, signals))


def term_matrix(r: int, weight: Tensor, signals: LayerSignals) -> Tensor:
    """F^r of one layer as its ``(T, n, m)`` matrix (batch summed); never an ``(n × n)`` one."""
    term = TERMS[r]
    total = torch.zeros_like(weight)
    if term.left is not None:
        total = total + _left(term.left, signals).transpose(1, 2) @ term.right(signals)
    if term.decay is not None:
        total = total + term.decay(signals) * weight
    return total


def dense_update(coefficients: Mapping[int, Tensor], weight: Tensor, signals: LayerSignals) -> Tensor:
    """``Σ_r C_r ⊙ F^r`` with any coefficient shape that broadcasts to ``(T, n, m)`` — per trial
    ``(T, 1, 1)``, or per synapse ``(T, n, m)`` — each term built as its ``(T, n, m)`` matrix."""
    total = torch.zeros_like(weight)
    for r, coefficient in coefficients.items():
        total = total + coefficient * term_matrix(r, weight, signals)
    return total


def term_norms(weight: Tensor, signals: LayerSignals) -> Tensor:
    """Frobenius norms ``‖F^r‖`` of every term of one layer at one online step, shape ``(T, R)``.

    A plain outer product has ``‖u v^T‖ = ‖u‖ ‖v‖`` and a plain scalar decay ``|d| ‖W‖``, so
    those are not built; a term with both parts is built as its ``(T, n, m)`` matrix. Takes one
    sample per step (batch 1); ``signals.wt_y`` must be given.
    """
    if signals.y_pre.shape[1] != 1:
        raise ValueError(
            f"term_norms takes one sample per step (batch 1), got batch {signals.y_pre.shape[1]}"
        )
    norms = []
    for r, term in TERMS.items():
        if term.decay is None:
            left, right = _left(term.left, signals), term.right(signals)
            norms.append(left.norm(dim=-1)[:, 0] * right.norm(dim=-1)[:, 0])
        elif term.left is None and isinstance(term.decay(signals), float):
            norms.append(weight.flatten(1).norm(dim=1) * abs(term.decay(signals)))
        else:
            norms.append(term_matrix(r, weight, signals).flatten(1).norm(dim=1))
    return torch.stack(norms, dim=1)


# ---------------------------------------------------------------- feedback terms (Eq. 9)

#: Terms of a plastic feedback pathway's rule ``ΔB_{ℓ,ℓ-1} = Σ_k ψ_k G^k`` (Oja paper Eq. 9),
#: in metaplast's layout ``B_{ℓ,ℓ-1}: (dim y_{ℓ-1}, dim y_ℓ)``, which sends ``e_ℓ`` to layer ℓ-1.
#: Eq. 9 writes ``ΔB = -θ_4 y_ℓ e_{ℓ-1}^T + θ_9 B``: ψ_0 is its θ_4, ψ_1 its θ_9 (its θ_4 and θ_9
#: are not the pool's F^4 and F^9). Each function takes ``(B, y_post, e_pre)`` and returns G^k.
FEEDBACK_TERMS: dict[int, tuple[Callable[[Tensor, Tensor, Tensor], Tensor], str]] = {
    0: (lambda B, y_post, e_pre: -(e_pre.transpose(1, 2) @ y_post), "-(y_l e_{l-1}^T)^T"),
    1: (lambda B, y_post, e_pre: B, "B"),
}
