"""The optimised inner loop against the papers' literal formulation, and the benchmark.

The batched, factorised inner loop with its hand-scheduled backward pass and
recomputation must give the same adapted weights and the same meta-gradient
(with respect to Θ and the initial W) as :mod:`metaplast.reference`: one trial
at a time, dense terms, plain autograd through the unrolled loop (float64).
"""

import json
import math

import pytest
import torch

from core_helpers import adapted_weights, learner_for
from metaplast import bench, reference
from metaplast.core.learner import State
from metaplast.core.networks import BETA, init_weights
from metaplast.core.pathways import make_pathway
from metaplast.core.rules import Rule
from metaplast.core.terms import TERM_IDS

SIZES = [7, 5, 4, 3]
TRIALS, STEPS, QUERY = 2, 6, 4


def episode_inputs(kind, seed=0):
    generators = [torch.Generator().manual_seed(seed + t) for t in range(TRIALS)]
    weights = [w.double() for w in init_weights(SIZES, generators)]
    feedback = [b.double() for b in make_pathway(kind).init_feedback(SIZES, generators)]
    g = torch.Generator().manual_seed(seed + 100)
    data = (
        torch.rand(TRIALS, STEPS, SIZES[0], generator=g, dtype=torch.float64),
        torch.randint(0, SIZES[-1], (TRIALS, STEPS), generator=g),
        torch.rand(TRIALS, QUERY, SIZES[0], generator=g, dtype=torch.float64),
        torch.randint(0, SIZES[-1], (TRIALS, QUERY), generator=g),
    )
    return weights, feedback, data


def optimised(theta, rule, weights, feedback, kind, data, grad_through_b, segment):
    theta = theta.clone().requires_grad_()
    leaves = [w.clone().requires_grad_() for w in weights]
    learner = learner_for(kind, SIZES, rule, exact=grad_through_b)
    adapted = adapted_weights(learner, leaves, feedback, theta, data[0], data[1], "fused", segment)
    grads = torch.autograd.grad(learner.query_loss(State(adapted), data[2], data[3]).sum(), [theta, *leaves])
    return adapted, grads[0], grads[1:]


def literal(theta, rule, weights, feedback, kind, data, grad_through_b, trial):
    row = theta[trial].clone().requires_grad_()
    leaves = [w[trial].clone().requires_grad_() for w in weights]
    loss, adapted = reference.episode(
        leaves,
        [b[trial] for b in feedback],
        kind,
        reference.layer_coefficients(row, rule.terms, rule.layer_terms),
        *(d[trial] for d in data),
        BETA,
        grad_through_b,
    )
    grads = torch.autograd.grad(loss, [row, *leaves])
    return adapted, grads[0], grads[1:]


def assert_matches_literal(rule, kind, segments=(0, 4), grad_through_b=True, seed=0):
    """Every recomputation setting in ``segments`` against one literal run per trial."""
    weights, feedback, data = episode_inputs(kind, seed)
    g = torch.Generator().manual_seed(seed + 7)
    theta = (torch.rand(TRIALS, len(rule.terms), generator=g, dtype=torch.float64) - 0.3) * 0.3
    runs = [optimised(theta, rule, weights, feedback, kind, data, grad_through_b, k) for k in segments]
    # torch's softplus is linear above βz = 20, within exp(-20)/β ≈ 2e-10 of Eq. 13
    tight = dict(rtol=1e-7, atol=1e-9)
    for t in range(TRIALS):
        ref_adapted, ref_theta, ref_w = literal(theta, rule, weights, feedback, kind, data, grad_through_b, t)
        assert ref_theta.abs().max() > 1e-6  # a gradient that vanished would prove nothing
        for adapted, grad_theta, grad_w in runs:
            for got, expected in zip(adapted, ref_adapted):
                torch.testing.assert_close(got[t].detach(), expected.detach(), **tight)
            torch.testing.assert_close(grad_theta[t], ref_theta, **tight)
            for got, expected in zip(grad_w, ref_w):
                torch.testing.assert_close(got[t], expected, **tight)


@pytest.mark.parametrize("kind", ["bp", "fa", "dfa"])
@pytest.mark.parametrize("term", TERM_IDS)
def test_each_term_matches_literal_formulation_with_and_without_recomputation(term, kind):
    assert_matches_literal(Rule.build([0, term] if term else [0], 3), kind, seed=term)


@pytest.mark.parametrize("kind", ["bp", "fa", "dfa"])
def test_full_pool_matches_literal_formulation_for_any_segment_length(kind):
    assert_matches_literal(Rule.build("pool", 3), kind, segments=(0, 1, 2, 5, 6, 50))


