"""Teaching signals for BP, FA and DFA (Eq. 3 and Eq. 24).

Feedback matrices are stored in the paper's orientation: ``B_{l,l-1}`` has
shape ``(trials, dim y_{l-1}, dim y_l)`` and sends ``e_l`` to layer ``l-1``;
DFA's ``B_{L,l}`` has shape ``(trials, dim y_l, dim y_L)``. For BP the
matrices are ``W_{l-1,l}^T`` of the *current* weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metaplast.network import BETA, INITIALISERS, softplus_slope

FEEDBACK_KINDS = ("bp", "fa", "dfa")


def check_feedback_kind(kind: str) -> str:
    if kind not in FEEDBACK_KINDS:
        raise ValueError(f"feedback kind {kind!r} is unknown; allowed: {', '.join(FEEDBACK_KINDS)}")
    return kind


def init_feedback(
    kind: str, sizes: list[int], generators: list[torch.Generator], init: str = "xavier_uniform"
) -> list[Tensor]:
    """Fixed random feedback for one episode: FA's ``B_{l,l-1}`` or DFA's ``B_{L,l}``, l = 1..L resp. 0..L-1.

    BP has no fixed feedback and gets an empty list.
    """
    check_feedback_kind(kind)
    if init not in INITIALISERS:
        raise ValueError(f"feedback init {init!r} is unknown; allowed: {', '.join(INITIALISERS)}")
    draw, trials = INITIALISERS[init], len(generators)
    if kind == "fa":
        return [draw(trials, n_prev, n_next, generators) for n_prev, n_next in zip(sizes, sizes[1:])]
    if kind == "dfa":
        return [draw(trials, n, sizes[-1], generators) for n in sizes[:-1]]
    return []


def backward_matrices(
    kind: str, weights: list[Tensor], feedback: list[Tensor], grad_through_b: bool = True
) -> list[Tensor]:
    """The matrices that carry errors down: ``B_{l,l-1}`` (BP: ``W^T``, FA: fixed) or DFA's ``B_{L,l}``."""
    if kind == "bp":
        return [(w if grad_through_b else w.detach()).transpose(-1, -2) for w in weights]
    return feedback


def teaching_signals(
    kind: str,
    matrices: list[Tensor],
    ys: list[Tensor],
    output_error: Tensor,
    beta: float = BETA,
    send=None,
) -> list[Tensor]:
    """Errors ``[e_0..e_L]`` from one forward pass (Eq. 3), with the synthetic ``e_0`` of Eq. 24.

    ``output_error`` is ``e_L = softmax(z_L) - onehot(label)``; ``matrices`` come
    from :func:`backward_matrices`. ``send(e, index)`` computes ``e B_index^T``
    (default: a plain batched product with ``matrices[index]``).
    """
    depth = len(ys) - 1
    errors = [output_error]
    for layer in range(depth, 0, -1):  # produce e_{layer-1}
        signal = output_error if kind == "dfa" else errors[0]
        if send is None:
            sent = signal @ matrices[layer - 1].transpose(-1, -2)
        else:
            sent = send(signal, layer - 1)
        errors.insert(0, sent * softplus_slope(ys[layer - 1], beta))
    return errors
