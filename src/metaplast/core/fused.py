"""The fused meta-gradient: the inner loop with a hand-scheduled backward pass (exact, less memory).

Same numbers as :func:`metaplast.core.inner_loop.adapt` under autograd (tested to 1e-10 in
float64), for the learners it covers (:func:`unsupported` names what it does not). Per step
only the small vector part (forward pass, errors, the factors of the update) is replayed
under autograd on the stored products with ``W_t`` (:class:`_Replay`, by name and layer);
everything of the size of ``W`` is done here: ``dL/dW_t = (1 - decay) dL/dW_{t+1} + A^T C``
in one batched product, where the rows of ``A, C`` are each stored product's gradient and its
vector (:class:`_Linked`). Inside a recomputation segment of ``recompute_segment = k`` steps a weight is
never rewritten: it is the dense ``W`` of the segment's first step plus the update factors since
(:class:`_LowRank`), so a step costs the passes over ``W`` that its products need and no update
pass, and the backward pass rebuilds a segment's ``W_t`` from the kept first one and the
recorded factors (vectors) without touching ``W``. Only every k-th ``W_t`` is kept. The adjoint
``dL/dW_t`` is low-rank inside a segment likewise (:class:`_Adjoint`: ``dL/dW`` at the segment's
end plus the ``A^T C`` since), so it is never updated step by step, and its products with all
the segment's recorded update factors are one batched product each way (:func:`_segment_adjoints`).
"""

from __future__ import annotations

import functools
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


def _product(v: Tensor, matrix: Tensor, transposed: bool) -> Tensor:
    """``v matrix^T`` (``transposed``) or ``v matrix``, ``v (T, B, ·)``. ``v matrix^T`` with one or two
    rows runs as ``(matrix v^T)^T``, row-wise dot products, which MKL runs near memory speed and
    about twice as fast as ``v matrix^T`` (a 20-trial layer-1 weight out of cache: 0.38 against
    0.82 ms for one row, 0.57 against 1.17 for two, on the AMD host of benchmarks/README.md)."""
    if not transposed:
        return v @ matrix
    if v.shape[1] > 2:
        return v @ matrix.transpose(1, 2)
    return (matrix @ v.transpose(1, 2)).transpose(1, 2)


#: :func:`_product` as an operator that ``torch.compile`` leaves to ATen (MKL). On a CPU, inductor
#: runs a batched product with one row as its own loops (a multiply and a sum), and a ``baddbmm``,
#: which it leaves to ATen, may get a vector with a zero stride, which sends ATen to a loop 8×
#: slower than MKL. Defined on the dispatcher directly (no autograd: it is never differentiated),
#: so that a call costs a few µs.
_LIBRARY = torch.library.Library("metaplast", "DEF")
_LIBRARY.define("weight_product(Tensor v, Tensor matrix, bool transposed) -> Tensor")
_LIBRARY.impl("weight_product", lambda v, m, t: _product(v, m, t).contiguous(), "CompositeExplicitAutograd")


@torch.library.register_fake("metaplast::weight_product")
def _(v, matrix, transposed):
    return v.new_empty(*v.shape[:-1], matrix.shape[-2 if transposed else -1])


#: Entries (all trials) from which a CPU matrix's products in compiled code run as
#: ``metaplast::weight_product``; smaller ones are left to inductor's loops, which fuse with the
#: step's other operations. At 20 trials of the paper's sizes layers 1-3 pass it, at 1 trial none:
#: with 100 000 a single trial's layer 1 (133 280) went through the operator and pool's 1-trial
#: compiled episode slowed from 0.86 to 1.07 s per trial (alternating processes).
EXTERN_PRODUCT_SIZE = 200_000


