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


def bootstrap_ci_rows(
    rows, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`bootstrap_ci` of each row's finite values, ``(low, high)`` arrays (NaN for a row
    without any), as calling it row by row (to rounding): rows with the same number of values share
    one vectorised ``scipy.stats.bootstrap`` call, which draws the same resamples as one call each."""
    values = np.asarray(rows, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"bootstrap_ci_rows needs a 2-d array, got shape {values.shape}")
    low, high = np.full(len(values), np.nan), np.full(len(values), np.nan)
    finite = np.isfinite(values)
    counts = finite.sum(axis=1)
    for n in np.unique(counts[counts > 0]):
        index = np.flatnonzero(counts == n)
        block = np.stack([values[i][finite[i]] for i in index])
        constant = (block == block[:, :1]).all(axis=1)  # no spread: the value itself
        low[index[constant]] = high[index[constant]] = block[constant, 0]
        if (~constant).any():
            result = stats.bootstrap(
                (block[~constant],),
                np.mean,
                axis=-1,
                confidence_level=confidence,
                n_resamples=resamples,
                method="percentile",
                random_state=np.random.default_rng(seed),
            )
            low[index[~constant]] = result.confidence_interval.low
            high[index[~constant]] = result.confidence_interval.high
    return low, high


def moving_average(values, window: int) -> np.ndarray:
    """Trailing moving average over the last ``window`` points (fewer at the start; NaN skipped)."""
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"moving-average window={window} is not allowed; allowed: an integer >= 1")
    return pd.Series(np.asarray(values, dtype=float)).rolling(window, min_periods=1).mean().to_numpy()


def trial_curves(frame: pd.DataFrame, column: str, by: str = "episode", window: int = 1) -> pd.DataFrame:
    """``column`` as one curve per trial (``by`` values × trials), each smoothed by a trailing moving
    average over ``window`` points; where a trial has no value (diverged) it stays NaN."""
    for name in (column, by, "trial"):
        if name not in frame:
            raise ValueError(
                f"column {name!r} is not in the run's table; columns: {', '.join(frame.columns)}"
            )
    values = pd.to_numeric(frame[column], errors="coerce").where(lambda v: np.isfinite(v))
    curves = values.groupby([frame[by], frame["trial"]]).mean().unstack("trial").sort_index()
    smoothed = curves.apply(lambda curve: pd.Series(moving_average(curve, window), index=curve.index))
    return smoothed.where(curves.notna())


def summarise(frame: pd.DataFrame, column: str, by: str = "episode", window: int = 1, **ci) -> pd.DataFrame:
    """Per ``by`` value: mean over trials of ``column`` and its bootstrap CI (:func:`bootstrap_ci`),
    both of the per-trial curves smoothed by ``window`` first (:func:`trial_curves`); ``n`` is the
    number of trials with a value. Rows where no trial has one are left out."""
    if column not in frame:
        raise ValueError(f"column {column!r} is not in the run's table; columns: {', '.join(frame.columns)}")
    if "trial" not in frame:  # one sample per row: nothing to smooth per trial
        if window != 1:
            raise ValueError(f"window={window} needs a 'trial' column to smooth each trial's curve")
        frame = frame.assign(trial=frame.groupby(by).cumcount())
    curves = trial_curves(frame, column, by, window)
    matrix = curves.to_numpy(float)
    counts = np.isfinite(matrix).sum(axis=1)
    low, high = bootstrap_ci_rows(matrix, **ci)
    with np.errstate(invalid="ignore"):
        mean = np.where(counts > 0, np.nansum(matrix, axis=1) / np.maximum(counts, 1), np.nan)
    table = pd.DataFrame({by: curves.index, "mean": mean, "low": low, "high": high, "n": counts})
    return table[table["n"] > 0].reset_index(drop=True)


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