def test_bp_constant_b_and_per_layer_rules_match_literal_formulation():
    assert_matches_literal(Rule.build("pool", 3), "bp", grad_through_b=False)
    assert_matches_literal(Rule.build(None, 3, ["bio", "f0", [0, 3, 6, 8]]), "fa")


@pytest.mark.parametrize("segment", [1, 2, 4, 7])
def test_recomputation_keeps_only_segment_starts(segment):
    weights, feedback, data = episode_inputs("fa")
    theta = torch.full((TRIALS, 3), 0.01, dtype=torch.float64, requires_grad=True)
    adapted = adapted_weights(
        learner_for("fa", SIZES, "bio"), weights, feedback, theta, *data[:2], "fused", segment
    )
    assert sorted(adapted[0].grad_fn.kept) == list(range(0, STEPS, segment))
    assert len(adapted[0].grad_fn.kept) == math.ceil(STEPS / segment)


def test_without_grad_the_loop_keeps_nothing_and_gives_the_same_weights():
    weights, feedback, data = episode_inputs("dfa")
    theta = torch.full((TRIALS, 10), 0.01, dtype=torch.float64)
    learner = learner_for("dfa", SIZES, "pool")
    plain = adapted_weights(learner, weights, feedback, theta, data[0], data[1], "fused")
    assert all(w.grad_fn is None for w in plain)
    tracked = adapted_weights(learner, weights, feedback, theta.requires_grad_(), data[0], data[1], "fused")
    for a, b in zip(plain, tracked):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_bad_recompute_segment_and_an_uncovered_learner_are_rejected_by_the_fused_estimator():
    weights, feedback, data = episode_inputs("fa")
    theta = torch.zeros(TRIALS, 1, dtype=torch.float64)
    learner = learner_for("fa", SIZES)
    with pytest.raises(ValueError, match=r"recompute_segment=-2 .*allowed: 0 \(keep every W\) or k >= 1"):
        adapted_weights(learner, weights, feedback, theta.requires_grad_(), *data[:2], "fused", -2)
    trainable = [b.clone().requires_grad_() for b in feedback]
    with pytest.raises(ValueError, match="'fused' does not apply here .*meta-learned"):
        adapted_weights(learner, weights, trainable, theta, *data[:2], "fused")


def test_benchmark_checks_equality_and_reports_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--sizes", "20", "9", "6", "--steps", "5", "--query", "3", "--trials", "1", "3"]
    argv += ["--rule", "bio", "--recompute", "0", "2", "--threads", "1", "--no-memory", "--json", str(out)]
    bench.main(argv)
    rows = json.loads(out.read_text())
    assert [(r["trials"], r["recompute_segment"]) for r in rows] == [(1, 0), (1, 2), (3, 0), (3, 2)]
    for row in rows:
        assert row["weights_rel_err"] < 1e-5 and row["grad_rel_err"] < 1e-4
        assert row["speedup"] == pytest.approx(row["baseline_s_per_trial"] / row["s_per_trial"])
    for row in rows:  # the distance to the machine's limits, from the same run's own peaks
        assert row["peak_gb_s"] > 0 and row["peak_gflop_s"] > 0
        assert row["gb_s"] == pytest.approx(
            7 * (20 * 9 + 9 * 6) * 4 * row["trials"] * 5 / row["seconds"] / 1e9
        )
        assert row["flop_fraction"] == pytest.approx(row["gflop_s"] / row["peak_gflop_s"])
        assert row["bandwidth_fraction"] == pytest.approx(row["gb_s"] / row["peak_gb_s"])
    printed = capsys.readouterr().out
    assert "ratio" in printed and printed.count("\nbio ") == 4
    assert "machine peaks" in printed and "GFLOP/s" in printed


def test_episode_flops_count_the_matrix_products_of_every_trial():
    """FLOPs grow exactly with the trial count (every trial's products are batched, none shared),
    and the forward pass alone of F^0 at one trial is the literal 2·(matrix-vector products)."""
    sizes = [12, 7, 5]
    one, three = (bench.make_inputs(sizes, "f0", "fa", t, 6, 2) for t in (1, 3))
    assert bench.episode_flops(three, 0) == 3 * bench.episode_flops(one, 0) > 0
    assert bench.episode_flops(one, 0) >= 2 * (12 * 7 + 7 * 5) * (6 + 2)  # at least y = W x per sample


def test_benchmark_memory_probe_and_bad_device():
    config = dict(sizes=[12, 6, 4], rule="pool", feedback="dfa", steps=4, query=2, dtype="float32")
    config.update(device="cpu", threads=1, trials=2, which="metaplast", recompute_segment=2)
    memory = bench.probe(config)
    assert memory["peak_mib"] >= memory["before_mib"] > 0
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cuda"])
