"""docs/extending.md's worked examples, run as written: each registers a new term, pathway or
meta-parameter, whose numbers are checked against the formula and finite differences, and
which then runs from the command line."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY
from core_helpers import generators, learner_for
from metaplast.core.inner_loop import adapt, inner_loop
from metaplast.core.learner import State
from metaplast.core.networks import init_weights
from metaplast.core.pathways import PATHWAYS
from metaplast.core.terms import TERMS

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
SIZES = [7, 6, 5, 3]


def example(name: str) -> str:
    """The ```python example=<name> block of docs/extending.md."""
    blocks = dict(re.findall(r"```python example=(\w+)\n(.*?)```", DOC.read_text(), flags=re.S))
    return blocks[name]


@pytest.fixture
def registered(request):
    """Run one example's code; undo its registration afterwards."""
    before_terms, before_pathways = dict(TERMS), dict(PATHWAYS)
    namespace = {}
    exec(compile(example(request.param), f"docs/extending.md:{request.param}", "exec"), namespace)
    yield namespace
    TERMS.clear()
    TERMS.update(before_terms)
    PATHWAYS.clear()
    PATHWAYS.update(before_pathways)


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def data(trials=2, steps=5, query=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(trials, steps + query, SIZES[0], generator=g)
    y = torch.randint(0, SIZES[-1], (trials, steps + query), generator=g)
    return x[:, :steps], y[:, :steps], x[:, steps:], y[:, steps:]


def central_difference(loss, tensor, index, h=1e-6):
    with torch.no_grad():
        base = tensor.view(-1)[index].item()
        tensor.view(-1)[index] = base + h
        up = loss().item()
        tensor.view(-1)[index] = base - h
        down = loss().item()
        tensor.view(-1)[index] = base
    return (up - down) / (2 * h)


def run_cli_with_plugin(name, tmp_path, *overrides):
    """``metaplast-train`` started from a module that registers the example first."""
    (tmp_path / "my_plugin.py").write_text(example(name))
    run_dir = tmp_path / "run"
    command = "import my_plugin; from metaplast.run.train import main; main()"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", command, *TINY, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("registered", ["term"], indirect=True)
def test_a_new_term_is_its_formula_and_both_estimators_agree(registered):
    learner = learner_for("fa", SIZES, [0, 11])
    weights = init_weights(SIZES, generators(2))
    feedback = learner.pathway.init_feedback(SIZES, generators(2, seed=3))
    x, y, xq, yq = data()
    theta = torch.tensor([[0.1, 0.05], [0.2, -0.03]])
    after = learner.step(State(weights, feedback), {"theta": theta}, x[:, :1], y[:, :1])
    ys, zs = learner.network.forward(weights, x[:, :1])
    e_out = ys[-1] - torch.nn.functional.one_hot(y[:, :1], SIZES[-1])
    es = learner.pathway.teaching_signals(learner.network, ys, zs, e_out, weights, feedback)
    for i, (w0, w1) in enumerate(zip(weights, after.weights)):
        for t in range(2):
            f0 = -torch.outer(es[i + 1][t, 0], ys[i][t, 0])
            hebb = torch.outer(ys[i + 1][t, 0], ys[i][t, 0])  # F^11 = y_l y_{l-1}^T
            torch.testing.assert_close(w1[t] - w0[t], theta[t, 0] * f0 + theta[t, 1] * hebb)
    grads = []
    for estimator in ("autograd", "fused"):
        leaf = theta.clone().requires_grad_()
        adapted = inner_loop(learner, State(weights, feedback), {"theta": leaf}, x, y, estimator)
        grads.append(torch.autograd.grad(learner.query_loss(adapted, xq, yq).sum(), leaf)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("registered", ["pathway"], indirect=True)
def test_a_new_pathway_sends_through_its_formula_and_both_estimators_agree(registered):
    learner = learner_for("sign_concordant", SIZES, "bio")
    weights = init_weights(SIZES, generators(2))
    feedback = learner.pathway.init_feedback(SIZES, generators(2, seed=3))
    x, y, xq, yq = data()
    ys, zs = learner.network.forward(weights, x[:, :1])
    e_out = ys[-1] - torch.nn.functional.one_hot(y[:, :1], SIZES[-1])
    es = learner.pathway.teaching_signals(learner.network, ys, zs, e_out, weights, feedback)
    B = weights[2].sign().transpose(1, 2) * feedback[2].abs()
    torch.testing.assert_close(es[2], (e_out @ B.transpose(1, 2)) * (1 - torch.exp(-10 * ys[2])))
    theta = torch.tensor([[0.2, -0.1, 0.02], [0.1, 0.1, 0.01]])
    grads = []
    for estimator in ("autograd", "fused"):
        leaf = theta.clone().requires_grad_()
        adapted = inner_loop(learner, State(weights, feedback), {"theta": leaf}, x, y, estimator)
        grads.append(torch.autograd.grad(learner.query_loss(adapted, xq, yq).sum(), leaf)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("registered", ["meta_parameter"], indirect=True)
def test_a_new_meta_parameter_has_the_finite_difference_gradient(registered):
    learner = learner_for("gained_fa", SIZES, "bio")
    weights = init_weights(SIZES, generators(2))
    feedback = learner.pathway.init_feedback(SIZES, generators(2, seed=3))
    x, y, xq, yq = data()
    theta = torch.tensor([[0.2, -0.1, 0.02], [0.1, 0.1, 0.01]])
    gain = (
        learner.pathway.meta_parameters(2, SIZES)["gain"] * torch.tensor([1.0, 1.5, 0.5])
    ).requires_grad_()

    def loss():
        meta = {"theta": theta, "gain": gain}
        return learner.query_loss(adapt(learner, State(weights, feedback), meta, x, y), xq, yq).sum()

    (grad,) = torch.autograd.grad(loss(), gain)
    assert grad.abs().max() > 1e-6
    for index in range(gain.numel()):
        assert grad.view(-1)[index].item() == pytest.approx(
            central_difference(loss, gain, index), rel=1e-5, abs=1e-9
        )


@pytest.mark.parametrize(
    "name, overrides, columns",
    [
        ("term", ["rule=custom", "rule.terms=[0,11]"], {"theta_0", "theta_11"}),
        ("pathway", ["feedback.kind=sign_concordant", "rule=bio"], {"theta_0", "theta_9", "angle_1"}),
        # bio's F^2 uses e_0: once θ_2 ≠ 0 (after episode 0) every gain, g_0 too, has a gradient
        ("meta_parameter", ["feedback.kind=gained_fa", "rule=bio"], {"gain_0", "gain_2", "theta_0"}),
    ],
)
def test_each_example_runs_from_the_command_line_and_its_meta_parameters_learn(
    tmp_path, name, overrides, columns
):
    rows = run_cli_with_plugin(name, tmp_path, *overrides)
    assert len(rows) == 6 and columns <= set(rows[0])
    first, last = rows[0], rows[4]  # trial 0 in episodes 0 and 2
    assert first["trial"] == last["trial"] == "0"
    learned = [c for c in columns if c.startswith(("theta_", "gain_"))]
    assert all(float(first[c]) != float(last[c]) for c in learned)
