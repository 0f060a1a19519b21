"""What a finished job reports (``result.json``), and the one definition of its two numbers:

* **final meta-accuracy** (:func:`final_accuracy`): per trial, the mean meta-accuracy over the
  last N episodes (``objective.last``, default :data:`DEFAULT_LAST` = 10), episodes in which the
  trial diverged left out; a trial with none left has no final accuracy (NaN) and is left out of
  the run's mean (``final_meta_acc``) and its 98 % bootstrap CI over trials;
* **final Θ**: Θ after the last Adam step — the module's Θ when training ends, which is what
  ``checkpoints/last.ckpt`` and ``result.json`` hold (the last rows of ``metrics.csv`` hold the Θ
  the last episode ran with, one step before); :meth:`metaplast.analysis.rundir.RunDir.final`
  reads it.

The runner writes ``result.json`` with :func:`job_result`; ``result.json``, the W&B summary, the
report's summary table, the sweep table and the optuna objective all use these definitions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from metaplast.safety import write_text

RESULT = "result.json"
#: Episodes (per trial) averaged for the final meta-accuracy unless ``objective.last`` says otherwise.
DEFAULT_LAST = 10


def objective(accuracy: float, surviving: int, max_terms: int | None) -> float:
    """Final mean meta-accuracy; with ``max_terms`` each surviving term beyond it costs 1 (> any accuracy)."""
    if max_terms is None or surviving <= max_terms:
        return float(accuracy)
    return float(accuracy) - (surviving - max_terms)


def surviving_terms(theta_mean, terms, threshold: float) -> list[int]:
    """The terms r with |θ_r| > threshold (Table S1: survivors vs terms below 0.09e-2)."""
    return [int(r) for r, value in zip(terms, theta_mean) if abs(value) > threshold]


def check_last(last) -> int:
    """``last`` as an int >= 1, else a :class:`ValueError` naming it."""
    if isinstance(last, bool) or not isinstance(last, (int, np.integer)) or last < 1:
        raise ValueError(f"last={last!r} is not allowed; allowed: an integer >= 1 (episodes per trial)")
    return int(last)


def per_trial_mean(rows) -> list[float]:
    """Per trial (column) of ``rows`` ``(episodes, trials)``: the mean of its finite values, NaN without."""
    values = np.asarray(rows, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"per_trial_mean needs a 2-d (episodes, trials) array, got shape {values.shape}")
    finite = np.isfinite(values)
    counts = finite.sum(axis=0)
    sums = np.where(finite, values, 0.0).sum(axis=0)
    return [float(s / n) if n else float("nan") for s, n in zip(sums, counts)]


def late_mean(table, trial_ids, last: int = DEFAULT_LAST, column: str = "meta_acc") -> list[float] | None:
    """Per trial of ``trial_ids``: the mean of ``column`` over the run's last ``last`` episodes
    (``episode > max episode - last``); a diverged episode (no value) is left out, a trial with
    none left gets NaN. ``table`` is a ``metrics.csv`` path or its DataFrame; None without rows."""
    last = check_last(last)
    if not isinstance(table, pd.DataFrame):
        if not Path(table).is_file():
            return None
        table = pd.read_csv(table)
    if table.empty or column not in table or "episode" not in table or "trial" not in table:
        return None
    episodes = pd.to_numeric(table["episode"], errors="coerce")
    tail = table[episodes > episodes.max() - last]
    values = pd.to_numeric(tail[column], errors="coerce").to_numpy(float)
    trials = pd.to_numeric(tail["trial"], errors="coerce").to_numpy(float)
    return [per_trial_mean(values[trials == t][:, None])[0] for t in trial_ids]


def final_accuracy(table, trial_ids, last: int = DEFAULT_LAST) -> list[float] | None:
    """THE final meta-accuracy of each trial: its mean meta-accuracy over the run's last ``last``
    episodes (:func:`late_mean` of ``meta_acc``); NaN for a trial diverged in all of them."""
    return late_mean(table, trial_ids, last, "meta_acc")


def accuracy_summary(accuracy) -> tuple[float, float, float, int]:
    """Mean over the trials with a final accuracy, its 98 % bootstrap CI and their number."""
    from metaplast.analysis.stats import bootstrap_ci

    finite = [float(a) for a in accuracy if math.isfinite(float(a))]  # diverged trials are left out
    if not finite:
        return float("nan"), float("nan"), float("nan"), 0
    low, high = bootstrap_ci(finite)
    return float(np.mean(finite)), low, high, len(finite)


def job_result(
    theta, terms, trial_ids, accuracy, threshold: float, max_terms: int | None, last: int = DEFAULT_LAST
) -> dict:
    """What a finished job reports: Θ ``(trials, R)`` after the last Adam step, each trial's final
    meta-accuracy (:func:`final_accuracy` over the last ``last`` episodes), and summaries."""
    theta = np.asarray(theta, dtype=float)
    accuracy = [float(a) for a in accuracy]
    mean_theta = theta.mean(axis=0)
    alive = surviving_terms(mean_theta, terms, threshold)
    final, low, high, _ = accuracy_summary(accuracy)
    return {
        "terms": [int(r) for r in terms],
        "trials": [int(t) for t in trial_ids],
        "theta": theta.tolist(),
        "last": check_last(last),
        "meta_acc": accuracy,
        "final_meta_acc": final,
        "final_meta_acc_ci": [low, high],
        "theta_mean": {str(r): float(v) for r, v in zip(terms, mean_theta)},
        "survive_threshold": float(threshold),
        "surviving_terms": alive,
        "surviving": len(alive),
        "objective": objective(final, len(alive), max_terms),
    }


def rescore(
    result: dict, threshold: float, max_terms: int | None, accuracy=None, last: int | None = None
) -> dict:
    """``result`` with surviving terms and objective recomputed for another threshold or ``max_terms``
    (and, given, another per-trial ``accuracy`` over ``last`` episodes); what else it holds
    (``theta_share``, ``term_scale``) is kept."""
    accuracy = result["meta_acc"] if accuracy is None else accuracy
    last = result.get("last", 1) if last is None else last  # before "last": the last episode
    scored = job_result(
        result["theta"], result["terms"], result["trials"], accuracy, threshold, max_terms, last
    )
    return {**result, **scored}


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=1))
