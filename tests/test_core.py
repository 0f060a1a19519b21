"""The core against independent references: literal formulas, autograd, finite differences."""

import pytest
import torch

from core_helpers import adapted_weights, generators, learner_for
from metaplast import reference
from metaplast.core.learner import State
from metaplast.core.meta import regulariser
from metaplast.core.metrics import episode_metrics
from metaplast.core.networks import BETA, forward, init_weights
from metaplast.core.pathways import make_pathway
from metaplast.core.rules import NAMED_RULES, Rule, resolve_rule
from metaplast.core.terms import TERM_IDS, plasticity_update


@pytest.fixture(autouse=True)
def float64():
    """The core is checked in double precision; the default is restored for other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def init_feedback(kind, sizes, gens):
    return make_pathway(kind).init_feedback(sizes, gens)


def random_layer(trials, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return (
        r(trials, n, m) * 0.3,
        r(trials, 1, m).abs(),
        r(trials, 1, n).abs(),
        r(trials, 1, m),
        r(trials, 1, n),
    )


@pytest.mark.parametrize("shape", [(3, 5), (7, 4), (1, 6), (6, 6)])
@pytest.mark.parametrize("term", TERM_IDS)
def test_each_factorised_term_equals_literal_dense_formula(shape, term):
    n, m = shape
    trials = 3
    W, y_pre, y_post, e_pre, e_post = random_layer(trials, n, m, seed=n * 10 + m + term)
    z_post = y_pre @ W.transpose(1, 2)
    theta = torch.zeros(trials, 10)
    theta[:, term] = torch.tensor([0.7, -1.3, 2.1])
    got = plasticity_update(W, theta, [term], y_pre, y_post, e_pre, e_post, z_post) - W
    for t in range(trials):
        dense = reference.dense_terms(W[t], y_pre[t, 0], y_post[t, 0], e_pre[t, 0], e_post[t, 0])[term]
        torch.testing.assert_close(got[t], theta[t, term] * dense, rtol=1e-12, atol=1e-12)


def test_full_pool_update_is_the_sum_of_terms():
    W, y_pre, y_post, e_pre, e_post = random_layer(2, 5, 4, seed=1)
    z_post = y_pre @ W.transpose(1, 2)
    theta = torch.randn(2, 10, generator=torch.Generator().manual_seed(3))
    got = plasticity_update(W, theta, TERM_IDS, y_pre, y_post, e_pre, e_post, z_post)
    for t in range(2):
        terms = reference.dense_terms(W[t], y_pre[t, 0], y_post[t, 0], e_pre[t, 0], e_post[t, 0])
        expected = W[t] + sum(theta[t, r] * terms[r] for r in TERM_IDS)
        torch.testing.assert_close(got[t], expected)


def test_bp_with_f0_update_is_minus_theta0_times_autograd_gradient():
    sizes = [12, 9, 7, 5]
    weights = init_weights(sizes, generators(2))
    x = torch.rand(2, 1, 12, generator=torch.Generator().manual_seed(5))
    label = torch.tensor([[3], [1]])
    theta = torch.tensor([[0.05], [0.2]])
    adapted = adapted_weights(learner_for("bp", sizes), weights, [], theta, x, label)
    leaves = [w.clone().requires_grad_() for w in weights]
    _, zs = forward(leaves, x)
    loss = torch.nn.functional.cross_entropy(zs[-1].flatten(0, 1), label.flatten(), reduction="sum")
    grads = torch.autograd.grad(loss, leaves)
    for w, new, g in zip(weights, adapted, grads):
        torch.testing.assert_close(new - w, -theta[:, :, None] * g)


def test_synthetic_input_error_follows_eq_24():
    sizes = [6, 5, 4]
    weights = init_weights(sizes, generators(1))
    feedback = init_feedback("fa", sizes, generators(1, seed=9))
    x = torch.rand(1, 1, 6)
    learner = learner_for("fa", sizes)
    ys, zs = learner.network.forward(weights, x)
    e_out = ys[-1] - torch.nn.functional.one_hot(torch.tensor([[2]]), 4)
    es = learner.pathway.teaching_signals(learner.network, ys, zs, e_out, weights, feedback)
    expected = (feedback[0][0] @ es[1][0, 0]) * (1 - torch.exp(-BETA * x[0, 0]))
    torch.testing.assert_close(es[0][0, 0], expected)


@pytest.mark.parametrize("kind", ["bp", "fa", "dfa"])
def test_batched_inner_loop_equals_literal_reference_per_trial(kind):
    sizes = [10, 8, 6, 5]
    trials = 3
    weights = init_weights(sizes, generators(trials))
    feedback = init_feedback(kind, sizes, generators(trials, seed=50))
    g = torch.Generator().manual_seed(2)
    x = torch.rand(trials, 6, 10, generator=g)
    y = torch.randint(0, 5, (trials, 6), generator=g)
    theta = torch.randn(trials, 10, generator=g) * 0.05
    adapted = adapted_weights(learner_for(kind, sizes, "pool"), weights, feedback, theta, x, y)
    for t in range(trials):
        ws = [w[t] for w in weights]
        fb = [b[t] for b in feedback]
        coeffs = {r: theta[t, r] for r in TERM_IDS}
        for step in range(6):
            ws = reference.inner_step(ws, fb, kind, coeffs, x[t, step], int(y[t, step]), BETA)
        for got, expected in zip(adapted, ws):
            torch.testing.assert_close(got[t], expected)


def test_fa_and_dfa_feedback_stay_fixed_while_bp_follows_w():
    sizes = [8, 6, 4]
    weights = init_weights(sizes, generators(2))
    x = torch.rand(2, 5, 8)
    y = torch.randint(0, 4, (2, 5))
    theta = torch.full((2, 1), 0.5)
    for kind in ("fa", "dfa"):
        learner = learner_for(kind, sizes)
        feedback = init_feedback(kind, sizes, generators(2, seed=7))
        before = [b.clone() for b in feedback]
        state = State(weights, feedback)
        adapted = learner.step(state, {"theta": theta}, x[:, :1], y[:, :1])
        assert not torch.allclose(adapted.weights[0], weights[0])
        assert all(torch.equal(b0, b1) for b0, b1 in zip(before, adapted.feedback))
    # BP sends e through the current W^T: e_{l-1} of the adapted weights uses those weights
    learner = learner_for("bp", sizes)
    adapted = adapted_weights(learner, weights, [], theta, x, y)
    ys, zs = learner.network.forward(adapted, x[:, :1])
    e_out = ys[-1] - torch.nn.functional.one_hot(y[:, :1], 4)
    es = learner.pathway.teaching_signals(learner.network, ys, zs, e_out, adapted, [])
    expected = (e_out @ adapted[1]) * (1 - torch.exp(-BETA * ys[1]))
    torch.testing.assert_close(es[1], expected)


def meta_objective(theta, rule, kind, reg, lam, data, feedback, weights, grad_through_b=True):
    sizes = [weights[0].shape[-1], *(w.shape[-2] for w in weights)]
    learner = learner_for(kind, sizes, rule, exact=grad_through_b)
    adapted = adapted_weights(learner, weights, feedback, theta, data[0], data[1])
    loss = learner.query_loss(State(adapted), data[2], data[3])
    return (loss + lam * regulariser(theta, reg)).sum()


@pytest.mark.parametrize("rule_name", ["bio", "pool"])
@pytest.mark.parametrize("kind", ["bp", "fa", "dfa"])
@pytest.mark.parametrize("reg", ["none", "l1", "l2"])
def test_meta_gradient_equals_central_finite_differences(rule_name, kind, reg):
    sizes = [7, 5, 4, 3]
    trials = 2
    weights = init_weights(sizes, generators(trials))
    feedback = init_feedback(kind, sizes, generators(trials, seed=40))
    g = torch.Generator().manual_seed(11)
    data = (
        torch.rand(trials, 4, 7, generator=g),
        torch.randint(0, 3, (trials, 4), generator=g),
        torch.rand(trials, 5, 7, generator=g),
        torch.randint(0, 3, (trials, 5), generator=g),
    )
    rule = Rule.build(rule_name, 3)
    theta = (torch.rand(trials, len(rule.terms), generator=g) - 0.5) * 0.4 + 0.05
    theta = theta.requires_grad_()
    lam = 0.3
    (grad,) = torch.autograd.grad(meta_objective(theta, rule, kind, reg, lam, data, feedback, weights), theta)
    h = 1e-6
    numeric = torch.zeros_like(theta)
    with torch.no_grad():
        for index in range(theta.numel()):
            delta = torch.zeros(theta.numel())
            delta[index] = h
            delta = delta.view_as(theta)
            up = meta_objective(theta + delta, rule, kind, reg, lam, data, feedback, weights)
            down = meta_objective(theta - delta, rule, kind, reg, lam, data, feedback, weights)
            numeric.view(-1)[index] = (up - down) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-7)


def test_bp_gradient_switch_treats_b_as_constant():
    sizes = [6, 5, 3]
    weights = init_weights(sizes, generators(1))
    data = (
        torch.rand(1, 4, 6),
        torch.randint(0, 3, (1, 4)),
        torch.rand(1, 3, 6),
        torch.randint(0, 3, (1, 3)),
    )
    rule = Rule.build("f0", 2)
    theta = torch.tensor([[0.3]], requires_grad=True)
    exact = torch.autograd.grad(meta_objective(theta, rule, "bp", "none", 0, data, [], weights), theta)[0]
    const = torch.autograd.grad(
        meta_objective(theta, rule, "bp", "none", 0, data, [], weights, False), theta
    )[0]
    assert not torch.allclose(exact, const)
    # Same forward values either way.
    with torch.no_grad():
        a = meta_objective(theta, rule, "bp", "none", 0, data, [], weights)
        b = meta_objective(theta, rule, "bp", "none", 0, data, [], weights, False)
    torch.testing.assert_close(a, b)


def test_regularisers_match_formulas():
    theta = torch.tensor([[3.0, -4.0], [0.0, 1.0]])
    torch.testing.assert_close(regulariser(theta, "l1"), torch.tensor([7.0, 1.0]))
    torch.testing.assert_close(regulariser(theta, "l2"), torch.tensor([5.0, 1.0]))
    torch.testing.assert_close(regulariser(theta, "none"), torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="'l3'.*none, l1, l2"):
        regulariser(theta, "l3")


def test_rule_resolution_and_per_layer_rules():
    assert resolve_rule("bio") == (0, 2, 9)
    assert resolve_rule([9, 0]) == (0, 9)
    assert NAMED_RULES["pool"] == tuple(range(10))
    with pytest.raises(ValueError, match="'hebb'.*f0, pool, bio, ehebb, oja"):
        resolve_rule("hebb")
    with pytest.raises(ValueError, match=r"\[12\]"):
        resolve_rule([0, 12])
    rule = Rule.build(None, 3, per_layer=["f0", "ehebb", "f0"])
    assert rule.terms == (0, 2) and rule.layer_terms == ((0,), (0, 2), (0,))
    with pytest.raises(ValueError, match="2 entries but the network has 3 layers"):
        Rule.build(None, 3, per_layer=["f0", "ehebb"])


def test_per_layer_rule_applies_ehebb_only_where_assigned():
    sizes = [8, 6, 5, 4]
    weights = init_weights(sizes, generators(1))
    feedback = init_feedback("fa", sizes, generators(1, seed=3))
    x, y = torch.rand(1, 3, 8), torch.randint(0, 4, (1, 3))
    theta = torch.tensor([[0.1, 0.4]])
    learner = learner_for("fa", sizes, Rule.build(None, 3, ["f0", "ehebb", "f0"]))
    adapted = adapted_weights(learner, weights, feedback, theta, x, y)
    ws = [w[0] for w in weights]
    layer_coeffs = [{0: theta[0, 0]}, {0: theta[0, 0], 2: theta[0, 1]}, {0: theta[0, 0]}]
    for step in range(3):
        ws = reference.inner_step(
            ws, [b[0] for b in feedback], "fa", layer_coeffs, x[0, step], int(y[0, step]), BETA
        )
    for got, expected in zip(adapted, ws):
        torch.testing.assert_close(got[0], expected)


def test_metrics_against_direct_formulas():
    sizes = [9, 7, 5, 4]
    weights = init_weights(sizes, generators(2))
    feedback = init_feedback("fa", sizes, generators(2, seed=21))
    x, y = torch.rand(2, 6, 9), torch.randint(0, 4, (2, 6))
    m = episode_metrics(learner_for("fa", sizes), State(weights, feedback), x, y)
    for t in range(2):
        ws, fb = [w[t] for w in weights], [b[t] for b in feedback]
        hs, zs = [x[t]], []
        for i, W in enumerate(ws):
            zs.append(hs[-1] @ W.T)
            hs.append(torch.softmax(zs[-1], 1) if i == 2 else reference.softplus(zs[-1], BETA))
        onehot = torch.nn.functional.one_hot(y[t], 4)
        e_fa, e_bp = [hs[-1] - onehot], [hs[-1] - onehot]
        for l in range(3, 0, -1):
            slope = 1 - torch.exp(-BETA * hs[l - 1])
            e_fa.insert(0, (e_fa[0] @ fb[l - 1].T) * slope)
            e_bp.insert(0, (e_bp[0] @ ws[l - 1]) * slope)
        for l in range(3):
            u, v = e_fa[l].mean(0), e_bp[l].mean(0)
            angle = torch.rad2deg(torch.arccos(u @ v / (u.norm() * v.norm())))
            torch.testing.assert_close(m["angle"][t, l], angle)
        for l in range(1, 4):
            W = ws[l - 1]
            err = sum(((zs[l - 1][q] - W @ W.T @ hs[l][q]) ** 2).sum() for q in range(6))
            torch.testing.assert_close(m["orth"][t, l - 1], err)
        ce = torch.nn.functional.cross_entropy(zs[-1], y[t])
        torch.testing.assert_close(m["loss"][t], ce)
        torch.testing.assert_close(m["acc"][t], (zs[-1].argmax(1) == y[t]).double().mean())
    bp = episode_metrics(learner_for("bp", sizes), State(weights), x, y)
    torch.testing.assert_close(bp["angle"], torch.zeros(2, 3), atol=1e-5, rtol=0)
