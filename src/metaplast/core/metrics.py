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
    - ``orth`` (T, L): E_W,ℓ = Σ_query ‖z_ℓ - W W^T y_ℓ‖² for ℓ = 1..L (Eqs. 11-12);
    - ``update_cos`` (T, L), with ``meta``: per layer, the cosine between the rule's update on the
      query batch and the negative gradient of its loss (:func:`update_gradient_cosine`);
    - ``fb_angle`` (T, ·), for a pathway with matrices: ∠(W^T, B) (:func:`feedback_weight_angles`).
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
    if meta is not None and "theta" in meta:
        metrics["update_cos"] = update_gradient_cosine(learner, state, meta, x_query, y_query)[0]
    angles = feedback_weight_angles(learner, state)
    if angles is not None:
        metrics["fb_angle"] = angles
    return metrics


def _flat_cosine(u: Tensor, v: Tensor) -> Tensor:
    """Cosine per trial of two ``(T, ...)`` tensors flattened; 0 where either is zero."""
    u, v = u.reshape(u.shape[0], -1), v.reshape(v.shape[0], -1)
    norm = u.norm(dim=1) * v.norm(dim=1)
    return torch.where(norm > 0, (u * v).sum(1) / norm.clamp_min(torch.finfo(u.dtype).tiny), 0.0)


def update_gradient_cosine(
    learner: Learner, state: State, meta, x: Tensor, target: Tensor
) -> tuple[Tensor, State]:
    """Per layer, the cosine between the update the learner makes on the batch ``(x, target)`` and
    the negative gradient of that batch's loss (its mean over samples) at the same weights (FLP
    paper Fig. 2C), shape ``(T, L)``; a frozen layer (no update) gets 0. Also returns the state
    after the step, so a stream can be followed step by step."""
    with torch.enable_grad():
        weights = [w.detach().requires_grad_() for w in state.weights]
        _, zs = learner.network.forward(weights, x, state.biases)
        loss = learner.network.sample_loss(zs[-1], target).mean(1).sum()
        grads = torch.autograd.grad(loss, weights)
    with torch.no_grad():
        after = learner.step(state, meta, x, target)
        cos = torch.stack(
            [_flat_cosine(w1 - w0, -g) for w0, w1, g in zip(state.weights, after.weights, grads)], dim=1
        )
    return cos, after


def feedback_weight_angles(learner: Learner, state: State) -> Tensor | None:
    """∠(W^T, B) per feedback matrix in degrees, ``(T, ·)`` (None for a pathway without matrices).

    Layer by layer (FA): ``B_{ℓ+1,ℓ}`` against ``W_{ℓ,ℓ+1}^T``, ℓ = 0..L-1. Direct (DFA, FLP):
    ``B_{L,ℓ}`` against the transpose of the linear path ``W_{L-1,L} ⋯ W_{ℓ,ℓ+1}`` that BP's error
    would take to layer ℓ (without the activation slopes)."""
    feedback, weights = state.feedback, state.weights
    if not feedback or not learner.pathway.has_matrices:
        return None
    angles = []
    for index, b in enumerate(feedback):
        if learner.pathway.direct:
            path = weights[-1]
            for w in reversed(weights[index:-1]):
                path = path @ w
            reference = path.transpose(-1, -2)
        else:
            reference = weights[index].transpose(-1, -2)
        cos = _flat_cosine(b, reference).clamp(-1.0, 1.0)
        angles.append(torch.rad2deg(torch.arccos(cos)))
    return torch.stack(angles, dim=1)


# ---------------------------------------------------------------- analyses of one stream (FLP paper §7)


