"""The papers' statistics (DESIGN §3): mean over trials with a 98 % bootstrap CI, moving average,
one-sided Mann–Whitney U per episode (Supp. Fig. S7). The numbers come from scipy."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.98
RESAMPLES = 500
ALTERNATIVES = ("greater", "less")


def bootstrap_ci(
    samples, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``samples`` (``scipy.stats.bootstrap``).

    A single sample, or samples that are all equal, have no spread: the CI is the value itself.
    """
    values = np.asarray(samples, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-d sample, got shape {values.shape}")
    if values.size == 1 or np.all(values == values[0]):
        return float(values[0]), float(values[0])
    result = stats.bootstrap(
        (values,),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def moving_average(values, window: int) -> np.ndarray:
    """Trailing moving average over the last ``window`` points (fewer at the start)."""
    if window < 1:
        raise ValueError(f"moving-average window={window} is not allowed; allowed: an integer >= 1")
    return pd.Series(np.asarray(values, dtype=float)).rolling(window, min_periods=1).mean().to_numpy()


def summarise(frame: pd.DataFrame, column: str, by: str = "episode", window: int = 1, **ci) -> pd.DataFrame:
    """Per ``by`` value: mean over trials of ``column`` and its bootstrap CI, each smoothed by ``window``."""
    if column not in frame:
        raise ValueError(f"column {column!r} is not in the run's table; columns: {', '.join(frame.columns)}")
    rows = []
    for key, group in frame.groupby(by, sort=True):
        values = group[column].dropna().to_numpy(dtype=float)
        if values.size == 0:
            continue
        low, high = bootstrap_ci(values, **ci)
        rows.append({by: key, "mean": values.mean(), "low": low, "high": high, "n": values.size})
    table = pd.DataFrame(rows, columns=[by, "mean", "low", "high", "n"])
    for name in ("mean", "low", "high"):
        table[name] = moving_average(table[name], window)
    return table


def mann_whitney(a, b, alternative: str = "greater") -> float:
    """One-sided Mann–Whitney U p-value that samples ``a`` exceed (``greater``) or trail ``b``."""
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative={alternative!r} is not allowed; allowed: {', '.join(ALTERNATIVES)}")
    return float(stats.mannwhitneyu(a, b, alternative=alternative).pvalue)


def mann_whitney_per_episode(
    first: pd.DataFrame, second: pd.DataFrame, column: str = "meta_acc", alternative: str = "greater"
) -> pd.DataFrame:
    """p-value per episode that ``first``'s trials exceed ``second``'s in ``column`` (Supp. Fig. S7)."""
    rows = []
    shared = sorted(set(first["episode"]) & set(second["episode"]))
    by_first, by_second = first.groupby("episode"), second.groupby("episode")
    for episode in shared:
        a = by_first.get_group(episode)[column].dropna().to_numpy(dtype=float)  # diverged trials: NaN
        b = by_second.get_group(episode)[column].dropna().to_numpy(dtype=float)
        p = mann_whitney(a, b, alternative) if a.size and b.size else float("nan")  # all trials diverged
        rows.append({"episode": episode, "p": p})
    return pd.DataFrame(rows, columns=["episode", "p"])
