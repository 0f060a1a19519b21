"""``rule.term_scale=auto``: per-term meta-step scales measured before training (see
:mod:`metaplast.core.meta`) on a few calibration episodes of real tasks."""

from __future__ import annotations

import torch

from metaplast.core.learner import Learner
from metaplast.core.meta import scales_from_ratios, term_ratios
from metaplast.data import TaskSampler, stack_tasks, stream_seed, trial_generators

CALIBRATION_EPISODES = 3
CALIBRATION_TRIALS = 5
#: Random streams of the calibration episodes (of seed 0: the scales do not depend on the run's seed).
STREAM_TASKS, STREAM_INIT = 2, 3


def calibrate(
    learner: Learner,
    images: torch.Tensor,
    labels: torch.Tensor,
    theta_row: list[float],
    M: int,
    K: int,
    Q: int,
    feedback_init: str = "xavier_uniform",
    sampling: str = "fresh",
    remap_labels: bool = False,
    episodes: int = CALIBRATION_EPISODES,
    trials: int = CALIBRATION_TRIALS,
) -> list[float]:
    """Measured scales: :func:`term_ratios` over ``episodes`` fresh tasks of ``trials`` trials with
    the initial Θ ``theta_row`` (shared by all layers), then :func:`scales_from_ratios`.

    The calibration episodes draw from their own random streams, so they change neither the
    run's tasks nor its weights.
    """
    ids = range(trials)
    samplers = [
        TaskSampler(images, labels, M, K, Q, stream_seed(0, t, STREAM_TASKS), remap_labels, sampling)
        for t in ids
    ]
    generators = trial_generators(0, ids, STREAM_INIT)
    rows = torch.tensor(theta_row, dtype=torch.float32)
    shape = learner.theta_shape(trials)
    theta = (
        [rows.expand(s).clone() for s in shape]
        if learner.share == "synapse"
        else rows.expand(shape[0]).clone()
    )
    meta = {"theta": theta}
    if learner.pathway.rule_terms:  # a plastic pathway's own rule starts at ψ = 0
        meta["psi"] = torch.zeros(trials, len(learner.pathway.rule_terms))
    ratios = []
    for _ in range(episodes):
        task = stack_tasks([s.sample() for s in samplers])
        state = learner.init_state(generators, feedback_init)
        ratios.append(term_ratios(learner, state, meta, task.x_train, task.y_train))
    return scales_from_ratios(torch.cat(ratios), learner)