#: Entries per trial from which a CPU matrix's product in compiled code below
#: :data:`EXTERN_PRODUCT_SIZE` first writes its vector to memory (inductor's
#: ``prims.inductor_force_stride_order``, which realizes a buffer). Inductor runs such a one-row
#: product as a multiply and a sum over the matrix and computes the vector inside that loop, so an
#: expression (a ``softplus`` derivative, say) was recomputed for every row: at 1 trial a layer-1
#: product of the bio rule's backward step took 179 µs (21 µs with the vector written first), and
#: 1-trial compiled episodes went from 0.34-0.36 to 0.25-0.28 s (bio) and from 0.50-0.70 to
#: 0.38-0.55 s (pool) per trial (alternating processes, benchmarks/README.md). At 20 trials the
#: paper's matrices this size (layers 1-3) go to ``metaplast::weight_product`` already.
REALIZED_VECTOR_SIZE = 10_000


def _times(v: Tensor, matrix: Tensor, transposed: bool = False) -> Tensor:
    """``v matrix`` or ``v matrix^T`` (``transposed``) with a weight or feedback matrix: :func:`_product`,
    in compiled code on a CPU as the operator ``metaplast::weight_product`` for a large matrix and
    with ``v`` computed first (:func:`_written`) for a middling one."""
    compiled_cpu = matrix.device.type == "cpu" and torch.compiler.is_compiling()
    if compiled_cpu and matrix.numel() >= EXTERN_PRODUCT_SIZE:
        return torch.ops.metaplast.weight_product(v, matrix, transposed)
    if compiled_cpu and matrix.shape[-2] * matrix.shape[-1] >= REALIZED_VECTOR_SIZE:
        v = _written(v)
    return _product(v, matrix, transposed)


def _written(v: Tensor) -> Tensor:
    """``v``, in compiled code a buffer of its own that inductor computes once (not an expression
    it may recompute inside the loops of a product: :data:`REALIZED_VECTOR_SIZE`)."""
    return torch.ops.prims.inductor_force_stride_order(v, v.stride())


#: Entries (all trials) of the first layer's weight from which the forward pass makes ``x W^T`` of
#: a whole recomputation segment's steps in one product at the segment's start (``x`` is data,
#: known ahead, and the dense part of ``W_t`` is the segment's first ``W``): one pass over ``W``
#: for the segment instead of one per step. bio, 20 trials, compiled: the forward pass 0.23-0.53 ms
#: per step faster (4.4-4.8 against 3.9-4.6 ms, alternating processes); at 1 trial (133 280
#: entries) no gain was measured, so it stays with a product per step there.
SEGMENT_INPUT_PRODUCT_SIZE = 200_000


def _grown(rows: Tensor | None, new: Tensor | None, keep: Tensor | None) -> Tensor | None:
    """Factor rows ``(T, k, ·)`` one step on: scaled by ``keep`` (a decay's ``1 - decay``), with
    ``new`` appended."""
    rows = rows if rows is None or keep is None else rows * keep
    return new if rows is None else rows if new is None else torch.cat([rows, new], 1)


def _trial_dots(a: Tensor, b: Tensor) -> Tensor:
    """``Σ a ⊙ b`` per trial, ``(T, 1, 1)``, without an ``a``-sized temporary."""
    return torch.stack([torch.dot(x.flatten(), y.flatten()) for x, y in zip(a, b)]).view(-1, 1, 1)


