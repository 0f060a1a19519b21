"""FLP (Lindsey & Litwin-Kumar 2020) against its formulas: feedback that changes activations, the
local rule w ← w + α (a b - b² w) per synapse, frozen layers; its meta-gradient in every
meta-parameter (α per synapse, β, feedback biases, B, initial weights and biases) by finite
differences."""

import pytest
import torch

from core_helpers import generators, learner_for
from metaplast.core.inner_loop import adapt
from metaplast.core.learner import State
from metaplast.core.rules import Rule

SIZES = [4, 6, 5, 3]


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def flp_learner(per_layer=("flp", "flp", "flp"), loss="cross_entropy"):
    rule = Rule.build(None, 3, list(per_layer))
    return learner_for("flp", SIZES, rule, activation="relu", bias=True, loss=loss, share="synapse")


def meta_for(learner, trials=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    alpha = [torch.rand(s, generator=g) * 0.1 for s in learner.theta_shape(trials)]
    own = learner.pathway.meta_parameters(trials, SIZES)
    own = {k: v + torch.randn(v.shape, generator=g) * 0.3 for k, v in own.items()}
    return {"theta": alpha, **own}


def test_feedback_changes_hidden_activations_and_clamps_the_output():
    learner = flp_learner()
    weights = learner.network.init_weights(generators(1))
    feedback = learner.pathway.init_feedback(SIZES, generators(1, seed=2))
    meta = meta_for(learner, trials=1)
    x, label = torch.rand(1, 1, 4), torch.tensor([[2]])
    ys, zs = learner.network.forward(weights, x)
    post = learner.pathway.feedback_activations(ys, zs, label, feedback, meta)
    target = torch.nn.functional.one_hot(label, 3).double()
    beta = torch.sigmoid(meta["flp_beta"][0])
    bias = torch.split(meta["flp_bias"][0], [6, 5])
    for layer in (1, 2):
        drive = torch.relu(feedback[layer][0] @ target[0, 0] - bias[layer - 1])
        expected = (1 - beta[layer - 1]) * ys[layer][0, 0] + beta[layer - 1] * drive
        torch.testing.assert_close(post[layer][0, 0], expected)
    torch.testing.assert_close(post[-1], target)
    torch.testing.assert_close(post[0], x)
    # a regressor feeds back its error target - y_L, and its output is clamped to the target
    regressor = flp_learner(loss="mse")
    y_target = torch.randn(1, 1, 3)
    post = regressor.pathway.feedback_activations(ys, zs, y_target, feedback, meta)
    drive = torch.relu(feedback[1][0] @ (y_target - ys[-1])[0, 0] - bias[0])
    torch.testing.assert_close(post[1][0, 0], (1 - beta[0]) * ys[1][0, 0] + beta[0] * drive)
    torch.testing.assert_close(post[-1], y_target)


def test_the_local_rule_is_w_plus_alpha_times_ab_minus_b_squared_w_per_synapse():
    learner = flp_learner(per_layer=("none", "flp", "flp"))
    weights = learner.network.init_weights(generators(1))
    feedback = learner.pathway.init_feedback(SIZES, generators(1, seed=2))
    meta = meta_for(learner, trials=1)
    x, label = torch.rand(1, 1, 4), torch.tensor([[1]])
    biases = [torch.zeros(1, 1, n) for n in SIZES[1:]]
    after = learner.step(State(weights, feedback, biases), meta, x, label)
    ys, zs = learner.network.forward(weights, x, biases)
    post = learner.pathway.feedback_activations(ys, zs, label, feedback, meta)
    torch.testing.assert_close(after.weights[0], weights[0])  # 'none': frozen
    for layer in (1, 2):
        a, b, W = ys[layer][0, 0], post[layer + 1][0, 0], weights[layer][0]  # a before, b after feedback
        alpha = meta["theta"][layer][0, ..., 0]
        expected = W + alpha * (torch.outer(b, a) - (b**2)[:, None] * W)
        torch.testing.assert_close(after.weights[layer][0], expected)


def test_flp_meta_gradient_in_every_meta_parameter_passes_finite_differences():
    learner = flp_learner(per_layer=("none", "flp", "flp"))
    weights = learner.network.init_weights(generators(2))
    g = torch.Generator().manual_seed(4)
    feedback = [(b * 2).requires_grad_() for b in learner.pathway.init_feedback(SIZES, generators(2, seed=2))]
    first = weights[0].clone().requires_grad_()
    biases = [(torch.randn(2, 1, n, generator=g) * 0.1).requires_grad_() for n in SIZES[1:]]
    meta = meta_for(learner)
    leaves = [*meta["theta"][1:], meta["flp_beta"], meta["flp_bias"], feedback[2], first, biases[0]]
    for leaf in leaves:
        leaf.requires_grad_()
    x, y = torch.rand(2, 5, 4, generator=g), torch.randint(0, 3, (2, 5), generator=g)
    xq, yq = torch.rand(2, 4, 4, generator=g), torch.randint(0, 3, (2, 4), generator=g)

    def loss():
        state = State([first, *weights[1:]], feedback, biases)
        return learner.query_loss(adapt(learner, state, meta, x, y), xq, yq).sum()

    grads = torch.autograd.grad(loss(), leaves)
    h = 1e-6
    for leaf, grad in zip(leaves, grads):
        assert grad.abs().max() > 1e-8
        for index in torch.randperm(leaf.numel(), generator=g)[:4].tolist():
            with torch.no_grad():
                base = leaf.view(-1)[index].item()
                leaf.view(-1)[index] = base + h
                up = loss().item()
                leaf.view(-1)[index] = base - h
                down = loss().item()
                leaf.view(-1)[index] = base
            assert grad.reshape(-1)[index].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)


def test_frozen_layers_need_a_plastic_one():
    with pytest.raises(ValueError, match="every layer frozen"):
        Rule.build(None, 2, ["none", "none"])
    assert Rule.build(None, 3, ["none", "none", "flp"]).label == "[none,none,flp]"
