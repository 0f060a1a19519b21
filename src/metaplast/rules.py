"""The pool of plasticity terms F^0..F^9 (Methods, Eqs. 14-23), factorised.

Every term but the decay F^3 is a scaled outer product, so the whole update of
one layer is the rank-3 product ``e_l a^T + y_l b^T + 1 c^T - θ_3 W`` (summed
over the batch dimension, which is 1 online). No ``(n × n)`` matrix is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

TERM_COUNT = 10
TERM_IDS = tuple(range(TERM_COUNT))

#: Named rules: Eq. 4 (f0), Eq. 5 (pool), Eq. 7 (bio), Eq. 8 (ehebb), Eq. 10 (oja).
NAMED_RULES: dict[str, tuple[int, ...]] = {
    "f0": (0,),
    "pool": TERM_IDS,
    "bio": (0, 2, 9),
    "ehebb": (0, 2),
    "oja": (0, 9),
}

#: Human-readable form of each term, used in reports and docs.
TERM_FORMULAS = {
    0: "-e_l y_{l-1}^T",
    1: "-y_l e_{l-1}^T",
    2: "-e_l e_{l-1}^T",
    3: "-W",
    4: "-1 e_{l-1}^T",
    5: "-e_l 1^T y_l y_{l-1}^T",
    6: "-y_l y_l^T W e_{l-1} e_{l-1}^T",
    7: "-e_l y_l^T W e_{l-1} y_{l-1}^T",
    8: "-y_l y_{l-1}^T W^T e_l e_{l-1}^T",
    9: "y_l y_{l-1}^T - y_l y_l^T W",
}


def resolve_rule(spec: str | int | Iterable[int]) -> tuple[int, ...]:
    """Term ids of a rule given by name (f0, pool, bio, ehebb, oja) or as a list of ids."""
    if isinstance(spec, str):
        if spec not in NAMED_RULES:
            raise ValueError(
                f"rule {spec!r} is unknown; allowed: {', '.join(NAMED_RULES)} or a list of term ids 0..9"
            )
        return NAMED_RULES[spec]
    ids = [spec] if isinstance(spec, int) else list(spec)
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or i not in TERM_IDS]
    if bad or not ids:
        raise ValueError(
            f"rule terms {ids!r} are invalid ({bad!r}); allowed: a non-empty list of term ids 0..9"
        )
    if len(set(ids)) != len(ids):
        raise ValueError(f"rule terms {ids!r} repeat an id; each term id 0..9 may appear once")
    return tuple(sorted(ids))


def expand_theta(theta: Tensor, terms: Sequence[int], layer_terms: Sequence[int]) -> Tensor:
    """Dense ``(trials, 10)`` coefficients of one layer: Θ's entries for ``layer_terms``, zero elsewhere."""
    dense = theta.new_zeros(theta.shape[0], TERM_COUNT)
    columns = [terms.index(r) for r in layer_terms]
    return dense.index_copy(1, torch.tensor(layer_terms, device=theta.device), theta[:, columns])


#: Terms that need ``W^T y_l`` (the product ``y_l^T W`` of Eqs. 19, 20 and 23).
USES_WT_Y = frozenset({6, 7, 9})


