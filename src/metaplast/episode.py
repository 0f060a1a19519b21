"""The differentiable inner loop of Algorithm 1 and the meta-loss (Eq. 6, Eq. S.16)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from metaplast.feedback import backward_matrices, teaching_signals
from metaplast.network import BETA, forward
from metaplast.rules import USES_WT_Y, apply_update, expand_theta, resolve_rule, update_factors

REGULARISERS = ("none", "l1", "l2")


@dataclass(frozen=True)
class Rule:
    """Which terms Θ holds (its columns) and which of them each layer uses."""

    terms: tuple[int, ...]
    layer_terms: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, spec, depth: int, per_layer: Sequence | None = None) -> Rule:
        """One rule shared by all ``depth`` layers, or one rule per layer (Table 1)."""
        if per_layer is None:
            terms = resolve_rule(spec)
            return cls(terms, (terms,) * depth)
        if len(per_layer) != depth:
            raise ValueError(
                f"rule.per_layer has {len(per_layer)} entries but the network has {depth} layers; "
                f"give one rule per layer"
            )
        layer_terms = tuple(resolve_rule(s) for s in per_layer)
        return cls(tuple(sorted(set().union(*layer_terms))), layer_terms)


def _plain_product(weights):
    def product(v, index, transposed, constant=None):
        if constant is not None:
            return v @ constant
        weight = weights[index]
        return v @ (weight.transpose(-1, -2) if transposed else weight)

    return product


def _step_factors(weights, feedback, thetas, rule, kind, x, label, beta, grad_through_b, product):
    """One online step up to the update: per layer ``(left, right, decay)`` of :func:`update_factors`.

    Errors of all layers come from one forward pass before any weight changes.
    ``product(v, index, transposed)`` computes ``v W_index^T`` (transposed) or
    ``v W_index``; ``product(v, index, None, constant)`` computes ``v constant``
    (a feedback matrix, or BP's ``W`` without ``grad_through_b``).
    """
    ys, zs = forward(weights, x, beta, linear=lambda v, i: product(v, i, True))
    width = weights[-1].shape[1]
    output_error = ys[-1] - F.one_hot(label, width).to(ys[-1].dtype)
    matrices = backward_matrices(kind, weights, feedback, grad_through_b)
    if kind == "bp" and grad_through_b:  # e B^T = e W

        def send(e, i):
            return product(e, i, False)

    else:

        def send(e, i):
            return product(e, i, None, matrices[i].transpose(-1, -2))

    es = teaching_signals(kind, matrices, ys, output_error, beta, send=send)
    return [
        update_factors(
            th,
            terms,
            ys[i],
            ys[i + 1],
            es[i],
            es[i + 1],
            zs[i],
            product(ys[i + 1], i, False) if USES_WT_Y & set(terms) else None,
        )
        for i, (th, terms) in enumerate(zip(thetas, rule.layer_terms))
    ]


def _unrolled(theta, rule, weights, feedback, kind, x_train, y_train, beta, grad_through_b, keep=()):
    """The inner loop as plain tensor code.

    Returns the adapted weights and, for the steps ``t`` in ``keep``, ``W_t`` and
    the outputs of that step's products with ``W_t`` and ``B`` (in call order).
    """
    thetas = [expand_theta(theta, rule.terms, terms) for terms in rule.layer_terms]
    kept = {}
    for step in range(x_train.shape[1]):
        product = _plain_product(weights)
        if step in keep:
            outputs = []
            kept[step] = (weights, outputs)
            plain = product

            def product(*args, plain=plain, outputs=outputs):
                outputs.append(plain(*args))
                return outputs[-1]

        factors = _step_factors(
            weights,
            feedback,
            thetas,
            rule,
            kind,
            x_train[:, step : step + 1],
            y_train[:, step : step + 1],
            beta,
            grad_through_b,
            product,
        )
        weights = [apply_update(w, *f) for w, f in zip(weights, factors)]
    return weights, kept


class _Product(torch.autograd.Function):
    """``v M`` (its value given: ``out``, computed in the forward pass) whose backward passes
    ``grad M^T`` to ``v`` and, when ``M`` is ``W^T`` or ``W``, *records* the rank-``B``
    factors of the gradient to ``W`` in ``sink`` instead of building it; the ``anchor``
    (a scalar that requires grad) makes autograd visit the node."""

    @staticmethod
    def forward(ctx, v, matrix, anchor, out, sink, transposed):
        ctx.save_for_backward(v, matrix)
        ctx.sink, ctx.transposed = sink, transposed
        return out

    @staticmethod
    def backward(ctx, grad):
        v, matrix = ctx.saved_tensors
        if ctx.sink is not None:  # M = W^T: dW = grad^T v;  M = W: dW = v^T grad
            ctx.sink.append((grad, v) if ctx.transposed else (v, grad))
        grad_v = grad @ matrix.transpose(-1, -2)
        return grad_v, None, torch.zeros((), dtype=grad.dtype, device=grad.device), None, None, None


class _InnerLoop(torch.autograd.Function):
    """The inner loop with a hand-scheduled backward (reverse-mode through every step, exact).

    Per step the small vector part (forward pass, errors, the factors of the
    update) is re-run under autograd on the stored products with ``W_t`` and ``B``;
    everything of the size of ``W`` is done here: ``dL/dW_t = (1 - θ_3) dL/dW_{t+1}
    + A^T C`` in one batched product, where the rows of ``A, C`` are the factors
    recorded by :class:`_Product`. With segments, only the ``W_t`` at segment
    starts are kept; the others (and their products) are recomputed.
    """

    @staticmethod
    def forward(ctx, spec, theta, x_train, y_train, *tensors):
        rule, kind, beta, grad_through_b, segment, depth = spec
        weights, feedback = list(tensors[:depth]), list(tensors[depth:])
        steps = x_train.shape[1]
        keep = range(0, steps, segment) if segment else range(steps)
        adapted, kept = _unrolled(
            theta, rule, weights, feedback, kind, x_train, y_train, beta, grad_through_b, keep
        )
        if segment:  # only W_t is kept at segment starts; the products come back with the recomputation
            kept = {step: weights for step, (weights, _) in kept.items()}
        ctx.spec, ctx.kept = spec, kept
        ctx.save_for_backward(theta, x_train, y_train, *feedback)
        return tuple(adapted)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_adapted):
        rule, kind, beta, grad_through_b, segment, depth = ctx.spec
        theta, x_train, y_train, *feedback = ctx.saved_tensors
        if x_train.shape[1] and not ctx.kept:
            raise RuntimeError("inner_loop's backward runs once: it frees the stored W_t as it goes")
        grads = [g.clone() for g in grad_adapted]  # dL/dW_t, updated in place step by step
        grad_theta = torch.zeros_like(theta)
        steps = x_train.shape[1]
        args = (rule, kind, x_train, y_train, beta, grad_through_b)
        for start in reversed(range(0, steps, segment or steps)):
            stop = min(start + segment, steps) if segment else steps
            if segment:
                with torch.no_grad():  # W_start .. W_{stop-1} and their products, from the kept W_start
                    _, inside = _unrolled(
                        theta,
                        rule,
                        ctx.kept.pop(start),
                        feedback,
                        kind,
                        x_train[:, start:stop],
                        y_train[:, start:stop],
                        beta,
                        grad_through_b,
                        keep=range(stop - start),
                    )
            else:
                inside = {step: ctx.kept.pop(step) for step in range(steps)}
            for step in reversed(range(start, stop)):
                weights, outputs = inside.pop(step - start)
                grad_theta += _backward_step(weights, outputs, feedback, theta, grads, step, *args)
        needs_w = any(ctx.needs_input_grad[4 : 4 + depth])
        return (
            None,
            grad_theta,
            None,
            None,
            *(grads if needs_w else [None] * depth),
            *[None] * len(feedback),
        )


def _backward_step(
    weights, outputs, feedback, theta, grads, step, rule, kind, x_train, y_train, beta, grad_through_b
):
    """Turn ``dL/dW_{t+1}`` (``grads``, in place) into ``dL/dW_t``; return this step's ``dL/dΘ``."""
    with torch.enable_grad():
        leaf = theta.detach().requires_grad_()
        thetas = [expand_theta(leaf, rule.terms, terms) for terms in rule.layer_terms]
        anchors = [w.new_zeros((), requires_grad=True) for w in weights]
        sinks = [[] for _ in weights]

        stored = iter(outputs)

        def product(v, index, transposed, constant=None):
            out = next(stored)
            if constant is not None:
                return _Product.apply(v, constant, anchors[index], out, None, None)
            weight = weights[index]
            matrix = weight.transpose(-1, -2) if transposed else weight
            return _Product.apply(v, matrix, anchors[index], out, sinks[index], transposed)

        factors = _step_factors(
            weights,
            feedback,
            thetas,
            rule,
            kind,
            x_train[:, step : step + 1],
            y_train[:, step : step + 1],
            beta,
            grad_through_b,
            product,
        )
        outputs, grad_outputs = [], []
        for weight, grad, (left, right, decay) in zip(weights, grads, factors):
            if left is not None:  # W_{t+1} = ... + left^T right
                outputs += [left, right]
                grad_outputs += [right.detach() @ grad.transpose(1, 2), left.detach() @ grad]
            if decay is not None:  # W_{t+1} = W_t (1 - θ_3) + ...
                outputs.append(decay)
                grad_outputs.append(-(grad * weight).sum((1, 2)).view_as(decay))
        grad_theta, *_ = torch.autograd.grad(outputs, [leaf, *anchors], grad_outputs, allow_unused=True)
    for grad, sink, (_, _, decay) in zip(grads, sinks, factors):
        if decay is not None:
            grad.mul_(1 - decay.detach())
        if sink:
            lefts, rights = zip(*sink)
            grad.baddbmm_(torch.cat(lefts, 1).transpose(1, 2), torch.cat(rights, 1))
    return grad_theta if grad_theta is not None else torch.zeros_like(theta)


def inner_loop(
    theta: Tensor,
    rule: Rule,
    weights: list[Tensor],
    feedback: list[Tensor],
    kind: str,
    x_train: Tensor,
    y_train: Tensor,
    beta: float = BETA,
    grad_through_b: bool = True,
    recompute_segment: int = 0,
) -> list[Tensor]:
    """Train fresh weights online on ``x_train (T, S, d)``, one sample per step (Algorithm 1).

    Errors of all layers come from one forward pass before any weight changes;
    every weight then takes ``W + Σ_r θ_r F^r``. Nothing is detached: the result
    is differentiable in Θ (and in the initial weights) through the whole
    unrolled loop, with the exact gradient. ``recompute_segment = k > 0`` keeps
    only every k-th ``W_t`` for the backward pass and recomputes the others
    (memory ∝ S/k + k weight sets instead of S, for one more forward pass);
    0 keeps every ``W_t``. The feedback matrices get no gradient.
    """
    if recompute_segment < 0:
        raise ValueError(
            f"recompute_segment={recompute_segment!r} is not allowed; allowed: 0 (keep every W) or k >= 1"
        )
    if any(b.requires_grad for b in feedback):
        raise ValueError(
            "the feedback matrices must not require grad: B is fixed, the inner loop gives it no gradient"
        )
    needs_grad = torch.is_grad_enabled() and (theta.requires_grad or any(w.requires_grad for w in weights))
    if not needs_grad:
        with torch.no_grad():
            return _unrolled(theta, rule, weights, feedback, kind, x_train, y_train, beta, grad_through_b)[0]
    spec = (rule, kind, beta, grad_through_b, recompute_segment, len(weights))
    return list(_InnerLoop.apply(spec, theta, x_train, y_train, *weights, *feedback))


def query_loss(weights: list[Tensor], x_query: Tensor, y_query: Tensor, beta: float = BETA) -> Tensor:
    """Per-trial cross-entropy of the adapted network on the query set, shape ``(T,)``."""
    _, zs = forward(weights, x_query, beta)
    logits = zs[-1]
    losses = F.cross_entropy(logits.flatten(0, 1), y_query.flatten(), reduction="none")
    return losses.view(y_query.shape).mean(1)


def regulariser(theta: Tensor, kind: str) -> Tensor:
    """R(Θ) per trial: ‖Θ‖₁ (Eq. 6), ‖Θ‖₂ — the norm, not its square (Eq. S.16) — or 0."""
    if kind == "l1":
        return theta.abs().sum(1)
    if kind == "l2":
        return theta.norm(dim=1)
    if kind == "none":
        return theta.new_zeros(theta.shape[0])
    raise ValueError(f"regulariser {kind!r} is unknown; allowed: {', '.join(REGULARISERS)}")
