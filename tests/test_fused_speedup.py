"""The fused step's speed tricks keep it exact: inside a recomputation segment W_t is the segment's
first W plus the update factors since (decays folded in, turned dense again when the factors
grow), the backward pass rebuilds them from the recorded factors, the no-grad loop updates W in
place, and none touches the caller's weights (float64, against autograd)."""

import gc
import logging
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from core_helpers import generators, learner_for
from metaplast.core.inner_loop import inner_loop
from metaplast.core.learner import State
from metaplast.core.networks import init_weights

SIZES = [12, 9, 7, 5]
STEPS = 13


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def episode(estimator, segment, rule="pool", kind="fa", trials=2, learn_init=True, compile=False):
    learner = learner_for(kind, SIZES, rule)
    weights = init_weights(SIZES, generators(trials))
    before = [w.clone() for w in weights]
    leaves = [w.requires_grad_(learn_init) for w in weights]
    feedback = learner.pathway.init_feedback(SIZES, generators(trials, seed=7))
    g = torch.Generator().manual_seed(3)
    x = torch.rand(trials, STEPS + 4, SIZES[0], generator=g)
    y = torch.randint(0, SIZES[-1], (trials, STEPS + 4), generator=g)
    theta = torch.full((trials, len(learner.rule.terms)), 0.02).requires_grad_()
    meta = {"theta": theta, "init": dict(enumerate(leaves))} if learn_init else {"theta": theta}
    adapted = inner_loop(
        learner,
        State(leaves, feedback),
        meta,
        x[:, :STEPS],
        y[:, :STEPS],
        estimator,
        recompute_segment=segment,
        compile=compile,
    )
    loss = learner.query_loss(adapted, x[:, STEPS:], y[:, STEPS:]).sum()
    inputs = [theta, *leaves] if learn_init else [theta]
    grads = torch.autograd.grad(loss, inputs)
    assert all(torch.equal(w, b) for w, b in zip(weights, before))  # the caller's W untouched
    return [w.detach() for w in adapted.weights], grads


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("rule", ["pool", "bio", [3, 10]])
@pytest.mark.parametrize("segment", [0, 1, 4, 5, 13, 20])
def test_fused_with_in_place_updates_and_rebuilt_weights_equals_autograd(rule, segment):
    """Rules with a per-trial decay (pool's F^3), without (bio), per-row decay (F^10); every
    segment length, W_0 learned (its gradient too)."""
    (w_auto, g_auto), (w_fused, g_fused) = (episode(e, segment, rule) for e in ("autograd", "fused"))
    assert max(relative(a, b) for a, b in zip(w_fused, w_auto)) <= 1e-10
    assert max(relative(a, b) for a, b in zip(g_fused, g_auto)) <= 1e-10


@pytest.mark.parametrize("rule", ["pool", "bio"])
@pytest.mark.parametrize("segment", [0, 1, 4, 5])
def test_fused_with_a_segments_input_products_made_ahead_equals_autograd(rule, segment, monkeypatch):
    """``x W_start^T`` of all a segment's steps made in one product at its start (every first
    weight: ``SEGMENT_INPUT_PRODUCT_SIZE = 0``, counted): the same weights and meta-gradient."""
    from metaplast.core import fused

    monkeypatch.setattr(fused, "SEGMENT_INPUT_PRODUCT_SIZE", 0)
    ahead, forward = [], fused._Recording.forward

    def counted(self, index, y):
        ahead.append(index == 0 and self.input_product is not None)
        return forward(self, index, y)

    monkeypatch.setattr(fused._Recording, "forward", counted)
    (w_auto, g_auto), (w_fused, g_fused) = (episode(e, segment, rule) for e in ("autograd", "fused"))
    assert max(relative(a, b) for a, b in zip(w_fused, w_auto)) <= 1e-10
    assert max(relative(a, b) for a, b in zip(g_fused, g_auto)) <= 1e-10
    assert sum(ahead) == STEPS  # every step's first product


