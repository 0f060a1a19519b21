"""The core: plain PyTorch (neither Lightning nor Hydra) — terms, rules, networks, pathways, the
inner loop with its two meta-gradient estimators, meta-parameters and metrics."""

from metaplast.core.inner_loop import ESTIMATORS, adapt, inner_loop
from metaplast.core.learner import SHARING, Learner, State
from metaplast.core.meta import MetaParameters, regulariser
from metaplast.core.metrics import episode_metrics
from metaplast.core.networks import ACTIVATIONS, INITIALISERS, LOSSES, MLP
from metaplast.core.pathways import PATHWAYS, Pathway, make_pathway
from metaplast.core.rules import NAMED_RULES, Rule
from metaplast.core.terms import FEEDBACK_TERMS, TERMS

__all__ = [
    "ACTIVATIONS",
    "ESTIMATORS",
    "FEEDBACK_TERMS",
    "INITIALISERS",
    "LOSSES",
    "MLP",
    "NAMED_RULES",
    "PATHWAYS",
    "SHARING",
    "TERMS",
    "Learner",
    "MetaParameters",
    "Pathway",
    "Rule",
    "State",
    "adapt",
    "episode_metrics",
    "inner_loop",
    "make_pathway",
    "regulariser",
]
