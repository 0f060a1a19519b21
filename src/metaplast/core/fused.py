"""The fused meta-gradient: the inner loop with a hand-scheduled backward pass (exact, less memory).

Same numbers as :func:`metaplast.core.inner_loop.adapt` under autograd (tested to 1e-10 in
float64), for the learners it covers (:func:`unsupported` names what it does not). Per step
only the small vector part (forward pass, errors, the factors of the update) is replayed
under autograd on the stored products with ``W_t`` (:class:`_Replay`, by name and layer);
everything of the size of ``W`` is done here: ``dL/dW_t = (1 - decay) dL/dW_{t+1} + A^T C``
in one batched product, where the rows of ``A, C`` are the factors recorded by
:class:`_Product`. The forward pass records every step's products and update factors (vectors,
small); with ``recompute_segment = k`` only every k-th ``W_t`` is kept, the others are rebuilt
segment by segment from the recorded factors (one rank-k update each, into reused tensors: a
fresh ``W``-sized tensor costs page faults) and updated in place in the forward pass.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from metaplast.core.learner import Learner, State
from metaplast.core.networks import Products
from metaplast.core.pathways import Pathway
from metaplast.core.terms import apply_update


def unsupported(learner: Learner, state: State, meta, truncate: int | None) -> str | None:
    """Why the fused estimator does not apply to this learner (None where it does)."""
    pathway = learner.pathway
    if pathway.plastic:
        return f"the {type(pathway).__name__} pathway changes its matrices during the episode"
    if type(pathway).feedback_activations is not Pathway.feedback_activations:
        return f"the {type(pathway).__name__} pathway changes the activations"
    if learner.share == "synapse":
        return "Θ is per synapse"
    if any(t.requires_grad for t in (*state.feedback, *state.biases)):
        return "the feedback matrices or biases are meta-learned"
    if truncate is not None:
        return "the backpropagation is truncated"
    extra = sorted(set(meta) - {"theta", "init"})
    if extra:
        return f"meta-parameters {extra} besides Θ and the initial weights"
    return None


class _Recording(Products):
    """Plain products that also keep their outputs, by ``(name, layer)``."""

    def __init__(self, weights):
        super().__init__(weights)
        self.outputs: dict[tuple[str, int], Tensor] = {}

    def _keep(self, key, value):
        self.outputs[key] = value
        return value

    def forward(self, index, y):
        return self._keep(("forward", index), super().forward(index, y))

    def backward(self, index, e):
        return self._keep(("backward", index), super().backward(index, e))

    def send(self, index, e, matrix):
        return self._keep(("send", index), super().send(index, e, matrix))

    def wt_y(self, index, y):
        return self._keep(("wt_y", index), super().wt_y(index, y))


class _Product(torch.autograd.Function):
    """``v M`` (its value given: ``out``, stored in the forward pass) whose backward passes
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
            # detached: v carries its graph, and a graph node reached from its own ctx is a
            # reference cycle through C++ that Python's collector never frees (a leak per step)
            grad, v_factor = grad.detach(), v.detach()
            ctx.sink.append((grad, v_factor) if ctx.transposed else (v_factor, grad))
        grad_v = grad @ matrix.transpose(-1, -2) if ctx.needs_input_grad[0] else None  # not for x
        return grad_v, None, torch.zeros((), dtype=grad.dtype, device=grad.device), None, None, None


class _Replay(Products):
    """The stored products of one step, differentiable in their vector argument; the
    gradient to ``W_i`` is recorded as factors in ``sinks[i]``."""

    def __init__(self, weights, outputs, anchors, sinks):
        super().__init__(weights)
        self.outputs, self.anchors, self.sinks = outputs, anchors, sinks

    def _product(self, name, index, v, matrix, transposed):
        sink = None if transposed is None else self.sinks[index]
        return _Product.apply(v, matrix, self.anchors[index], self.outputs[name, index], sink, transposed)

    def forward(self, index, y):
        return self._product("forward", index, y, self.weights[index].transpose(-1, -2), True)

    def backward(self, index, e):
        return self._product("backward", index, e, self.weights[index], False)

    def send(self, index, e, matrix):
        return self._product("send", index, e, matrix.transpose(-1, -2), None)

    def wt_y(self, index, y):
        return self._product("wt_y", index, y, self.weights[index], False)