class _LowRank:
    """``W_t = scale ⊙ base + lefts^T rights``: a weight inside a recomputation segment, as the dense
    ``base`` of an earlier step and the update factors of the steps since (their decays folded
    into ``scale``, per trial ``(T, 1, 1)`` or per row ``(T, n, 1)``, and into ``lefts``). A product
    with it is one pass over ``base`` plus the small factors, and a step adds factors instead of
    rewriting ``W``. Anything else asked of it (``.detach()``, ``.sign()``, ``.shape``: a pathway
    that reads the weight's entries, as sign feedback does) goes to the dense ``W_t``, built on
    first use. ``base_t``: ``base^T`` as its own contiguous tensor where one is kept (a feedback
    matrix: fixed for the episode), so that ``v W_t`` reads it row-wise (:func:`_product`)."""

    def __init__(self, base: Tensor, scale=None, lefts=None, rights=None, base_t=None):
        self.base, self.scale, self.lefts, self.rights, self.base_t = base, scale, lefts, rights, base_t

    def __getattr__(self, name):  # only for names the class lacks: the dense W_t's tensor methods
        if name.startswith("__"):
            raise AttributeError(name)
        if "_dense" not in self.__dict__:
            self._dense = self.dense()
        return getattr(self._dense, name)

    def updated(self, left, right, keep) -> _LowRank:
        """``W_{t+1} = W_t keep + left^T right`` (the factors of :func:`update_factors`; ``keep``:
        ``1 - decay``, or None)."""
        scale = self.scale if keep is None else keep if self.scale is None else self.scale * keep
        lefts = _grown(self.lefts, left, None if keep is None else keep.transpose(1, 2))
        return _LowRank(self.base, scale, lefts, _grown(self.rights, right, None), self.base_t)

    def factors(self) -> tuple:
        return self.base, self.scale, self.lefts, self.rights

    def dense(self, in_place: bool = False) -> Tensor:
        """``W_t`` as one tensor: a new one unless there is nothing to add to ``base``, or ``base``
        itself, overwritten (``in_place``: no allocation and copy of a ``W``-sized tensor)."""
        base, scale = self.base, self.scale
        if scale is not None:
            base = base.mul_(scale) if in_place else base * scale
        if self.lefts is None:
            return base
        if in_place or scale is not None:  # a tensor of our own: no extra copy
            return base.baddbmm_(self.lefts.transpose(1, 2), self.rights)
        return torch.baddbmm(base, self.lefts.transpose(1, 2), self.rights)

    def times(self, v: Tensor, base_product: Tensor | None = None) -> Tensor:
        """``v W_t`` (``v (T, B, n)``); ``base_product``: ``v base`` if already computed (then the
        scale must be per trial)."""
        if base_product is None:
            scaled = v if self.scale is None else v * self.scale.transpose(1, 2)
            out = _times(scaled, self.base) if self.base_t is None else _times(scaled, self.base_t, True)
        else:
            out = base_product if self.scale is None else base_product * self.scale
        return out if self.lefts is None else out.baddbmm(v @ self.lefts.transpose(1, 2), self.rights)

    def times_transposed(self, v: Tensor, base_product: Tensor | None = None) -> Tensor:
        """``v W_t^T`` (``v (T, B, m)``); ``base_product``: ``v base^T`` if already computed."""
        out = _times(v, self.base, True) if base_product is None else base_product
        out = out if self.scale is None else out * self.scale.transpose(1, 2)
        return out if self.lefts is None else out.baddbmm(v @ self.rights.transpose(1, 2), self.lefts)

    def inner(self, grad: Tensor, per_row: bool) -> Tensor:
        """``Σ G ⊙ W_t`` per trial ``(T, 1, 1)`` or per row ``(T, n, 1)`` for a dense ``G``, no
        ``W``-sized temporary where per trial."""
        scale = self.scale
        if per_row or (scale is not None and scale.shape[1] > 1):
            base = (grad * self.base).sum(2, keepdim=True)
        else:  # a dot product per trial
            base = _trial_dots(grad, self.base)
        base = base if scale is None else base * scale
        if not per_row:
            base = base.sum(1, keepdim=True)
        if self.lefts is None:
            return base
        if per_row:
            rows = (grad @ self.rights.transpose(1, 2)) * self.lefts.transpose(1, 2)
            return base + rows.sum(2, keepdim=True)
        return base + ((self.lefts @ grad) * self.rights).sum((1, 2)).view(-1, 1, 1)


