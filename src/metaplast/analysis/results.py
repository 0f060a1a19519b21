"""What a finished job reports (``result.json``): final Θ and meta-accuracy per trial, surviving
terms and the objective. One definition for every consumer: the runner writes it, the sweep
table, the report and the optuna objective read it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from metaplast.safety import write_text

RESULT = "result.json"


def objective(accuracy: float, surviving: int, max_terms: int | None) -> float:
    """Final mean meta-accuracy; with ``max_terms`` each surviving term beyond it costs 1 (> any accuracy)."""
    if max_terms is None or surviving <= max_terms:
        return float(accuracy)
    return float(accuracy) - (surviving - max_terms)


def surviving_terms(theta_mean, terms, threshold: float) -> list[int]:
    """The terms r with |θ_r| > threshold (Table S1: survivors vs terms below 0.09e-2)."""
    return [int(r) for r, value in zip(terms, theta_mean) if abs(value) > threshold]


def job_result(theta, terms, trial_ids, accuracy, threshold: float, max_terms: int | None) -> dict:
    """What a finished job reports: Θ ``(trials, R)`` and final meta-accuracy per trial, and summaries."""
    theta = np.asarray(theta, dtype=float)
    accuracy = [float(a) for a in accuracy]
    mean_theta = theta.mean(axis=0)
    alive = surviving_terms(mean_theta, terms, threshold)
    finite = [a for a in accuracy if np.isfinite(a)]  # diverged trials are left out
    final = float(np.mean(finite)) if finite else float("nan")
    return {
        "terms": [int(r) for r in terms],
        "trials": [int(t) for t in trial_ids],
        "theta": theta.tolist(),
        "meta_acc": accuracy,
        "final_meta_acc": final,
        "theta_mean": {str(r): float(v) for r, v in zip(terms, mean_theta)},
        "survive_threshold": float(threshold),
        "surviving_terms": alive,
        "surviving": len(alive),
        "objective": objective(final, len(alive), max_terms),
    }


def rescore(result: dict, threshold: float, max_terms: int | None) -> dict:
    """``result`` with surviving terms and objective recomputed for another threshold or ``max_terms``;
    what else it holds (``theta_share``, ``term_scale``) is kept."""
    scored = job_result(
        result["theta"], result["terms"], result["trials"], result["meta_acc"], threshold, max_terms
    )
    return {**result, **scored}


def final_accuracy(csv_path: Path, trial_ids) -> list[float] | None:
    """Per-trial meta-accuracy of the last episode in ``metrics.csv`` (None without rows)."""
    if not Path(csv_path).exists():
        return None
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return None
    last = max(int(row["episode"]) for row in rows)
    by_trial = {  # a diverged (frozen) trial has no accuracy: NaN
        int(row["trial"]): float(row["meta_acc"] or "nan") for row in rows if int(row["episode"]) == last
    }
    return [by_trial[t] for t in trial_ids]


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=1))