@torch.no_grad()
def follow_stream(
    learner: Learner,
    state: State,
    meta,
    x_train: Tensor,
    y_train: Tensor,
    batch: int,
    x_query: Tensor | None = None,
    record_at=(),
) -> dict:
    """Adapt on the stream step by step (no meta-gradient), measuring along the way.

    Returns ``state`` (adapted), ``cos`` ``(T, steps, L)``: each step's update-gradient cosine per
    layer (:func:`update_gradient_cosine`), ``update_norm`` ``(T, steps, L)``: ‖ΔW_ℓ‖ of each step,
    and ``outputs``: ``{step: y_L on x_query}`` before each step in ``record_at`` (``steps`` itself:
    after the last)."""
    steps = -(-x_train.shape[1] // batch)
    coses, norms, outputs = [], [], {}
    record_at = set(record_at)

    def record(step):
        if x_query is not None and step in record_at:
            ys, _ = learner.network.forward(state.weights, x_query, state.biases)
            outputs[step] = ys[-1]

    for step in range(steps):
        record(step)
        chunk = slice(step * batch, (step + 1) * batch)
        cos, after = update_gradient_cosine(learner, state, meta, x_train[:, chunk], y_train[:, chunk])
        coses.append(cos)
        norms.append(
            torch.stack([(w1 - w0).flatten(1).norm(dim=1) for w0, w1 in zip(state.weights, after.weights)], 1)
        )
        state = after
    record(steps)
    return {
        "state": state,
        "cos": torch.stack(coses, 1),
        "update_norm": torch.stack(norms, 1),
        "outputs": outputs,
    }


def stream_blocks(groups: Tensor, batch: int) -> list[int]:
    """The steps at which a continual stream's blocks start (one class or function each), from the
    group of every sample ``(T, S)``; the last entry is the number of steps. Each step must lie in one
    block and the blocks must start at the same steps in every trial (ValueError otherwise)."""
    steps = -(-groups.shape[1] // batch)
    padded = torch.nn.functional.pad(groups, (0, steps * batch - groups.shape[1]), value=-1)
    per_step = padded.reshape(groups.shape[0], steps, batch)
    first = per_step[:, :, :1]
    if ((per_step != first) & (per_step != -1)).any():
        raise ValueError("a step of the stream mixes two blocks (classes or functions); no block structure")
    first = first[..., 0]
    change = (first[:, 1:] != first[:, :-1]).any(0)
    if ((first[:, 1:] != first[:, :-1]) != change).any():
        raise ValueError("the stream's blocks start at different steps in different trials")
    return [0, *(change.nonzero().flatten() + 1).tolist(), steps]


def forgetting(
    outputs: dict[int, Tensor], blocks: list[int], train_groups: Tensor, query_groups: Tensor, batch: int
) -> Tensor:
    """FLP paper Fig. 2B: for each block n ≥ 1 of a continual stream, the mean squared change of the
    network's outputs on the query samples of the groups (functions, classes) of blocks 0..n-1,
    between before and after block n; ``(T, blocks)``, NaN for block 0. ``outputs[s]`` holds the
    outputs ``(T, Q, O)`` on the query set before step s (:func:`follow_stream`); the squared change
    is averaged over output units and those queries."""
    T = train_groups.shape[0]
    result = torch.full((T, len(blocks) - 1), float("nan"), dtype=outputs[blocks[0]].dtype)
    for n in range(1, len(blocks) - 1):
        change = (outputs[blocks[n + 1]] - outputs[blocks[n]]).pow(2).mean(-1)  # (T, Q)
        for t in range(T):
            earlier = train_groups[t, : blocks[n] * batch].unique()
            mask = torch.isin(query_groups[t], earlier)
            if mask.any():
                result[t, n] = change[t, mask].mean()
    return result


@torch.no_grad()
def readout_fit(
    learner: Learner,
    state: State,
    x_train: Tensor,
    y_train: Tensor,
    x_query: Tensor,
    y_query: Tensor,
    ridge: float = 1e-4,
) -> Tensor:
    """The frozen-features control (FLP paper Fig. 2A): the layers below the readout frozen at
    ``state``, the readout fitted to the whole training stream to convergence (ridge least squares
    with a bias, ``ridge`` λ; to one-hot targets for a classifier), scored on the query set: the
    MSE of a regressor, the error rate of a classifier, per trial ``(T,)``."""
    net = learner.network
    features = [net.forward(state.weights, x, state.biases)[0][-2] for x in (x_train, x_query)]
    h, hq = (torch.cat([f, torch.ones_like(f[..., :1])], -1).double() for f in features)
    if net.loss == "cross_entropy":
        target = F.one_hot(y_train, net.sizes[-1]).double()
    else:
        target = y_train.double()
    gram = h.transpose(1, 2) @ h + ridge * torch.eye(h.shape[-1], dtype=h.dtype)
    readout = torch.linalg.solve(gram, h.transpose(1, 2) @ target)
    prediction = hq @ readout
    if net.loss == "cross_entropy":
        return (prediction.argmax(-1) != y_query).double().mean(1)
    return (prediction - y_query.double()).pow(2).mean((1, 2))