class _Adjoint(_LowRank):
    """``dL/dW_t`` inside a recomputation segment: ``dL/dW_stop`` plus the factors of the steps
    since (:class:`_LowRank`, built backwards), and, for a layer with a decay, what its gradient
    ``Σ G ⊙ W_t`` needs without a pass over ``G``: ``weight`` (``W_start``, the base of the
    segment's weights), ``<G_stop, W_start>`` per trial (``base_inner``) and ``<L^T R, W_start>``
    of the factors since (``factors_inner``, per trial, kept in step with ``lefts``)."""

    def __init__(
        self, base, scale=None, lefts=None, rights=None, weight=None, base_inner=None, factors_inner=None
    ):
        super().__init__(base, scale, lefts, rights)
        self.weight, self.base_inner, self.factors_inner = weight, base_inner, factors_inner

    def updated(self, left, right, keep) -> _Adjoint:
        step = super().updated(left, right, keep)
        inner = self.factors_inner
        if self.weight is not None:  # per-trial decay: 1 - decay scales the rows as it does lefts
            inner = inner if inner is None or keep is None else inner * keep
            if left is not None:  # <left^T right, W_start> = Σ left ⊙ (right W_start^T), row-wise
                new = (left * _times(right, self.weight, True)).sum((1, 2)).view(-1, 1, 1)
                inner = new if inner is None else inner + new
        return _Adjoint(*step.factors(), self.weight, self.base_inner, inner)

    def inner(self, weight: _LowRank, lefts_grad: Tensor | None) -> Tensor:
        """``Σ G ⊙ W_t`` per trial ``(T, 1, 1)`` (per-trial scales) with ``W_t = weight``:
        ``s_W (s_G <G_stop, W_start> + <L_G^T R_G, W_start>) + Σ (L_W G) ⊙ R_W`` (``lefts_grad``:
        ``L_W G``)."""
        total = self.base_inner if self.scale is None else self.base_inner * self.scale
        if self.factors_inner is not None:
            total = total + self.factors_inner
        total = total if weight.scale is None else total * weight.scale
        if weight.lefts is not None:
            total = total + (lefts_grad * weight.rights).sum((1, 2)).view(-1, 1, 1)
        return total


class _Recording(Products):
    """The products of one step with ``W_t`` given as :class:`_LowRank`; keeps the outputs by
    ``(name, layer)``. ``input_product``: the first layer's ``x W_start^T``, made ahead for the
    segment (:data:`SEGMENT_INPUT_PRODUCT_SIZE`), or None."""

    def __init__(self, weights, input_product=None):
        super().__init__(weights)
        self.outputs: dict[tuple[str, int], Tensor] = {}
        self.input_product = input_product

    def _keep(self, key, value):
        self.outputs[key] = value
        return value

    def forward(self, index, y):
        base_product = self.input_product if index == 0 else None  # y = x: x W_start^T, made ahead
        return self._keep(("forward", index), self.weights[index].times_transposed(y, base_product))

    def backward(self, index, e):
        return self._keep(("backward", index), self.weights[index].times(e))

    def send(self, index, e, matrix):  # e B^T
        return self._keep(("send", index), _times(e, matrix, True))

    def wt_y(self, index, y):
        return self._keep(("wt_y", index), self.weights[index].times(y))


class _Linked(torch.autograd.Function):
    """A stored product ``out = v M`` (``M`` one of ``W_t^T``, ``W_t``, a feedback matrix) linked to
    its vector ``v`` without recomputing it: the gradient passes to ``out`` unchanged (``out`` is a
    leaf; its gradient and ``v`` are the rank-``B`` factors of ``dL/dW``) and to ``v`` as
    ``grad M^T``. ``M`` is the :class:`_LowRank` ``(base, scale, lefts, rights, base_t)``;
    ``transposed``: ``M = base^T`` (``out = v W^T``)."""

    @staticmethod
    def forward(ctx, v, out, base, scale, lefts, rights, base_t, transposed):
        ctx.save_for_backward(base, scale, lefts, rights, base_t)
        ctx.transposed = transposed
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        weight = _LowRank(*ctx.saved_tensors)
        grad_v = None
        if ctx.needs_input_grad[0]:  # not for x
            grad_v = weight.times(grad) if ctx.transposed else weight.times_transposed(grad)
        return grad_v, grad, None, None, None, None, None, None


class _Replay(Products):
    """The stored products of one step (``outputs``, leaves that require grad), linked to their
    vector arguments (kept in ``vectors``) by :class:`_Linked`; ``feedback``: the episode's
    matrices and their contiguous transposes."""

    def __init__(self, weights, outputs, feedback=()):
        super().__init__(weights)
        self.outputs, self.vectors, self.feedback = outputs, {}, feedback

    def _linked(self, name, index, v, weight, transposed):
        self.vectors[name, index] = v
        out = self.outputs[name, index]
        factors = (weight.base, weight.scale, weight.lefts, weight.rights, weight.base_t)
        return _Linked.apply(v, out, *factors, transposed)

    def forward(self, index, y):  # y W^T
        return self._linked("forward", index, y, self.weights[index], True)

    def backward(self, index, e):  # e W
        return self._linked("backward", index, e, self.weights[index], False)

    def send(self, index, e, matrix):  # e B^T
        matrix_t = next((t for b, t in self.feedback if b is matrix), None)
        return self._linked("send", index, e, _LowRank(matrix, base_t=matrix_t), True)

    def wt_y(self, index, y):  # y W
        return self._linked("wt_y", index, y, self.weights[index], False)