def _chunk(tensor: Tensor, step: int, batch: int) -> Tensor:
    return tensor[:, step * batch : (step + 1) * batch]


def _unrolled(learner, theta, state, x_train, y_train, batch, steps, keep=(), record=False):
    """``steps`` steps as plain tensor code (outside autograd): the adapted state, ``{t: W_t}`` for
    the steps in ``keep`` and, with ``record``, ``{t: (products, factors)}`` of every step.

    ``W_{t+1}`` is a new tensor where ``W_t`` is kept or is the given state's; elsewhere ``W_t``
    is updated in place."""
    coefficients = learner.layer_coefficients(theta)
    kept, records = {}, {}
    for step in range(steps):
        products = _Recording(state.weights) if record else Products(state.weights)
        factors, _, _ = learner.step_factors(
            state,
            {"theta": theta},
            coefficients,
            _chunk(x_train, step, batch),
            _chunk(y_train, step, batch),
            products,
        )
        if step in keep:
            kept[step] = state.weights
        if record:
            records[step] = (products.outputs, factors)
        fresh = step == 0 or step in keep
        weights = [apply_update(w, *f, out=None if fresh else w) for w, f in zip(state.weights, factors)]
        state = State(weights, state.feedback, state.biases)
    return state, kept, records


class _InnerLoop(torch.autograd.Function):
    """The inner loop with a hand-scheduled backward (reverse mode through every step, exact)."""

    @staticmethod
    def forward(ctx, spec, theta, x_train, y_train, *tensors):
        learner, batch, segment, depth, n_feedback = spec
        state = State(
            list(tensors[:depth]),
            list(tensors[depth : depth + n_feedback]),
            list(tensors[depth + n_feedback :]),
        )
        steps = math.ceil(x_train.shape[1] / batch)
        keep = set(range(0, steps, segment) if segment else range(steps))
        adapted, kept, records = _unrolled(learner, theta, state, x_train, y_train, batch, steps, keep, True)
        ctx.spec, ctx.kept, ctx.records, ctx.steps = spec, kept, records, steps
        ctx.save_for_backward(theta, x_train, y_train, *state.feedback, *state.biases)
        return tuple(adapted.weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_adapted):
        learner, batch, segment, depth, n_feedback = ctx.spec
        theta, x_train, y_train, *rest = ctx.saved_tensors
        feedback, biases = rest[:n_feedback], rest[n_feedback:]
        steps = ctx.steps
        if steps and not ctx.kept:
            raise RuntimeError(
                "the fused inner loop's backward runs once: it frees the stored W_t as it goes"
            )
        # dL/dW_t, updated in place step by step (contiguous: flatten below is a view)
        grads = [g.clone(memory_format=torch.contiguous_format) for g in grad_adapted]
        with torch.enable_grad():  # Θ's per-layer coefficients, built once; dL/dΘ through them at the end
            leaf = theta.detach().requires_grad_()
            coefficients = learner.layer_coefficients(leaf)
        grad_theta = torch.zeros_like(theta)
        grad_coefficients = [torch.zeros_like(c) for c in coefficients]
        spare = [[] for _ in range(depth)]  # W-sized tensors free for reuse
        for start in reversed(range(0, steps, segment or steps or 1)):
            stop = min(start + segment, steps) if segment else steps
            inside = {}
            with torch.no_grad():  # W_start .. W_{stop-1}: kept, or rebuilt from the recorded factors
                for step in range(start, stop):
                    if step in ctx.kept:
                        inside[step] = ctx.kept.pop(step)
                        continue
                    _, factors = ctx.records[step - 1]
                    inside[step] = [
                        apply_update(w, *f, out=free.pop() if free else None)
                        for w, f, free in zip(inside[step - 1], factors, spare)
                    ]
            for step in reversed(range(start, stop)):
                weights, (outputs, _) = inside.pop(step), ctx.records.pop(step)
                x, y = _chunk(x_train, step, batch), _chunk(y_train, step, batch)
                state = State(weights, feedback, biases)
                direct, per_layer = _backward_step(learner, state, outputs, leaf, coefficients, grads, x, y)
                grad_theta += direct
                for total, grad in zip(grad_coefficients, per_layer):
                    total += grad
                if segment and step:  # not W_0 (the caller's)
                    for free, w in zip(spare, weights):
                        free.append(w)
        with torch.enable_grad():
            pairs = [(c, g) for c, g in zip(coefficients, grad_coefficients) if c.requires_grad]
            if pairs:
                outputs, grad_outputs = zip(*pairs)
                (through,) = torch.autograd.grad(outputs, leaf, grad_outputs, allow_unused=True)
                grad_theta += through if through is not None else 0
        needs_w = any(ctx.needs_input_grad[4 : 4 + depth])
        return (
            None,
            grad_theta,
            None,
            None,
            *(grads if needs_w else [None] * depth),
            *[None] * (len(feedback) + len(biases)),
        )