def update_factors(
    theta: Tensor,
    active: Iterable[int],
    y_pre: Tensor,
    y_post: Tensor,
    e_pre: Tensor,
    e_post: Tensor,
    z_post: Tensor,
    wt_y: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``Σ_r θ_r F^r`` of one layer as ``(left, right, decay)``: the update is ``left^T right - decay W``.

    ``left (T, k, n)`` stacks ``e_l, y_l, 1`` (those with a non-zero right
    vector), ``right (T, k, m)`` their right vectors a, b, c; ``decay (T, 1, 1)``
    is θ_3 when F^3 is active. ``wt_y = y_l W`` (shape ``(T, B, m)``) is needed
    only by F^6, F^7 and F^9. Shapes and batching as in :func:`plasticity_update`.
    """
    active = set(active)

    def coef(r: int) -> Tensor:
        return theta[:, r, None, None]

    a = b = c = None  # right vectors of e_l, y_l and 1

    def add(acc, value):
        return value if acc is None else acc + value

    if active & {6, 7}:
        y_w_e = (wt_y * e_pre).sum(-1, keepdim=True)  # y_l^T W e_{l-1}
    if 0 in active:
        a = add(a, -coef(0) * y_pre)
    if 2 in active:
        a = add(a, -coef(2) * e_pre)
    if 5 in active:
        a = add(a, -coef(5) * y_post.sum(-1, keepdim=True) * y_pre)
    if 7 in active:
        a = add(a, -coef(7) * y_w_e * y_pre)
    if 1 in active:
        b = add(b, -coef(1) * e_pre)
    if 6 in active:
        b = add(b, -coef(6) * y_w_e * e_pre)
    if 8 in active:
        b = add(b, -coef(8) * (z_post * e_post).sum(-1, keepdim=True) * e_pre)
    if 9 in active:
        b = add(b, coef(9) * (y_pre - wt_y))
    if 4 in active:
        c = -coef(4) * e_pre

    lefts, rights = [], []
    for left, right in ((e_post, a), (y_post, b), (None, c)):
        if right is not None:
            lefts.append(torch.ones_like(y_post) if left is None else left)
            rights.append(right)
    decay = coef(3) if 3 in active else None
    if not lefts:
        return None, None, decay
    if len(lefts) == 1:
        return lefts[0], rights[0], decay
    return torch.cat(lefts, dim=1), torch.cat(rights, dim=1), decay


def apply_update(weight: Tensor, left: Tensor | None, right: Tensor | None, decay: Tensor | None) -> Tensor:
    """``W (1 - θ_3) + left^T right``: one batched rank-k product (no ``(n × n)`` matrix)."""
    base = weight * (1 - decay) if decay is not None else weight
    if left is None:
        return base
    return torch.baddbmm(base, left.transpose(1, 2), right)


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
    active = set(active)
    wt_y = y_post @ weight if active & USES_WT_Y else None  # (W^T y_l)^T, shape (T, B, m)
    return apply_update(weight, *update_factors(theta, active, y_pre, y_post, e_pre, e_post, z_post, wt_y))


def term_norms(
    weight: Tensor, y_pre: Tensor, y_post: Tensor, e_pre: Tensor, e_post: Tensor, z_post: Tensor
) -> Tensor:
    """Frobenius norms ``‖F^r‖`` of the ten terms of one layer at one online step, shape ``(T, 10)``.

    Every term but F^3 is a scaled outer product ``u v^T`` with ``‖u v^T‖ = ‖u‖ ‖v‖``, so no
    term is built. Shapes as in :func:`plasticity_update` with a batch of one sample.
    """
    if y_pre.shape[1] != 1:
        raise ValueError(f"term_norms takes one sample per step (batch 1), got batch {y_pre.shape[1]}")
    norm = lambda v: v.norm(dim=-1)[:, 0]  # noqa: E731
    wt_y = y_post @ weight
    y_w_e = (wt_y * e_pre).sum(-1)[:, 0].abs()  # |y_l^T W e_{l-1}|
    e_y, y_e = norm(e_post) * norm(y_pre), norm(y_post) * norm(e_pre)
    return torch.stack(
        [
            e_y,  # F^0
            y_e,  # F^1
            norm(e_post) * norm(e_pre),  # F^2
            weight.flatten(1).norm(dim=1),  # F^3
            y_post.shape[-1] ** 0.5 * norm(e_pre),  # F^4
            y_post.sum(-1)[:, 0].abs() * e_y,  # F^5
            y_w_e * y_e,  # F^6
            y_w_e * e_y,  # F^7
            (z_post * e_post).sum(-1)[:, 0].abs() * y_e,  # F^8
            norm(y_post) * norm(y_pre - wt_y),  # F^9
        ],
        dim=1,
    )