def _chunk(tensor: Tensor, step: int, batch: int) -> Tensor:
    return tensor[:, step * batch : (step + 1) * batch]


def _step_data(x_train: Tensor, y_train: Tensor, step: int, batch: int) -> tuple[Tensor, Tensor]:
    """One step's samples as fresh tensors: a compiled step would specialise on a view's offset."""
    return _chunk(x_train, step, batch).clone(), _chunk(y_train, step, batch).clone()


def _unrolled(learner, theta, state, x_train, y_train, batch, steps):
    """``steps`` steps as plain tensor code (outside autograd): the adapted state. ``W`` is a new
    tensor after the first step (never the caller's) and updated in place after that."""
    coefficients = learner.layer_coefficients(theta)
    for step in range(steps):
        products = Products(state.weights)
        x, y = _chunk(x_train, step, batch), _chunk(y_train, step, batch)
        factors, _, _ = learner.step_factors(state, {"theta": theta}, coefficients, x, y, products)
        weights = [apply_update(w, *f, out=None if step == 0 else w) for w, f in zip(state.weights, factors)]
        state = State(weights, state.feedback, state.biases)
    return state


def _segment_weights(kept, records, start, stop):
    """``[W_start, ..., W_{stop-1}]`` as :class:`_LowRank` from the kept ``W_start`` and the
    recorded factors: the same values as in the forward pass."""
    weights = [[_LowRank(w) for w in kept]]
    for step in range(start, stop - 1):
        weights.append(_next_weights(weights[-1], records[step]))
    return weights


def _segment_adjoints(grads, kept, records, start, stop):
    """``dL/dW_stop`` of each layer as the start of an :class:`_Adjoint` for the segment's steps
    (``dL/dW_t = (1 - decay) dL/dW_{t+1} + A^T C`` adds factors: no pass over ``G``), and per step
    the products with ``G = dL/dW_stop`` that the step needs, for all the segment's steps in one
    product each way (one pass over ``G`` instead of two per step): ``left G``, ``right G^T`` of
    its recorded update factors, and, with a decay, ``L_W G`` of its weight's factors. A layer
    with a per-row decay, or no update factors, keeps its dense adjoint, updated in place.

    ``kept``: the segment's first weights (dense). Returns the adjoints and a list (by step,
    ``start`` first) of per-layer ``(left G, right G^T, L_W G or None)`` (None for a dense layer)."""
    adjoints, per_step = [], [[] for _ in range(start, stop)]
    for layer, (grad, weight) in enumerate(zip(grads, kept)):
        factors = [records[step][1][layer] for step in range(start, stop)]
        keeps = [records[step][2][layer] for step in range(start, stop)]  # 1 - decay, None without
        if factors[0][0] is None or any(k is not None and k.shape[1] > 1 for k in keeps):
            adjoints.append(grad)
            for products in per_step:
                products.append(None)
            continue
        lefts, rights = zip(*((left, right) for left, right, _ in factors))
        sizes = [left.shape[1] for left in lefts]
        left_products = (torch.cat(lefts, 1) @ grad).split(sizes, 1)
        right_products = (torch.cat(rights, 1) @ grad.transpose(1, 2)).split(sizes, 1)
        if keeps[0] is None:
            adjoints.append(_Adjoint(grad))
            weight_lefts = [None] * len(factors)
        else:  # per trial: Σ G ⊙ W_t from <G_stop, W_start> and products with the factors
            adjoints.append(_Adjoint(grad, weight=weight, base_inner=_trial_dots(grad, weight)))
            weight_lefts, current = [], None  # L_W G of each step's W_t, as _LowRank.updated builds L_W
            for product, keep in zip(left_products, keeps):
                weight_lefts.append(current)
                current = _grown(current, product, keep)
        for products, triple in zip(per_step, zip(left_products, right_products, weight_lefts)):
            products.append(triple)
    return adjoints, per_step