def _backward_step(learner, state, outputs, theta, coefficients, grads, x, y):
    """Turn ``dL/dW_{t+1}`` (``grads``, in place) into ``dL/dW_t``; return this step's gradients
    to ``theta`` (where used directly) and to each layer's ``coefficients`` (built from it)."""
    with torch.enable_grad():
        leaves = [c.detach().requires_grad_() for c in coefficients]
        anchors = [w.new_zeros((), requires_grad=True) for w in state.weights]
        sinks = [[] for _ in state.weights]
        replay = _Replay(state.weights, outputs, anchors, sinks)
        factors, _, _ = learner.step_factors(state, {"theta": theta}, leaves, x, y, replay)
        results, grad_outputs = [], []
        for weight, grad, (left, right, decay) in zip(state.weights, grads, factors):
            if left is not None:  # W_{t+1} = ... + left^T right
                results += [left, right]
                grad_outputs += [right.detach() @ grad.transpose(1, 2), left.detach() @ grad]
            if decay is not None:  # W_{t+1} = W_t (1 - decay) + ..., decay (T, 1, 1) or per row (T, n, 1)
                results.append(decay)
                if decay.shape[1] == 1:  # -Σ G ⊙ W per trial: a dot product each (no W-sized temporary)
                    dots = [torch.dot(g.flatten(), w.flatten()) for g, w in zip(grad, weight)]
                    grad_outputs.append(-torch.stack(dots).view(decay.shape))
                else:
                    grad_outputs.append(-(grad * weight).sum(2, keepdim=True))
        grad_theta, *per_layer = torch.autograd.grad(
            results, [theta, *leaves, *anchors], grad_outputs, allow_unused=True
        )
    for grad, sink, (_, _, decay) in zip(grads, sinks, factors):
        if decay is not None:
            grad.mul_(1 - decay.detach())
        if sink:
            lefts, rights = zip(*sink)
            grad.baddbmm_(torch.cat(lefts, 1).transpose(1, 2), torch.cat(rights, 1))
            sink.clear()
    per_layer = [torch.zeros_like(c) if g is None else g for c, g in zip(coefficients, per_layer)]
    return (grad_theta if grad_theta is not None else torch.zeros_like(theta)), per_layer


def adapt(
    learner: Learner,
    state: State,
    meta,
    x_train: Tensor,
    y_train: Tensor,
    batch: int = 1,
    recompute_segment: int = 16,
) -> State:
    """:func:`metaplast.core.inner_loop.adapt` with the hand-scheduled backward (``recompute_segment``
    steps per recomputation segment; 0 keeps every ``W_t``)."""
    if recompute_segment < 0:
        raise ValueError(
            f"recompute_segment={recompute_segment!r} is not allowed; allowed: 0 (keep every W) or k >= 1"
        )
    theta = meta["theta"]
    needs_grad = torch.is_grad_enabled() and (
        theta.requires_grad or any(w.requires_grad for w in state.weights)
    )
    if not needs_grad:
        with torch.no_grad():
            steps = math.ceil(x_train.shape[1] / batch)
            return _unrolled(learner, theta, state, x_train, y_train, batch, steps)[0]
    spec = (learner, batch, recompute_segment, len(state.weights), len(state.feedback))
    weights = _InnerLoop.apply(spec, theta, x_train, y_train, *state.weights, *state.feedback, *state.biases)
    return State(list(weights), state.feedback, state.biases)
