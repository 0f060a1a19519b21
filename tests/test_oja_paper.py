"""The Oja paper's pieces against direct computations: per-layer analyses, the RNN's BPTT and
BPTT+Oja updates (autograd, the literal formulas), the naive initialisation."""

import numpy as np
import pytest
import torch

from core_helpers import generators, learner_for
from metaplast.core.analyses import (
    activation_norms,
    explained_variance,
    reconstruct_input,
    reconstruction_error,
    update_norms,
)
from metaplast.core.inner_loop import adapt
from metaplast.core.learner import State
from metaplast.core.networks import init_weights
from metaplast.core.recurrent import RNN, RecurrentLearner
from metaplast.core.rules import Rule


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


SIZES = [9, 7, 6, 4]


def batch(trials=2, count=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(trials, count, SIZES[0], generator=g), torch.randint(
        0, SIZES[-1], (trials, count), generator=g
    )


def test_activation_norms_and_eq2_reconstruction_error_against_loops():
    learner = learner_for("bp", SIZES)
    weights = init_weights(SIZES, generators(2))
    x, _ = batch()
    ys, _ = learner.network.forward(weights, x)
    norms, errors = activation_norms(ys), reconstruction_error(learner.network, weights, ys)
    assert norms.shape == (2, 4) and errors.shape == (2, 2)
    for t in range(2):
        for layer, y in enumerate(ys):
            expected = np.mean([np.linalg.norm(y[t, i].numpy()) for i in range(5)])
            assert norms[t, layer].item() == pytest.approx(expected)
        for layer in (1, 2):  # Eq. 2 for the hidden layers
            W = weights[layer - 1][t]
            terms = []
            for i in range(5):
                y_pre = ys[layer - 1][t, i]
                code = torch.nn.functional.softplus(W @ y_pre, beta=10)
                terms.append(((y_pre - W.T @ code) ** 2).sum())
            assert errors[t, layer - 1].item() == pytest.approx(torch.stack(terms).mean().item())


def test_explained_variance_is_pca_by_svd():
    g = torch.Generator().manual_seed(1)
    data = torch.randn(3, 40, 6, generator=g) @ torch.randn(3, 6, 6, generator=g)
    got = explained_variance(data)
    for t in range(3):
        centred = data[t] - data[t].mean(0)
        _, s, _ = torch.linalg.svd(centred)
        expected = (s**2).cumsum(0) / (s**2).sum()
        torch.testing.assert_close(got[t], expected)
        # the same as the eigenvalues of the covariance matrix, largest first
        eig = np.sort(np.linalg.eigvalsh(np.cov(data[t].numpy().T)))[::-1]
        np.testing.assert_allclose(got[t].numpy(), eig.cumsum() / eig.sum(), rtol=1e-10)
    assert got[:, -1].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_reconstruction_through_transposed_weights():
    weights = init_weights(SIZES, generators(1))
    y2 = torch.rand(1, 3, SIZES[2])
    got = reconstruct_input(weights, y2, layer=2)
    expected = (weights[0][0].T @ (weights[1][0].T @ y2[0].T)).T
    torch.testing.assert_close(got[0], expected)


def test_update_norms_of_bp_f0_equal_backprop_and_oja_differs():
    weights = init_weights(SIZES, generators(2))
    x, y = batch(count=1)
    theta = torch.tensor([[0.05], [0.2]])
    rule, backprop = update_norms(learner_for("bp", SIZES), State(weights), {"theta": theta}, x, y)
    torch.testing.assert_close(rule, backprop)
    oja = learner_for("bp", SIZES, "oja")
    rule, backprop_oja = update_norms(
        oja, State(weights), {"theta": torch.tensor([[0.05, 0.3], [0.2, 0.3]])}, x, y
    )
    torch.testing.assert_close(backprop_oja, backprop)
    assert (rule - backprop).abs().max() > 1e-3


# ---------------------------------------------------------------- the RNN (Fig. 7)


def rnn_learner(rule="f0", activation="softplus", length=7, show=2):
    return RecurrentLearner(
        RNN(5, 6, 3, show=show, length=length, activation=activation), Rule.build(rule, 1)
    )


def rnn_data(trials=2, count=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(trials, count, 5, generator=g), torch.randint(0, 3, (trials, count), generator=g)


@pytest.mark.parametrize("activation", ["softplus", "relu"])
def test_bptt_update_is_minus_theta_times_the_autograd_gradient(activation):
    learner = rnn_learner(activation=activation)
    weights = learner.network.init_weights(generators(2))
    x, y = rnn_data()
    theta = torch.tensor([[0.1], [0.3]])
    after = learner.step(State(weights), {"theta": theta}, x, y)
    leaves = [w.clone().requires_grad_() for w in weights]
    loss = torch.nn.functional.cross_entropy(
        learner.network.logits(leaves, x).flatten(0, 1), y.flatten(), reduction="sum"
    )
    grads = torch.autograd.grad(loss, leaves)
    for w0, w1, g in zip(weights, after.weights, grads):
        assert g.abs().max() > 1e-6
        torch.testing.assert_close(w1 - w0, -theta[:, :, None] * g)


def test_bptt_plus_oja_adds_the_papers_combined_term_written_out():
    learner = rnn_learner("oja")
    weights = learner.network.init_weights(generators(1))
    x, y = rnn_data(trials=1, count=1)
    theta = torch.tensor([[0.0, 0.2]])  # θ_1 = 0: only the Oja part moves W_h
    after = learner.step(State(weights), {"theta": theta}, x, y)
    W = weights[1][0]
    zs = [z[0, 0] for z in learner.network.states(weights, x)]
    expected = torch.zeros_like(W)
    for z in zs[:-1]:  # θ_2 Σ_t (W_h σ(z_t) z_t^T - W_h σ(z_t) σ(z_t)^T W_h^T W_h), z_t before σ
        h = torch.nn.functional.softplus(z, beta=10)
        expected += torch.outer(W @ h, z) - torch.outer(W @ h, h) @ W.T @ W
    torch.testing.assert_close(after.weights[1][0] - W, 0.2 * expected)
    torch.testing.assert_close(after.weights[0], weights[0])  # θ_1 = 0: W_x, W_o unchanged
    torch.testing.assert_close(after.weights[2], weights[2])


def test_rnn_meta_gradient_through_the_unrolled_loop_passes_finite_differences():
    learner = rnn_learner("oja")
    weights = learner.network.init_weights(generators(2))
    x, y = rnn_data(count=4)
    xq, yq = rnn_data(count=3, seed=1)
    theta = torch.tensor([[0.1, 0.01], [0.2, 0.02]], requires_grad=True)

    def loss():
        return learner.query_loss(adapt(learner, State(weights), {"theta": theta}, x, y), xq, yq).sum()

    (grad,) = torch.autograd.grad(loss(), theta)
    h = 1e-6
    for index in range(theta.numel()):
        with torch.no_grad():
            base = theta.view(-1)[index].item()
            theta.view(-1)[index] = base + h
            up = loss().item()
            theta.view(-1)[index] = base - h
            down = loss().item()
            theta.view(-1)[index] = base
        assert grad.view(-1)[index].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)


def test_the_rnn_sees_the_image_for_show_steps_then_blanks():
    net = RNN(5, 6, 3, show=2, length=5)
    x = torch.ones(1, 1, 5)
    inputs = net.inputs(x)
    assert len(inputs) == 5 and [float(i.sum()) for i in inputs] == [5.0, 5.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="the recurrent network takes rule f0 .* or oja"):
        RecurrentLearner(net, Rule.build("bio", 1))
    with pytest.raises(ValueError, match="allowed 1 <= show <= length"):
        RNN(5, 6, 3, show=6, length=5)