class _InnerLoop(torch.autograd.Function):
    """The inner loop with a hand-scheduled backward (reverse mode through every step, exact)."""

    @staticmethod
    def forward(ctx, spec, theta, x_train, y_train, *tensors):
        learner, batch, segment, depth, n_feedback, (forward_step, _) = spec
        feedback = list(tensors[depth : depth + n_feedback])
        biases = list(tensors[depth + n_feedback :])
        steps = math.ceil(x_train.shape[1] / batch)
        segment = segment or 1  # 0: every W_t kept
        coefficients = learner.layer_coefficients(theta)
        dense, kept, records = list(tensors[:depth]), {}, {}
        for start in range(0, steps, segment):
            kept[start] = dense
            weights = [_LowRank(w) for w in dense]
            stop = min(start + segment, steps)
            input_products = [None] * (stop - start)
            if dense[0].numel() >= SEGMENT_INPUT_PRODUCT_SIZE:  # x W_start^T of the segment's steps
                inputs = x_train[:, start * batch : stop * batch]
                input_products = [p.contiguous() for p in _product(inputs, dense[0], True).split(batch, 1)]
            for step, input_product in zip(range(start, stop), input_products):
                x, y = _step_data(x_train, y_train, step, batch)
                records[step], weights = forward_step(
                    learner, weights, feedback, biases, theta, coefficients, x, y, input_product
                )
            dense = [w.dense() for w in weights]
        ctx.spec, ctx.kept, ctx.records, ctx.steps, ctx.segment = spec, kept, records, steps, segment
        ctx.save_for_backward(theta, x_train, y_train, *feedback, *biases)
        return tuple(dense)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_adapted):
        learner, batch, _, depth, n_feedback, (_, backward_step) = ctx.spec
        theta, x_train, y_train, *rest = ctx.saved_tensors
        feedback, biases = rest[:n_feedback], rest[n_feedback:]
        steps, segment = ctx.steps, ctx.segment
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
        # the replay's v B (the gradient of a sent e B^T) reads B^T row-wise: one copy per episode
        feedback_t = [b.transpose(-1, -2).contiguous() for b in feedback]
        for start in reversed(range(0, steps, segment)):
            stop = min(start + segment, steps)
            kept = ctx.kept.pop(start)
            inside = _segment_weights(kept, ctx.records, start, stop)
            grads, base_products = _segment_adjoints(grads, kept, ctx.records, start, stop)
            for step in reversed(range(start, stop)):
                weights, (outputs, _, keeps) = inside.pop(), ctx.records.pop(step)
                x, y = _step_data(x_train, y_train, step, batch)
                state = State(weights, feedback, biases)
                products = base_products.pop()
                direct, per_layer = backward_step(
                    learner, state, outputs, keeps, leaf, coefficients, grads, products, x, y, feedback_t
                )
                grad_theta += direct
                for total, grad in zip(grad_coefficients, per_layer):
                    total += grad
            # the segment's dense dL/dW_start over the dL/dW_stop it was built on (ours, used no more)
            grads = [g.dense(in_place=True) if isinstance(g, _Adjoint) else g for g in grads]
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


def _record_step(learner, weights, feedback, biases, theta, coefficients, x, y, input_product=None):
    """One step's vector part with ``W_t`` as :class:`_LowRank` (outside autograd): its products by
    ``(name, layer)``, the update factors of every layer and their decays' ``1 - decay`` (None
    without a decay), made once here for every use the episode has for them."""
    products = _Recording(weights, input_product)
    state = State(weights, feedback, biases)
    factors, _, _ = learner.step_factors(state, {"theta": theta}, coefficients, x, y, products)
    return products.outputs, factors, [None if decay is None else 1 - decay for _, _, decay in factors]


