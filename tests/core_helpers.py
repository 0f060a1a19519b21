"""Small builders of core objects for the tests (the 2023 paper's learner by default)."""

import torch

from metaplast.core.inner_loop import inner_loop
from metaplast.core.learner import Learner, State
from metaplast.core.networks import BETA, MLP
from metaplast.core.pathways import make_pathway
from metaplast.core.rules import Rule


def learner_for(kind, sizes, rule="f0", per_layer=None, exact=True, share="all", beta=BETA, **network):
    """A learner: MLP(``sizes``) with ``network`` options, pathway ``kind``, rule ``rule``."""
    rule = rule if isinstance(rule, Rule) else Rule.build(rule, len(sizes) - 1, per_layer)
    return Learner(MLP(tuple(sizes), beta=beta, **network), make_pathway(kind), rule, exact, share)


def adapted_weights(learner, weights, feedback, theta, x, y, estimator="auto", segment=0, **meta):
    """``inner_loop`` from the given W and B; returns the adapted weights."""
    state = State(list(weights), list(feedback), learner.network.init_biases(x.shape[0]))
    meta = {"theta": theta, **meta}
    return inner_loop(learner, state, meta, x, y, estimator, recompute_segment=segment).weights


def generators(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]