def test_fused_without_grad_leaves_the_callers_weights_unchanged():
    learner = learner_for("fa", SIZES, "pool")
    weights = init_weights(SIZES, generators(2))
    before = [w.clone() for w in weights]
    x, y = torch.rand(2, STEPS, SIZES[0]), torch.randint(0, SIZES[-1], (2, STEPS))
    with torch.no_grad():
        inner_loop(
            learner,
            State(weights, learner.pathway.init_feedback(SIZES, generators(2))),
            {"theta": torch.full((2, 10), 0.02)},
            x,
            y,
            "fused",
        )
    assert all(torch.equal(w, b) for w, b in zip(weights, before))


@pytest.mark.parametrize("rule", ["pool", "bio"])
def test_fused_backward_leaves_the_incoming_gradient_unchanged(rule):
    """A segment's dense adjoint is built in place over the one it grew from: never over the
    caller's ``dL/dW_T``, which the meta-gradient must leave as it was given (and equal autograd's
    vector-Jacobian products of the same ``dL/dW_T``)."""
    learner = learner_for("fa", SIZES, rule)
    weights = [w.requires_grad_() for w in init_weights(SIZES, generators(2))]
    feedback = learner.pathway.init_feedback(SIZES, generators(2, seed=7))
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(2, STEPS, SIZES[0], generator=g), torch.randint(0, SIZES[-1], (2, STEPS), generator=g)
    theta = torch.full((2, len(learner.rule.terms)), 0.02).requires_grad_()
    incoming = [torch.randn(w.shape, generator=g) for w in weights]
    given = [v.clone() for v in incoming]
    results = {}
    for estimator in ("autograd", "fused"):
        adapted = inner_loop(
            learner, State(weights, feedback), {"theta": theta}, x, y, estimator, recompute_segment=4
        )
        results[estimator] = torch.autograd.grad(adapted.weights, [theta, *weights], incoming)
        assert all(torch.equal(v, c) for v, c in zip(incoming, given))
    assert max(relative(a, b) for a, b in zip(results["fused"], results["autograd"])) <= 1e-10


def live_tensors() -> int:
    gc.collect()
    return sum(torch.is_tensor(o) for o in gc.get_objects())


@pytest.mark.parametrize("rule", ["pool", "bio"])
def test_fused_meta_gradient_frees_everything_it_recorded(rule):
    """Meta-gradients one after another leave no tensor behind: the factors recorded in the
    backward pass must not tie a graph node to itself (a reference cycle through C++ that the
    collector cannot free leaked ~25 MB per pool episode, 12 GB by episode 460)."""
    episode("fused", 4, rule, learn_init=False)
    before = live_tensors()
    for _ in range(3):
        episode("fused", 4, rule, learn_init=False)
    assert live_tensors() == before


def episode_compiled(backend, monkeypatch, rule="pool", segment=4):
    from metaplast.core import fused

    monkeypatch.setattr(fused, "COMPILE_BACKEND", backend)
    w_auto, (g_auto,) = episode("autograd", segment, rule, learn_init=False)
    w_compiled, (g_compiled,) = episode("fused", segment, rule, learn_init=False, compile=True)
    assert max(relative(a, b) for a, b in zip(w_compiled, w_auto)) <= 1e-10
    assert relative(g_compiled, g_auto) <= 1e-10
    assert g_auto.abs().max() > 1e-6


@pytest.mark.parametrize("rule", ["pool", [3, 10]])
def test_compiled_step_traces_to_the_same_meta_gradient(rule, monkeypatch):
    """trainer.compile: the step functions traced by torch.compile (dynamo + AOT autograd, no
    code generation) give autograd's numbers; a segment's factor count varies from step to step."""
    torch._dynamo.reset()
    episode_compiled("aot_eager", monkeypatch, rule)