def _next_weights(weights, record):
    """The :class:`_LowRank` weights of the step after the one ``record`` (:func:`_record_step`)
    holds: each grown by that step's update factors and ``1 - decay``."""
    _, factors, keeps = record
    return [w.updated(left, right, keep) for w, (left, right, _), keep in zip(weights, factors, keeps)]


def _forward_step(learner, weights, feedback, biases, theta, coefficients, x, y, input_product=None):
    """One step of the forward pass: its record (:func:`_record_step`) and the next step's weights."""
    record = _record_step(learner, weights, feedback, biases, theta, coefficients, x, y, input_product)
    return record, _next_weights(weights, record)


def _replay_step(learner, weights, feedback, biases, theta, leaves, outputs, x, y, feedback_t):
    """The same step again under autograd on the stored ``outputs`` (leaves): the update factors
    and the vector argument of every product (``feedback_t``: the feedback matrices' contiguous
    transposes)."""
    replay = _Replay(weights, outputs, tuple(zip(feedback, feedback_t)))
    state = State(weights, feedback, biases)
    factors, _, _ = learner.step_factors(state, {"theta": theta}, leaves, x, y, replay)
    return factors, replay.vectors


#: Inner steps per recomputation segment by default (``trainer.recompute_segment``): with the
#: low-rank weights and adjoints a segment's factors grow with its length, and 8 measured faster
#: than 16 here (20 trials, alternating runs: pool 0.220-0.227 against 0.245-0.260 s per trial
#: eager, bio compiled 0.123-0.145 against 0.139-0.162), for 32 kept weight sets instead of 16.
RECOMPUTE_SEGMENT = 8

#: ``torch.compile``'s backend for ``trainer.compile`` (the tests trace with ``aot_eager``).
COMPILE_BACKEND = "inductor"


#: Graphs Dynamo may compile of each step function (``torch.compile``'s ``recompile_limit``; the
#: global default is 8). A rule and trial count take up to ~7 graphs of the backward step (the
#: segment's last, inner and first steps, each first with fixed then with dynamic factor counts),
#: so a process that runs several (the bench: two rules × two trial counts) went past 8 and
#: Dynamo silently ran the rest eagerly (pool 1 trial "compiled" 2.2 s against 0.6 s).
RECOMPILE_LIMIT = 64


@functools.cache
def compiled_steps(backend: str = COMPILE_BACKEND):
    """:func:`_forward_step` and :func:`_backward_step` under ``torch.compile`` (``trainer.compile``):
    one compiled function each instead of hundreds of small operators per step. The backward step
    is one graph with the replay's ``torch.autograd.grad`` in it (traced: Dynamo's
    ``trace_autograd_ops``, set for its calls only), its adjoint products and factors; compiled
    apart, the replay's forward and backward were two calls with the step's Python between them.
    A few graphs each (a segment's first step, whose weights have no factors yet, and the
    others, whose factor count varies: a dynamic dimension), compiled once per process, rule and
    trial count (at most :data:`RECOMPILE_LIMIT`)."""
    import torch._inductor.inductor_prims  # noqa: F401  (defines prims.inductor_force_stride_order: _times)

    forward_step = torch.compile(_forward_step, backend=backend, recompile_limit=RECOMPILE_LIMIT)
    backward_step = torch.compile(_backward_step, backend=backend, recompile_limit=RECOMPILE_LIMIT)

    tracing_autograd = torch._dynamo.config.patch(trace_autograd_ops=True)  # made once: 24 µs a call

    def traced_backward_step(*args):
        with tracing_autograd:
            return backward_step(*args)

    return forward_step, traced_backward_step


