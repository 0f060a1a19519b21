"""The open core: both meta-gradient estimators agree, every new pathway, network option and
meta-parameter has the gradient that finite differences give, and each one runs end to end."""

import csv

import pytest
import torch

from core_helpers import generators, learner_for
from metaplast.core.inner_loop import adapt, inner_loop
from metaplast.core.learner import State
from metaplast.core.networks import MLP, init_weights
from metaplast.core.pathways import make_pathway
from metaplast.core.rules import Rule
from metaplast.core.terms import FEEDBACK_TERMS, TERM_IDS, LayerSignals, dense_update, layer_signals
from metaplast.run.train import run


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def task(sizes, trials, steps, query, seed=0, regression=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(trials, steps + query, sizes[0], generator=g)
    if regression:
        y = torch.randn(trials, steps + query, sizes[-1], generator=g)
    else:
        y = torch.randint(0, sizes[-1], (trials, steps + query), generator=g)
    return x[:, :steps], y[:, :steps], x[:, steps:], y[:, steps:]


def relative(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- fused = autograd, paper sizes

PAPER = [784, 170, 130, 100, 70, 47]


@pytest.mark.parametrize(
    "kind, rule, exact, segment",
    [
        ("fa", "pool", True, 16),
        ("dfa", "pool", True, 0),
        ("bp", "pool", True, 0),
        ("bp", "pool", False, 0),
        ("sign", "pool", True, 0),
        ("fa", ["bio", "f0", "ehebb", "oja", [0, 3, 6, 8]], True, 0),
    ],
)
def test_fused_equals_autograd_at_the_paper_sizes_over_50_steps(kind, rule, exact, segment):
    """Relative L2 error ≤ 1e-10 in the adapted weights and in dL/dΘ (float64, 50 online steps)."""
    per_layer = rule if isinstance(rule, list) else None
    learner = learner_for(kind, PAPER, None if per_layer else rule, per_layer, exact=exact)
    weights = init_weights(PAPER, generators(1))
    feedback = learner.pathway.init_feedback(PAPER, generators(1, seed=5))
    x, y, xq, yq = task(PAPER, 1, 50, 10)
    x = x * (x < 0.25)  # sparse, like character images
    values = {0: 1e-2, 2: -2.36e-2, 9: 4.2e-3}
    theta0 = torch.tensor([[values.get(r, 1e-3) for r in learner.rule.terms]])
    results = []
    for estimator in ("autograd", "fused"):
        theta = theta0.clone().requires_grad_()
        adapted = inner_loop(
            learner, State(weights, feedback), {"theta": theta}, x, y, estimator, recompute_segment=segment
        )
        (grad,) = torch.autograd.grad(learner.query_loss(adapted, xq, yq).sum(), theta)
        results.append(([w.detach() for w in adapted.weights], grad))
    (w_auto, g_auto), (w_fused, g_fused) = results
    assert max(relative(a, b) for a, b in zip(w_fused, w_auto)) <= 1e-10
    assert relative(g_fused, g_auto) <= 1e-10
    assert g_auto.abs().max() > 1e-6  # a vanished gradient would prove nothing


def test_auto_picks_fused_where_it_applies_and_autograd_elsewhere():
    sizes = [6, 5, 3]
    x, y, _, _ = task(sizes, 2, 4, 0)
    theta = torch.full((2, 1), 0.1, requires_grad=True)
    weights = init_weights(sizes, generators(2))
    fa = learner_for("fa", sizes)
    state = State(weights, fa.pathway.init_feedback(sizes, generators(2)))
    assert type(inner_loop(fa, state, {"theta": theta}, x, y).weights[0].grad_fn).__name__.startswith(
        "_InnerLoop"
    )
    plastic = learner_for("plastic", sizes)
    meta = {"theta": theta, "psi": torch.zeros(2, 2, requires_grad=True)}
    adapted = inner_loop(
        plastic, State(weights, plastic.pathway.init_feedback(sizes, generators(2))), meta, x, y
    )
    assert not type(adapted.weights[0].grad_fn).__name__.startswith("_InnerLoop")
    with pytest.raises(ValueError, match="meta.gradient='fused' does not apply here .*PlasticFeedback"):
        inner_loop(plastic, State(weights, state.feedback), meta, x, y, "fused")


# ---------------------------------------------------------------- finite differences


def finite_difference_check(loss_fn, tensors, entries=6, h=1e-6, seed=0):
    """dloss/dtensor (autograd) against central differences at ``entries`` random entries of each tensor."""
    grads = torch.autograd.grad(loss_fn(tensors), tensors)
    g = torch.Generator().manual_seed(seed)
    for tensor, grad in zip(tensors, grads):
        assert grad.abs().max() > 1e-8, "a vanished gradient proves nothing"
        assert tensor.is_contiguous()
        flat = torch.randperm(tensor.numel(), generator=g)[:entries]
        for index in flat.tolist():
            with torch.no_grad():
                base = tensor.view(-1)[index].item()
                tensor.view(-1)[index] = base + h
                up = loss_fn(tensors).item()
                tensor.view(-1)[index] = base - h
                down = loss_fn(tensors).item()
                tensor.view(-1)[index] = base
            numeric = (up - down) / (2 * h)
            assert grad.reshape(-1)[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)


SIZES = [7, 6, 5, 3]


def episode_loss(learner, weights, feedback, meta, data, batch=1, truncate=None, biases=None):
    x, y, xq, yq = data
    state = State(list(weights), list(feedback), biases or learner.network.init_biases(x.shape[0]))
    adapted = adapt(learner, state, meta, x, y, batch, truncate)
    return learner.query_loss(adapted, xq, yq).sum()


def test_plastic_feedback_eq9_meta_gradient_in_theta_and_psi_passes_finite_differences():
    learner = learner_for("plastic", SIZES, [0, 2, 3, 9])
    weights = init_weights(SIZES, generators(2))
    feedback = learner.pathway.init_feedback(SIZES, generators(2, seed=3))
    data = task(SIZES, 2, 6, 4)
    theta = torch.tensor([[0.2, -0.1, 0.01, 0.05], [0.1, 0.2, -0.02, 0.03]], requires_grad=True)
    psi = torch.tensor([[0.3, -0.05], [-0.2, 0.04]], requires_grad=True)

    def loss(tensors):
        return episode_loss(learner, weights, feedback, {"theta": tensors[0], "psi": tensors[1]}, data)

    finite_difference_check(loss, [theta, psi])


def test_plastic_feedback_update_is_eq9_written_out():
    learner = learner_for("plastic", SIZES)
    weights = init_weights(SIZES, generators(1))
    feedback = learner.pathway.init_feedback(SIZES, generators(1, seed=2))
    x, y, _, _ = task(SIZES, 1, 1, 0)
    psi = torch.tensor([[0.7, -0.3]])
    state = learner.step(State(weights, feedback), {"theta": torch.tensor([[0.1]]), "psi": psi}, x, y)
    ys, zs = learner.network.forward(weights, x)
    e_out = ys[-1] - torch.nn.functional.one_hot(y, SIZES[-1])
    es = learner.pathway.teaching_signals(learner.network, ys, zs, e_out, weights, feedback)
    for index, (b_old, b_new) in enumerate(zip(feedback, state.feedback)):
        y_post, e_pre = ys[index + 1][0, 0], es[index][0, 0]
        # Eq. 9: ΔB_{l,l-1} = -θ_4 y_l e_{l-1}^T + θ_9 B, transposed to B's layout (dim y_{l-1}, dim y_l)
        expected = b_old[0] + 0.7 * -torch.outer(y_post, e_pre).T + -0.3 * b_old[0]
        torch.testing.assert_close(b_new[0], expected)
    assert set(FEEDBACK_TERMS) == {0, 1}


def test_meta_learned_feedback_and_initial_weights_pass_finite_differences():
    learner = learner_for("fa", SIZES, "bio", init="normal", init_std=0.3)
    weights = init_weights(SIZES, generators(2))
    data = task(SIZES, 2, 5, 4, seed=1)
    theta = torch.tensor([[0.2, -0.1, 0.05], [0.1, 0.2, 0.03]])
    b = [m.contiguous().requires_grad_() for m in learner.pathway.init_feedback(SIZES, generators(2, seed=8))]
    w0 = learner.network.init_weights(generators(2, seed=9))[0].clone().requires_grad_()

    def loss(tensors):
        b0, b1, b2, first = tensors
        return episode_loss(learner, [first, *weights[1:]], [b0, b1, b2], {"theta": theta}, data)

    finite_difference_check(loss, [*b, w0])


@pytest.mark.parametrize("kind", ["kolen_pollack", "sign", "dfa"])
def test_other_pathways_pass_finite_differences(kind):
    learner = learner_for(kind, SIZES, "pool")
    if kind == "kolen_pollack":
        learner = learner.__class__(learner.network, make_pathway(kind, decay=0.05), learner.rule)
    weights = init_weights(SIZES, generators(2))
    feedback = learner.pathway.init_feedback(SIZES, generators(2, seed=4))
    data = task(SIZES, 2, 5, 3, seed=2)
    theta = ((torch.rand(2, 10, generator=torch.Generator().manual_seed(1)) - 0.5) * 0.2).requires_grad_()
    finite_difference_check(
        lambda t: episode_loss(learner, weights, feedback, {"theta": t[0]}, data), [theta]
    )


@pytest.mark.parametrize("share", ["layer", "synapse"])
def test_per_layer_and_per_synapse_theta_pass_finite_differences(share):
    learner = learner_for("fa", SIZES, "bio", share=share)
    weights = init_weights(SIZES, generators(2))
    feedback = learner.pathway.init_feedback(SIZES, generators(2, seed=4))
    data = task(SIZES, 2, 4, 3, seed=3)
    g = torch.Generator().manual_seed(2)
    thetas = [(torch.rand(s, generator=g) * 0.2 - 0.05).requires_grad_() for s in learner.theta_shape(2)]

    def loss(tensors):
        return episode_loss(
            learner, weights, feedback, {"theta": tensors if share == "synapse" else tensors[0]}, data
        )

    finite_difference_check(loss, thetas)


def test_relu_biases_mse_and_mini_batches_pass_finite_differences():
    learner = learner_for("fa", SIZES, "oja", activation="relu", bias=True, loss="mse", init="kaiming")
    weights = init_weights(SIZES, generators(2))
    feedback = learner.pathway.init_feedback(SIZES, generators(2, seed=4))
    data = task(SIZES, 2, 8, 4, seed=5, regression=True)
    biases = [torch.randn(2, 1, n, generator=torch.Generator().manual_seed(n)) * 0.1 for n in SIZES[1:]]
    theta = torch.tensor([[0.05, 0.01], [0.08, 0.02]], requires_grad=True)
    finite_difference_check(
        lambda t: episode_loss(learner, weights, feedback, {"theta": t[0]}, data, batch=4, biases=biases),
        [theta],
    )


def test_truncated_backpropagation_is_the_gradient_through_the_last_k_steps_only():
    learner = learner_for("fa", SIZES, "bio")
    weights = init_weights(SIZES, generators(2))
    feedback = learner.pathway.init_feedback(SIZES, generators(2, seed=4))
    x, y, xq, yq = task(SIZES, 2, 6, 3)
    theta = torch.tensor([[0.2, -0.1, 0.05], [0.1, 0.2, 0.03]], requires_grad=True)
    (truncated,) = torch.autograd.grad(
        episode_loss(learner, weights, feedback, {"theta": theta}, (x, y, xq, yq), truncate=2), theta
    )
    # independently: run 4 steps without gradient, then 2 with it
    with torch.no_grad():
        start = adapt(learner, State(weights, feedback), {"theta": theta}, x[:, :4], y[:, :4])
    end = adapt(learner, start, {"theta": theta}, x[:, 4:], y[:, 4:])
    (expected,) = torch.autograd.grad(learner.query_loss(end, xq, yq).sum(), theta)
    torch.testing.assert_close(truncated, expected)
    (full,) = torch.autograd.grad(
        episode_loss(learner, weights, feedback, {"theta": theta}, (x, y, xq, yq)), theta
    )
    assert not torch.allclose(full, truncated)


# ---------------------------------------------------------------- formulas


def test_kolen_pollack_shrinks_w_minus_b_transpose_by_one_minus_kappa_each_step():
    kappa = 0.1
    learner = learner_for("fa", SIZES, "pool")
    learner = learner.__class__(learner.network, make_pathway("kolen_pollack", decay=kappa), learner.rule)
    weights = init_weights(SIZES, generators(1))
    feedback = learner.pathway.init_feedback(SIZES, generators(1, seed=6))
    x, y, _, _ = task(SIZES, 1, 3, 0)
    theta = torch.rand(1, 10, generator=torch.Generator().manual_seed(0)) * 0.1
    state = State(weights, feedback)
    for step in range(3):
        after = learner.step(state, {"theta": theta}, x[:, step : step + 1], y[:, step : step + 1])
        for w0, b0, w1, b1 in zip(state.weights, state.feedback, after.weights, after.feedback):
            torch.testing.assert_close(w1 - b1.transpose(1, 2), (1 - kappa) * (w0 - b0.transpose(1, 2)))
        state = after


def test_sign_symmetric_feedback_sends_through_sign_of_w_transpose():
    learner = learner_for("sign", SIZES)
    weights = init_weights(SIZES, generators(1))
    x, y, _, _ = task(SIZES, 1, 1, 0)
    ys, zs = learner.network.forward(weights, x)
    e_out = ys[-1] - torch.nn.functional.one_hot(y, SIZES[-1])
    es = learner.pathway.teaching_signals(learner.network, ys, zs, e_out, weights, [])
    scale = (6 / (SIZES[2] + SIZES[3])) ** 0.5 / 2
    expected = (e_out @ (weights[2].sign() * scale)) * (1 - torch.exp(-10 * ys[2]))
    torch.testing.assert_close(es[2], expected)


def test_per_synapse_theta_equal_everywhere_is_the_shared_rule():
    g = torch.Generator().manual_seed(0)
    T, n, m = 2, 5, 4
    weight = torch.randn(T, n, m, generator=g) * 0.3
    y_pre, e_pre = torch.rand(T, 1, m, generator=g), torch.randn(T, 1, m, generator=g)
    y_post, e_post = torch.rand(T, 1, n, generator=g), torch.randn(T, 1, n, generator=g)
    signals = layer_signals(weight, TERM_IDS, y_pre, y_post, e_pre, e_post, y_pre @ weight.transpose(1, 2))
    theta = torch.randn(T, 10, generator=g) * 0.1
    from metaplast.core.terms import apply_update, update_factors

    shared = apply_update(weight, *update_factors(theta, TERM_IDS, signals)) - weight
    per_synapse = {r: theta[:, r, None, None].expand(T, n, m) for r in TERM_IDS}
    torch.testing.assert_close(dense_update(per_synapse, weight, signals), shared)
    assert isinstance(signals, LayerSignals)


def test_normal_init_has_the_given_std_and_needs_one():
    net = MLP((300, 200, 10), init="normal", init_std=0.01)
    weights = net.init_weights(generators(3))
    assert weights[0].std().item() == pytest.approx(0.01, rel=0.02)
    with pytest.raises(ValueError, match="init 'normal' needs a standard deviation std > 0"):
        MLP((5, 3), init="normal").init_weights(generators(1))
    with pytest.raises(ValueError, match=r"model.activation='tanh' is unknown; allowed: softplus, relu"):
        MLP((5, 3), activation="tanh")


def test_rule_labels_have_one_home():
    assert Rule.build("ehebb", 3).label == "ehebb"
    assert Rule.build([3, 0], 2).label == "{0,3}"
    assert Rule.build(None, 3, ["f0", "ehebb", "f0"]).label == "[f0,ehebb,f0]"


# ---------------------------------------------------------------- end to end


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize(
    "overrides, columns",
    [
        (["feedback=plastic", "rule=bio"], {"psi_0", "psi_1", "theta_9"}),
        (["feedback=learned"], {"theta_0"}),
        (["model.init=normal", "model.init_std=0.1", "model.learn_init=[0]", "feedback=bp"], {"theta_0"}),
        (["feedback=kolen_pollack", "rule=pool", "rule.term_scale=null"], {"theta_5"}),
        (["feedback=sign", "rule.share=layer"], {"theta_layer0_0", "theta_layer2_0"}),
        (["rule.share=synapse", "meta.truncate=5"], {"theta_layer1_0"}),
    ],
)
def test_every_new_option_runs_end_to_end_and_learns(make_cfg, tmp_path, overrides, columns):
    module = run(make_cfg(*overrides, "meta.episodes=2"), tmp_path)
    rows = read_csv(tmp_path / "metrics.csv")
    assert len(rows) == 2 * 2 and columns <= set(rows[0])
    assert all(row["meta_diverged"] == "0" for row in rows)
    start, end = rows[0], rows[-1]
    moved = [c for c in columns if float(start[c]) != float(end[c])]
    assert moved, "the meta-parameters took no step"
    groups = module.meta.groups()
    if "feedback=learned" in overrides:
        assert "feedback" in groups and len(groups["feedback"]) == 3
    if "model.learn_init=[0]" in overrides:
        assert "init" in groups and groups["init"][0].shape == (2, 16, 784)