def test_compiled_steps_compile_every_configuration_of_a_process(monkeypatch, caplog):
    """Rules and trial counts one after another in one process (the bench runs four), each taking
    several graphs of the backward step: none may hit Dynamo's recompile limit, past which it
    silently runs the step eagerly (with the default limit of 8 this fails)."""
    from metaplast.core import fused

    torch._dynamo.reset()
    fused.compiled_steps.cache_clear()  # compiled anew, with the limit of now
    monkeypatch.setattr(fused, "COMPILE_BACKEND", "aot_eager")
    logger = logging.getLogger("torch._dynamo.convert_frame")  # Dynamo's loggers do not propagate
    logger.addHandler(caplog.handler)
    try:
        for rule, trials in [("pool", 1), ("bio", 1), ("pool", 3)]:
            episode("fused", 4, rule, trials=trials, learn_init=False, compile=True)
    finally:
        logger.removeHandler(caplog.handler)
        fused.compiled_steps.cache_clear()
    assert "recompile_limit" not in caplog.text, caplog.text


def can_build_extensions() -> bool:
    """A C++ compiler and Python's headers: what inductor's generated code needs."""
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    return headers.exists() and any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not can_build_extensions(), reason="no C++ compiler or no Python headers")
@pytest.mark.parametrize("through", [None, "operator", "written vectors"])
def test_compiled_step_with_inductor_code_equals_autograd(monkeypatch, through):
    """The same with the generated C++ of torch.compile's default backend (what trainer.compile
    runs); at these sizes its own loops make every product, with ``EXTERN_PRODUCT_SIZE = 0`` the
    operator ``metaplast::weight_product`` does, with ``REALIZED_VECTOR_SIZE = 0`` they do with
    every vector written to memory first (counted: each must run)."""
    from metaplast.core import fused

    torch._dynamo.reset()
    calls = []
    if through == "operator":
        monkeypatch.setattr(fused, "EXTERN_PRODUCT_SIZE", 0)
        product = fused._product
        monkeypatch.setattr(fused, "_product", lambda *args: calls.append(1) or product(*args))
    if through == "written vectors":
        monkeypatch.setattr(fused, "REALIZED_VECTOR_SIZE", 0)
        written = fused._written
        monkeypatch.setattr(fused, "_written", lambda v: calls.append(1) or written(v))
    episode_compiled("inductor", monkeypatch, "bio", segment=5)
    assert (len(calls) > 0) == (through is not None)


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("transposed", [True, False])
def test_weight_product_operator_is_the_literal_product(rows, transposed):
    """``metaplast::weight_product`` (the products compiled code leaves to ATen): ``v M^T`` or
    ``v M`` per trial, its fake (meta) version and schema as torch.library's own check wants them."""
    from metaplast.core import fused

    v = torch.randn(3, rows, 6 if transposed else 5)
    matrix = torch.randn(3, 5, 6)
    out = torch.ops.metaplast.weight_product(v, matrix, transposed)
    literal = torch.stack([x @ (m.T if transposed else m) for x, m in zip(v, matrix)])
    assert torch.allclose(out, literal, rtol=1e-12, atol=1e-12) and out.is_contiguous()
    torch.library.opcheck(torch.ops.metaplast.weight_product, (v, matrix, transposed))
    assert torch.equal(fused._times(v, matrix, transposed), out)


def test_compile_where_the_fused_estimator_does_not_apply_warns_and_uses_autograd():
    sizes = [6, 5, 3]
    learner = learner_for("plastic", sizes)
    weights = init_weights(sizes, generators(2))
    state = State(weights, learner.pathway.init_feedback(sizes, generators(2)))
    theta, psi = torch.full((2, 1), 0.1, requires_grad=True), torch.zeros(2, 2, requires_grad=True)
    meta = {"theta": theta, "psi": psi}
    x, y = torch.rand(2, 3, 6), torch.randint(0, 3, (2, 3))
    with pytest.warns(UserWarning, match="compile applies to the fused estimator only.*PlasticFeedback"):
        adapted = inner_loop(learner, state, meta, x, y, compile=True)
    expected = inner_loop(learner, state, meta, x, y, "autograd")
    assert all(torch.equal(a, b) for a, b in zip(adapted.weights, expected.weights))