def _backward_step(
    learner, state, outputs, keeps, theta, coefficients, grads, base_products, x, y, feedback_t
):
    """Turn ``dL/dW_{t+1}`` (``grads``: an :class:`_Adjoint`, replaced, or a dense tensor, updated
    in place) into ``dL/dW_t``; return this step's gradients to ``theta`` (where used directly)
    and to each layer's ``coefficients`` (built from it). ``state.weights`` are :class:`_LowRank`;
    ``keeps``: the step's recorded ``1 - decay`` per layer (:func:`_record_step`);
    ``base_products``: per layer the products with an adjoint's base (:func:`_segment_adjoints`);
    ``feedback_t``: the feedback matrices' contiguous transposes (:func:`_replay_step`)."""
    with torch.enable_grad():
        leaves = [c.detach().requires_grad_() for c in coefficients]
        outputs = {key: out.detach().requires_grad_() for key, out in outputs.items()}
        factors, vectors = _replay_step(
            learner, state.weights, state.feedback, state.biases, theta, leaves, outputs, x, y, feedback_t
        )
        results, grad_outputs = [], []
        for weight, grad, products, (left, right, decay) in zip(state.weights, grads, base_products, factors):
            if isinstance(grad, _Adjoint):  # with update factors, no per-row decay (_segment_adjoints)
                left_product, right_product, weight_lefts = products
                rows, base_product = left.detach(), left_product
                if decay is not None and weight.lefts is not None:  # L_W G for the decay, in one product
                    rows = torch.cat([rows, weight.lefts], 1)
                    base_product = torch.cat([left_product, weight_lefts], 1)
                products, k = grad.times(rows, base_product), left.shape[1]
                results += [left, right]
                grad_outputs += [grad.times_transposed(right.detach(), right_product), products[:, :k]]
                if decay is not None:
                    results.append(decay)
                    grad_outputs.append(-grad.inner(weight, products[:, k:]))
                continue
            # a dense adjoint: a per-row decay, or no update factors (_segment_adjoints)
            if left is not None:  # W_{t+1} = ... + left^T right
                results += [left, right]
                grad_outputs += [right.detach() @ grad.transpose(1, 2), left.detach() @ grad]
            if decay is not None:  # W_{t+1} = W_t (1 - decay) + ..., decay (T, 1, 1) or per row (T, n, 1)
                results.append(decay)
                grad_outputs.append(-weight.inner(grad, decay.shape[1] > 1))
        keys = [key for key in outputs if key[0] != "send"]
        grad_theta, *rest = torch.autograd.grad(
            results, [theta, *leaves, *(outputs[key] for key in keys)], grad_outputs, allow_unused=True
        )
    per_layer, grad_products = rest[: len(leaves)], dict(zip(keys, rest[len(leaves) :]))
    sinks = [[] for _ in grads]  # the rank-B factors of this step's dL/dW_t: out = v W^T or v W
    for (name, index), grad in grad_products.items():
        if grad is not None:
            v = vectors[name, index].detach()
            sinks[index].append((grad, v) if name == "forward" else (v, grad))
    for layer, (grad, sink, keep) in enumerate(zip(grads, sinks, keeps)):
        lefts, rights = (torch.cat(side, 1) for side in zip(*sink)) if sink else (None, None)
        if isinstance(grad, _Adjoint):
            grads[layer] = grad.updated(lefts, rights, keep)
            continue
        if keep is not None:
            grad.mul_(keep)
        if sink:
            grad.baddbmm_(lefts.transpose(1, 2), rights)
    per_layer = [torch.zeros_like(c) if g is None else g for c, g in zip(coefficients, per_layer)]
    return (grad_theta if grad_theta is not None else torch.zeros_like(theta)), per_layer


def adapt(
    learner: Learner,
    state: State,
    meta,
    x_train: Tensor,
    y_train: Tensor,
    batch: int = 1,
    recompute_segment: int = RECOMPUTE_SEGMENT,
    compile: bool = False,
) -> State:
    """:func:`metaplast.core.inner_loop.adapt` with the hand-scheduled backward (``recompute_segment``
    steps per recomputation segment; 0 keeps every ``W_t``); ``compile`` runs each step's vector
    part compiled (:func:`compiled_steps`)."""
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
            return _unrolled(learner, theta, state, x_train, y_train, batch, steps)
    step_functions = compiled_steps(COMPILE_BACKEND) if compile else (_forward_step, _backward_step)
    spec = (learner, batch, recompute_segment, len(state.weights), len(state.feedback), step_functions)
    weights = _InnerLoop.apply(spec, theta, x_train, y_train, *state.weights, *state.feedback, *state.biases)
    return State(list(weights), state.feedback, state.biases)
