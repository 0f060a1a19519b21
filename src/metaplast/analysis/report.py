"""``python -m metaplast.report RUN_DIR [RUN_DIR ...] --out DIR``: the papers' figures and tables.

A run directory is a meta-training run (``metrics.csv``, ``.hydra/``, ``checkpoints/``) or an online
evaluation (``online.csv``, ``theta.json``); a directory that holds run directories (a Hydra multirun)
stands for all of them. Curves are the mean over trials with a shaded 98 % bootstrap CI from 500
resamples (:mod:`metaplast.analysis.stats`), both of the per-trial curves smoothed by a trailing moving
average; the final meta-accuracy and final Θ are :mod:`metaplast.analysis.results`' (as in
``result.json``). Everything lands in ``DIR`` with an ``index.html`` that shows it all.
"""

from __future__ import annotations

import argparse
import datetime
import html
import math
import os
import re
import shlex
import sys
import textwrap
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

import metaplast  # noqa: E402
from metaplast.analysis.results import accuracy_summary, late_mean  # noqa: E402
from metaplast.analysis.rundir import (  # noqa: E402
    SOURCES,
    FinalTheta,
    RunDir,
    RunError,
    expand,
    read_table,
    theta_columns,
    theta_layer_columns,
)
from metaplast.analysis.stats import (  # noqa: E402
    CONFIDENCE,
    RESAMPLES,
    bootstrap_ci,
    mann_whitney_per_episode,
    summarise,
)
from metaplast.analysis.sweeps import SweepError, online_jobs  # noqa: E402
from metaplast.analysis.sweeps import report as sweep_report  # noqa: E402
from metaplast.core.terms import TERMS  # noqa: E402
from metaplast.safety import save_figure, write_text  # noqa: E402

PROG = "metaplast.report"
#: Table 1 of the paper (3 layers; α_0, α_1, α_2 in degrees), keyed by which layers use eHebb.
TABLE1_PAPER = {
    (False, False, False): (89.89, 76.69, 82.04),
    (False, True, False): (89.95, 59.95, 72.14),
    (False, False, True): (90.03, 75.18, 29.02),
    (True, True, False): (75.29, 61.23, 72.56),
    (False, True, True): (90.2, 49.4, 27.9),
    (True, False, True): (84.86, 74.25, 30.33),
    (True, True, True): (77.93, 49.93, 28.4),
}
#: Classes of the online-evaluation datasets (all of them are used): chance is 1 / classes.
DATASET_CLASSES = {"mnist": 10, "fashion_mnist": 10, "emnist": 47, "glyphs": 47}
#: Runs overlaid in one panel; more are drawn as small multiples (one panel per run).
OVERLAY_MAX = 3
BAND = f"{CONFIDENCE:.0%} bootstrap CI of the mean ({RESAMPLES} resamples)".replace("%", " %")
SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
GREY = "0.35"


class ReportError(ValueError):
    """A run directory or option the report cannot use; the message names it."""


def load_runs(paths) -> list[RunDir]:
    """The run directories of ``paths`` (:func:`metaplast.analysis.rundir.expand`), each with rows."""
    try:
        runs = expand(paths)
        for run in runs:
            if run.table.empty:
                raise ReportError(f"{str(run.path)!r}: its {run.table_path.name} has no rows yet")
            if run.kind == "meta" and "meta_acc" not in run.table:
                raise ReportError(f"{str(run.table_path)!r} has no meta_acc column")
            if run.kind == "online" and "acc" not in run.table:
                raise ReportError(f"{str(run.table_path)!r} has no acc column")
    except RunError as error:
        raise ReportError(str(error)) from None
    return runs


def _unique_labels(runs: list[RunDir]) -> None:
    counts = pd.Series([r.label for r in runs]).value_counts()
    for run in runs:
        if counts[run.label] > 1:
            run.label = f"{run.label} ({run.path.name})"


# ---------------------------------------------------------------- what a run was: dataset, protocol, n


def dataset_name(run: RunDir) -> str:
    """The run's dataset for titles; glyphs are marked SYNTHETIC, IDX sets by their directory."""
    dataset = run.config.get("dataset") or {}
    name = str(dataset.get("name") or run.theta_json.get("dataset") or "?")
    if name == "idx" and dataset.get("root") and "${" not in str(dataset["root"]):
        return f"idx: {Path(str(dataset['root'])).name}"
    return "glyphs (SYNTHETIC)" if name == "glyphs" else name


def n_trials(run: RunDir) -> int:
    return int(run.table["trial"].nunique())


def protocol(run: RunDir) -> str:
    """The run's protocol in a few words, e.g. ``5-way, K = 50, Q = 10, 600 episodes``."""
    if run.kind == "meta":
        meta = run.config.get("meta") or {}
        episodes = int(run.table["episode"].max()) + 1
        if {"M", "K", "Q"} <= set(meta):
            return f"{meta['M']}-way, K = {meta['K']}, Q = {meta['Q']}, {episodes} episodes"
        return f"{episodes} episodes"
    online = run.config.get("online") or {}
    samples = int(run.table["sample"].max())
    every = online.get("every")
    text = f"online, one pass over {samples} {online.get('stream_split', 'stream')} samples"
    return text + (f", tested every {every}" if every else "")


def chance(run: RunDir) -> float | None:
    """Chance accuracy: 1/M for meta-training (M-way tasks), 1/classes for online evaluation."""
    if run.kind == "meta":
        way = (run.config.get("meta") or {}).get("M")
        return 1 / int(way) if isinstance(way, int) and way > 0 else None
    classes = run.theta_json.get("classes") or DATASET_CLASSES.get(
        str((run.config.get("dataset") or {}).get("name") or run.theta_json.get("dataset"))
    )
    return 1 / int(classes) if classes else None


def _chance_label(value: float) -> str:
    return f"chance (1/{round(1 / value)})"


def _distinct(values) -> list:
    return list(dict.fromkeys(values))


def context_line(runs: list[RunDir]) -> str:
    """Dataset, protocol and n of ``runs`` in one line (for titles and captions)."""
    counts = sorted({n_trials(r) for r in runs})
    n = f"n = {counts[0]}" if len(counts) == 1 else f"n = {counts[0]}–{counts[-1]}"
    per = " per run" if len(runs) > 1 else ""
    text = f"{', '.join(_distinct(map(dataset_name, runs)))} · {'; '.join(_distinct(map(protocol, runs)))}"
    return f"{text} · {n} trials{per}"


def _wrap(text: str, width: int = 70) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


# ---------------------------------------------------------------- text: the discovered rule


def pretty_formula(formula: str) -> str:
    """A term's formula with ℓ, ᵀ and a real minus: ``-e_l y_{l-1}^T`` gives ``−e_ℓ y_{ℓ−1}ᵀ``."""
    text = re.sub(r"_l(?![A-Za-z0-9])", "_ℓ", formula.replace("l-1", "ℓ−1"))
    text = text.replace("^T", "ᵀ").replace("^2", "²")
    return re.sub(r"(^|\s)-", r"\1−", text)


def term_symbol(r: int) -> str:
    """``F⁰``, ``F¹⁰``: the term's symbol as text."""
    return "F" + str(int(r)).translate(SUPERSCRIPT)


def term_formula(r: int) -> str:
    term = TERMS.get(int(r))
    return pretty_formula(term.formula) if term is not None else "?"


def _decimals(largest: float) -> int:
    """Decimals that show the largest coefficient with 3 significant digits (at least 2 decimals)."""
    return max(2, 2 - math.floor(math.log10(largest)))


def rule_equation(theta: dict[int, float], keep: float = 0.1) -> str:
    """The rule as an equation of the terms with |θ_r| >= ``keep`` × max |θ|, with readable
    coefficients: ``{0: 0.00978, 2: -0.02361, 9: 0.00415}`` gives ``ΔW = 0.0098 F⁰ − 0.0236 F² +
    0.0042 F⁹`` (:func:`term_key` lists what each F^r is); coefficients below 10⁻³ or from 10³ on
    share a power of ten: ``ΔW = 10⁻⁶ × (3.00 F⁰ − 1.00 F²)``."""
    if not theta:
        raise ReportError("rule_equation needs at least one θ_r")
    if not all(math.isfinite(v) for v in theta.values()):
        return "ΔW = ? (non-finite Θ: " + ", ".join(f"θ_{r} = {v}" for r, v in sorted(theta.items())) + ")"
    largest = max(abs(v) for v in theta.values())
    kept = [(r, v) for r, v in sorted(theta.items()) if largest > 0 and abs(v) >= keep * largest]
    if not kept:
        return "ΔW = 0"
    power = math.floor(math.log10(largest)) if not 1e-3 <= largest < 1e3 else 0
    decimals = _decimals(largest / 10**power)
    parts = []
    for i, (r, v) in enumerate(kept):
        sign = ("−" if v < 0 else "") if i == 0 else ("− " if v < 0 else "+ ")
        parts.append(f"{sign}{abs(v) / 10**power:.{decimals}f} {term_symbol(r)}")
    if power:
        exponent = str(power).replace("-", "⁻").translate(SUPERSCRIPT)
        return f"ΔW = 10{exponent} × ({' '.join(parts)})"
    return "ΔW = " + " ".join(parts)


def term_key(terms) -> list[str]:
    """``F⁰ = −e_ℓ y_{ℓ−1}ᵀ`` for each term of ``terms``."""
    return [f"{term_symbol(r)} = {term_formula(r)}" for r in sorted({int(r) for r in terms})]


def equation_terms(equation: str) -> list[int]:
    """The term ids an equation of :func:`rule_equation` names."""
    digits = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")
    return [int(m.translate(digits)) for m in re.findall(r"F([⁰¹²³⁴⁵⁶⁷⁸⁹]+)", equation)]


def final_theta(run: RunDir) -> FinalTheta:
    """Θ of every trial after the last Adam step: ``result.json``'s once the run finished, else the
    last checkpoint's, else the last episode's rows of ``metrics.csv`` (:data:`SOURCES`)."""
    try:
        return run.final(SOURCES)
    except RunError as error:
        raise ReportError(str(error)) from None


def final_rules(run: RunDir, keep: float) -> list[str]:
    """The discovered rule as equations (:func:`rule_equation`) of the final Θ's trial mean; one per
    layer (``W<ℓ>: ...``) when Θ is per layer (``mean over layers: ...`` where only that is known)."""
    final = final_theta(run)
    mean = final.mean()
    if not final.per_layer:
        prefix = "" if final.share == "all" else "mean over layers: "
        return [prefix + rule_equation(dict(zip(final.terms, mean.tolist())), keep)]
    return [
        f"W{l}: {rule_equation(dict(zip(final.terms, row.tolist())), keep)}" for l, row in enumerate(mean)
    ]


# ---------------------------------------------------------------- figures


def _band(ax, table: pd.DataFrame, x: str, label: str, color=None, alpha: float = 0.22) -> bool:
    """Mean line and CI band of a :func:`summarise` table; False (nothing drawn) when it is empty."""
    if table.empty:
        return False
    (line,) = ax.plot(
        table[x].to_numpy(float), table["mean"].to_numpy(float), label=label, color=color, lw=1.6
    )
    ax.fill_between(
        table[x].to_numpy(float),
        table["low"].to_numpy(float),
        table["high"].to_numpy(float),
        alpha=alpha,
        color=line.get_color(),
        lw=0,
    )
    return True


def _nothing(ax, label: str) -> None:
    """A legend entry (and a note) for a run with no finite value: every trial diverged."""
    ax.plot([], [], color="none", label=f"{label}: no finite values (every trial diverged)")


def _save(fig, out: Path, name: str) -> str:
    save_figure(fig, out / name, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return name


def _grid(n: int):
    """Rows and columns of small multiples for ``n`` panels."""
    columns = 2 if n <= 4 else 3 if n <= 9 else 4
    return math.ceil(n / columns), columns


def _legend_below(ax, handles_from=None, ncol: int = 2) -> None:
    source = handles_from or ax
    handles, labels = source.get_legend_handles_labels()
    if handles:
        ax.legend(
            handles,
            labels,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.16),
            ncol=ncol,
            frameon=False,
            fontsize=9,
        )


def _log_if_spread(axes, tables) -> bool:
    """A log y-axis where positive values span more than 30× their median (e.g. a loss with spikes)."""
    values = np.concatenate([t[["low", "mean", "high"]].to_numpy(float).ravel() for t in tables] or [[]])
    values = values[np.isfinite(values)]
    if values.size and values.min() > 0 and values.max() > 30 * np.median(values):
        for ax in axes:
            ax.set_yscale("log")
        return True
    return False


def curves_figure(runs, column, ylabel, out, name, by="episode", window=1, title="", chance_line=True) -> str:
    """Mean over trials and 98 % bootstrap CI of ``column`` for each run, of the per-trial curves
    smoothed by ``window`` (:func:`summarise`): up to :data:`OVERLAY_MAX` runs overlaid in one panel,
    more as small multiples (one panel per run, the others' means in grey). Accuracy plots get
    chance (1/M) as a dashed line."""
    tables = [summarise(run.table, column, by=by, window=window) for run in runs]
    colors = sns.color_palette("tab10" if len(runs) <= 10 else "husl", len(runs))
    chances = [chance(run) if chance_line else None for run in runs]
    xlabel = "episode" if by == "episode" else "training samples seen"
    if len(runs) <= OVERLAY_MAX:
        fig, ax = plt.subplots(figsize=(7.0, 4.4))
        for run, table, color in zip(runs, tables, colors):
            if not _band(ax, table, by, run.label, color):
                _nothing(ax, run.label)
        for value in _distinct(c for c in chances if c):
            ax.axhline(value, ls="--", lw=1, color=GREY, label=_chance_label(value))
        ax.set(xlabel=xlabel, ylabel=ylabel + (" (log scale)" if _log_if_spread([ax], tables) else ""))
        ax.set_title(_wrap(title, 80), fontsize=10)
        _legend_below(ax)
        return _save(fig, out, name)
    rows, columns = _grid(len(runs))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.1 * rows), sharex=True, sharey=True)
    axes = np.atleast_1d(axes).ravel()
    for index, (ax, run, table, color) in enumerate(zip(axes, runs, tables, colors)):
        for other_index, other in enumerate(tables):
            if other_index != index and not other.empty:
                ax.plot(other[by], other["mean"], color="0.75", lw=0.8, zorder=1)
        if not _band(ax, table, by, "mean, 98 % CI", color):
            ax.text(0.5, 0.5, "no finite values\n(every trial diverged)", ha="center", transform=ax.transAxes)
        if chances[index]:
            ax.axhline(chances[index], ls="--", lw=1, color=GREY, label=_chance_label(chances[index]))
        ax.set_title(_wrap(run.label, 40), fontsize=9)
    for ax in axes[len(runs) :]:
        ax.set_visible(False)
    fig.supxlabel(xlabel)
    fig.supylabel(ylabel + (" (log scale)" if _log_if_spread(axes[: len(runs)], tables) else ""))
    key = "grey: the other runs' means" + "".join(
        f"; dashed: {_chance_label(value)}" for value in _distinct(c for c in chances if c)
    )
    fig.suptitle(f"{_wrap(title, 110)}\n({key})", fontsize=10)
    fig.tight_layout()
    return _save(fig, out, name)


def _indexed_columns(table: pd.DataFrame, prefix: str) -> list[tuple[str, str]]:
    """``(index, column)`` of the columns ``prefix<i>`` of a table, by i; for ``theta_`` the Θ
    columns: ``theta_<r>`` (index ``r``), or per layer ``theta_layer<ℓ>_<r>`` (index ``r,W<ℓ>``)."""
    if prefix == "theta_":
        shared = [(str(r), c) for r, c in theta_columns(table).items()]
        return shared or [(f"{r},W{l}", c) for (l, r), c in theta_layer_columns(table).items()]
    found = [(m.group(1), c) for c in table.columns if (m := re.match(rf"^{prefix}(\d+)$", c))]
    return sorted(found, key=lambda item: int(item[0]))


#: Per kind of per-column figure: column prefix, y label (mathtext), legend symbol.
PER_COLUMN = {
    "theta": ("theta_", r"$\theta_r$", r"\theta"),
    "angle": ("angle_", r"$\alpha_\ell$ (degrees)", r"\alpha"),
    "orth": ("orth_", r"$E_{W,\ell}$", "E"),
}


def _column_label(kind: str, index: str, first: bool, last: bool) -> str:
    """Legend entry: mathtext symbol, and for α_ℓ / E_W,ℓ which end of the network it is."""
    if kind == "theta":
        term, _, layer = index.partition(",")
        return rf"$\theta_{{{term}}}$" + (f" ({layer})" if layer else "")
    symbol = rf"$\alpha_{{{index}}}$" if kind == "angle" else rf"$E_{{W,{index}}}$"
    if first:
        return symbol + (" (input layer)" if kind == "angle" else " (input side)")
    if last:
        return symbol + (" (last hidden layer)" if kind == "angle" else " (output layer)")
    return symbol


def per_column_figure(run, kind, out, name, by="episode", window=1, title="") -> str:
    """One curve per column of one run — θ_r, α_ℓ or E_W,ℓ — mean and CI over trials of the
    smoothed per-trial curves; α_ℓ with the 90° reference (orthogonal to BP's teaching signal)."""
    prefix, ylabel, _ = PER_COLUMN[kind]
    columns = _indexed_columns(run.table, prefix)
    fig, ax = plt.subplots(figsize=(7.6, 4.4))
    palette = sns.color_palette("tab10" if len(columns) <= 10 else "tab20", len(columns))
    if kind != "theta":  # ordered from the input (dark) to the output (light)
        palette = sns.color_palette("viridis", len(columns))
    drawn = 0
    for position, ((index, column), color) in enumerate(zip(columns, palette)):
        label = _column_label(kind, index, position == 0, position == len(columns) - 1 and len(columns) > 1)
        drawn += _band(ax, summarise(run.table, column, by=by, window=window), by, label, color, alpha=0.15)
    if not drawn:
        ax.text(0.5, 0.5, "no finite values (every trial diverged)", ha="center", transform=ax.transAxes)
    if kind == "angle":
        ax.axhline(90, ls="--", lw=1, color=GREY, label="90° (orthogonal to BP)")
        ax.set_ylim(bottom=0)
    elif kind == "theta":
        ax.axhline(0, lw=0.8, color=GREY)
    elif drawn:
        ax.set_yscale("log")
    ax.set(xlabel="episode" if by == "episode" else "training samples seen", ylabel=ylabel)
    ax.set_title(f"{_wrap(run.label, 90)}\n{_wrap(title, 100)}", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    return _save(fig, out, name)


def mann_whitney_figure(runs, out, name, column="meta_acc") -> tuple[str, pd.DataFrame]:
    """Supp. Fig. S7: p-value per episode that each run's trials beat the first run's (one-sided);
    more than :data:`OVERLAY_MAX` comparisons as small multiples."""
    base, frames = runs[0], []
    for run in runs[1:]:
        table = mann_whitney_per_episode(run.table, base.table, column, "greater")
        table.insert(0, "run", run.label)
        table.insert(1, "baseline", base.label)
        frames.append(table)
    colors = sns.color_palette("tab10", len(frames))
    many = len(frames) > OVERLAY_MAX
    rows, columns = _grid(len(frames)) if many else (1, 1)
    size = (4.2 * columns, 3.1 * rows) if many else (7.0, 4.4)
    fig, axes = plt.subplots(rows, columns, figsize=size, sharex=True, sharey=True, squeeze=False)
    axes = axes.ravel()
    for index, (table, color) in enumerate(zip(frames, colors)):
        ax = axes[index if many else 0]
        finite = table[np.isfinite(table["p"])]
        label = f"{table['run'].iloc[0]} > {base.label}"
        ax.plot(finite["episode"], finite["p"], color=color, lw=1.2, label=label)
        if many:
            ax.set_title(_wrap(table["run"].iloc[0], 40), fontsize=9)
    for ax in axes[: len(frames) if many else 1]:
        ax.axhline(0.05, color=GREY, ls="--", lw=1, label="p = 0.05")
        ax.set_yscale("log")
    for ax in axes[len(frames) if many else 1 :]:
        ax.set_visible(False)
    heading = f"one-sided Mann–Whitney U p-value, {column} per episode: each run > {base.label}"
    if many:
        fig.supxlabel("episode")
        fig.supylabel("p-value")
        fig.suptitle(_wrap(heading, 110), fontsize=10)
        fig.tight_layout()
    else:
        axes[0].set(xlabel="episode", ylabel="p-value")
        axes[0].set_title(_wrap(heading, 80), fontsize=10)
        _legend_below(axes[0], ncol=1)
    return _save(fig, out, name), pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------- tables


def _mean_ci(values) -> tuple[float, float, float, int]:
    return accuracy_summary(values)


def summary_table(runs: list[RunDir], last: int | None) -> pd.DataFrame:
    """Per meta run: the final meta-accuracy (:func:`metaplast.analysis.results.final_accuracy`:
    per trial the mean over the last ``last`` episodes, default the run's ``objective.last``; as in
    ``result.json``) and meta-loss the same way, mean and 98 % bootstrap CI over trials; α_ℓ over
    those episodes."""
    rows = []
    for run in runs:
        table, n = run.table, run.last if last is None else last
        trials = run.trials
        row = {"run": run.label, "dataset": dataset_name(run), "episodes": int(table["episode"].max()) + 1}
        row["last"] = n
        accuracy = late_mean(table, trials, n, "meta_acc")
        mean, low, high, count = _mean_ci(accuracy)
        row.update({"trials": len(trials), "trials scored": count})
        if "meta_diverged" in table:
            row["trials ever diverged"] = int((table.groupby("trial")["meta_diverged"].max() > 0).sum())
        row.update({"meta_acc": mean, "meta_acc_low": low, "meta_acc_high": high})
        if "meta_loss" in table:
            loss, low, high, _ = _mean_ci(late_mean(table, trials, n, "meta_loss"))
            row.update({"meta_loss": loss, "meta_loss_low": low, "meta_loss_high": high})
        tail = table[table["episode"] > table["episode"].max() - n]
        row.update({f"α_{l}": tail[c].mean() for l, c in _indexed_columns(table, "angle_")})
        row["dir"] = str(run.path)
        rows.append(row)
    return pd.DataFrame(rows)


def _source(final: FinalTheta) -> str:
    """Where a final Θ was read, for tables: ``result.json``, ``last.ckpt`` or ``metrics.csv``."""
    name = {"result": "result.json", "checkpoint": "last.ckpt", "csv": "metrics.csv"}[final.source]
    return name if final.per_layer or final.share == "all" else f"{name} (mean over layers)"


def _ci(values) -> tuple[float, float]:
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    return bootstrap_ci(finite) if finite.size else (float("nan"), float("nan"))


def theta_table(runs: list[RunDir]) -> pd.DataFrame:
    """Table S1 style: final θ_r per run (after the last Adam step, :func:`final_theta`; ``source``
    says where it was read), mean over trials and 98 % bootstrap CI; per-layer Θ: one row per layer."""
    rows = []
    for run in runs:
        final = final_theta(run)
        values = final.values if final.per_layer else final.values[:, None, :]
        means = final.mean().reshape(values.shape[1:])  # as result.json's theta_mean, bit for bit
        for layer in range(values.shape[1]):
            for index, term in enumerate(final.terms):
                low, high = _ci(values[:, layer, index])
                row = {"run": run.label, "term": term, "mean": means[layer, index], "low": low, "high": high}
                if final.per_layer:
                    row["layer"] = layer
                rows.append({**row, "source": _source(final)})
    columns = ["run", "term", "mean", "low", "high", "source"]
    if any("layer" in row for row in rows):
        columns.insert(1, "layer")
    return pd.DataFrame(rows, columns=columns)


def online_table(runs: list[RunDir]) -> pd.DataFrame:
    """Per online run: test accuracy (mean [98 % CI] over trials) at fixed stream points and the end."""
    ends = {int(run.table["sample"].max()) for run in runs}
    marks = sorted({0, 500, 1000, 2000, 5000, *ends} & {int(s) for r in runs for s in r.table["sample"]})
    rows = []
    for run in runs:
        row = {"run": run.label, "dataset": dataset_name(run), "trials": n_trials(run)}
        for mark in marks:
            values = run.table.loc[run.table["sample"] == mark, "acc"].to_numpy(float)
            values = values[np.isfinite(values)]
            if values.size:
                low, high = bootstrap_ci(values)
                row[f"acc@{mark}"] = f"{values.mean():.3f} [{low:.3f}, {high:.3f}]"
            else:
                row[f"acc@{mark}"] = ""
        row["dir"] = str(run.path)
        rows.append(row)
    return pd.DataFrame(rows)


def table1(runs: list[RunDir], burn_in: int) -> pd.DataFrame:
    """Table 1: α_0, α_1, α_2 after ``burn_in`` episodes, mean over episodes and trials, with the paper's."""
    rows = []
    for run in runs:
        uses = tuple(2 in terms for terms in run.rule.layer_terms)
        later = run.table[run.table["episode"] >= burn_in]
        if later.empty:
            raise ReportError(
                f"{str(run.path)!r} has {run.table['episode'].max() + 1} episodes, none after the burn-in "
                f"of {burn_in}; pass a smaller --burn-in"
            )
        names = ["W0,1", "W1,2", "W2,3"]
        row = {
            "eHebb in": "+".join(n for n, u in zip(names, uses) if u) or "none",
            "trials": later["trial"].nunique(),
        }
        for l in range(3):
            row[f"α_{l}"] = later[f"angle_{l}"].mean()
        for l, value in enumerate(TABLE1_PAPER.get(uses, (np.nan,) * 3)):
            row[f"paper α_{l}"] = value
        row["meta_acc"] = later["meta_acc"].mean()
        rows.append(row)
    order = list(TABLE1_PAPER)
    return pd.DataFrame(rows).iloc[
        np.argsort([order.index(tuple(2 in t for t in r.rule.layer_terms)) for r in runs], kind="stable")
    ]


def _is_table1(run: RunDir) -> bool:
    return (
        run.kind == "meta"
        and run.rule is not None
        and len(run.rule.layer_terms) == 3
        and all(tuple(t) in ((0,), (0, 2)) for t in run.rule.layer_terms)
        and bool((run.config.get("rule") or {}).get("per_layer"))
        and all(f"angle_{l}" in run.table for l in range(3))
    )


def _write_table(table: pd.DataFrame, out: Path, stem: str, floatfmt=".4g") -> tuple[str, str]:
    write_text(out / f"{stem}.csv", table.to_csv(index=False))
    write_text(out / f"{stem}.md", table.to_markdown(index=False, floatfmt=floatfmt) + "\n")
    return f"{stem}.csv", f"{stem}.md"


# ---------------------------------------------------------------- the report


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "run"


def _band_caption(window: int, by: str = "episode") -> str:
    unit = "episodes" if by == "episode" else "test points"
    smoothing = (
        f"of each trial's curve smoothed by a trailing moving average over {window} {unit} "
        "(the CI is computed after smoothing)"
        if window > 1
        else "of the unsmoothed per-trial values"
    )
    return f"Line: mean over trials; band: {BAND}; both {smoothing}. Diverged trial-episodes are left out."


def _table(table: pd.DataFrame, out: Path, stem: str, caption: str, floatfmt=".4g") -> tuple:
    """Write a table as CSV and Markdown; the index item showing it."""
    csv_name, md_name = _write_table(table, out, stem, floatfmt)
    return ("table", (caption, csv_name, md_name))


def _meta_sections(meta: list[RunDir], out: Path, window, burn_in, last, keep) -> list[tuple[str, list]]:
    sections = []
    band, context = _band_caption(window), context_line(meta)
    small = " One panel per run (more than three runs)." if len(meta) > OVERLAY_MAX else ""
    ways = _distinct(round(1 / c) for c in map(chance, meta) if c)
    dashed = f" Dashed: chance, 1/M (M = {', '.join(map(str, ways))})." if ways else ""
    accuracy = curves_figure(
        meta, "meta_acc", "meta-accuracy", out, "meta_acc.png", window=window, title=context
    )
    items = [
        ("img", accuracy, f"Meta-accuracy on the query set per episode. {context}. {band}{dashed}{small}")
    ]
    with_loss = [run for run in meta if "meta_loss" in run.table]
    if with_loss:  # a table may lack it
        loss_context = context_line(with_loss)
        several = " One panel per run (more than three runs)." if len(with_loss) > OVERLAY_MAX else ""
        loss = curves_figure(
            with_loss,
            "meta_loss",
            "meta-loss",
            out,
            "meta_loss.png",
            window=window,
            title=loss_context,
            chance_line=False,
        )
        items.append(
            ("img", loss, f"Meta-loss on the query set per episode. {loss_context}. {band}{several}")
        )
    summary = summary_table(meta, last)
    lasts = ", ".join(map(str, _distinct(summary["last"])))
    items += [
        _table(
            summary,
            out,
            "summary",
            f"Final meta-accuracy and meta-loss: per trial the mean over its last {lasts} episodes (as "
            f"result.json), then the mean over trials with a {BAND}; α_ℓ averaged over the same episodes. "
            "'trials scored': trials with a finite value (a trial diverged in all of them is left out).",
        ),
    ]
    sections.append(("Meta-training", items))
    rules, keys = [], set()
    extra = {
        "theta": "",
        "angle": " α_0 is at the input layer, the last at the last hidden layer; dashed: 90°.",
        "orth": " E_W,1 is the first weight layer (input side), the last the output layer.",
    }
    for run in meta:
        slug, run_context = _slug(run.label), context_line([run])
        run_items = []
        for kind, what in (
            ("theta", "Plasticity coefficients θ_r"),
            ("angle", "Alignment angles α_ℓ between the run's teaching signals and BP's"),
            ("orth", "Orthonormality errors E_W,ℓ (Eqs. 11–12, log scale)"),
        ):
            if _indexed_columns(run.table, PER_COLUMN[kind][0]):
                name = per_column_figure(
                    run, kind, out, f"{kind}_{slug}.png", window=window, title=run_context
                )
                run_items.append(("img", name, f"{what}, {run.label}. {run_context}. {band}{extra[kind]}"))
        for equation in final_rules(run, keep):
            rules.append(f"{run.label}: {equation}")
            keys.update(equation_terms(equation))
            caption = f"Discovered rule (final Θ, trial mean; terms with |θ_r| ≥ {keep} max|θ|)"
            run_items.append(("rule", (caption, equation)))
        sections.append((run.label, run_items))
    key = term_key(keys)
    where = "\nwhere\n" + "\n".join(key) + "\n" if key else ""
    write_text(out / "rules.txt", "\n".join(rules) + "\n" + where)
    if key:
        sections.append(("Terms of the rules", [("text", "where " + "; ".join(key))]))
    caption = f"Θ after the last Adam step ('source': where it was read), mean over trials, {BAND}"
    sections.append(("Final Θ (Table S1 style)", [_table(theta_table(meta), out, "theta_final", caption)]))
    if len(meta) >= 2:
        name, p_values = mann_whitney_figure(meta, out, "mann_whitney.png")
        write_text(out / "mann_whitney.csv", p_values.to_csv(index=False))
        caption = (
            f"Supp. Fig. S7: one-sided Mann–Whitney U p-value per episode that a run's per-trial "
            f"meta-accuracies exceed those of {meta[0].label} (unsmoothed). {context}. Dashed: p = 0.05."
        )
        sections.append(("Mann–Whitney U (Supp. Fig. S7)", [("img", name, caption)]))
    table1_runs = [r for r in meta if _is_table1(r)]
    if table1_runs:
        caption = (
            f"α_ℓ (degrees) averaged over episodes and trials after a burn-in of {burn_in} episodes, "
            "next to the paper's values"
        )
        sections.append(("Table 1", [_table(table1(table1_runs, burn_in), out, "table1", caption, ".2f")]))
    return sections


def _online_section(online: list[RunDir], out: Path) -> tuple[str, list]:
    context, band = context_line(online), _band_caption(1, "sample")
    small = " One panel per run (more than three runs)." if len(online) > OVERLAY_MAX else ""
    classes = _distinct(round(1 / c) for c in map(chance, online) if c)
    dashed = f" Dashed: chance, 1/{', 1/'.join(map(str, classes))}." if classes else ""
    name = curves_figure(online, "acc", "test accuracy", out, "online_acc.png", by="sample", title=context)
    items = [
        (
            "img",
            name,
            f"Online learning: test accuracy against training samples seen. {context}. {band}{dashed}{small}",
        ),
        _table(online_table(online), out, "online_accuracy", f"Test accuracy, mean [{BAND}] over trials"),
    ]
    for run in online:
        if _indexed_columns(run.table, "angle_"):
            run_context = context_line([run])
            name = per_column_figure(
                run, "angle", out, f"online_angle_{_slug(run.label)}.png", by="sample", title=run_context
            )
            caption = (
                f"Alignment angles α_ℓ during online learning, {run.label}. {run_context}. {band} "
                "α_0 is at the input layer; dashed: 90°."
            )
            items.append(("img", name, caption))
    items += _analyses_items(online, out)
    return ("Online evaluation", items)


# ---------------------------------------------------------------- the Oja paper's analyses (online)

#: Files an online evaluation with ``online.analyses=true`` writes (metaplast.run.evaluate.Analyses).
ANALYSES_CSV, ANALYSES_NPZ = "analyses.csv", "analyses.npz"


def read_analyses(run: RunDir) -> tuple[pd.DataFrame | None, dict[str, np.ndarray]]:
    """A run's per-layer analyses: the table of ``analyses.csv`` (None for the recurrent net, which
    has none) and the arrays of ``analyses.npz``; a damaged file raises :class:`ReportError`."""
    table = None
    if (run.path / ANALYSES_CSV).exists():
        try:
            table = read_table(run.path / ANALYSES_CSV, "online")
        except RunError as error:
            raise ReportError(str(error)) from None
    try:
        with np.load(run.path / ANALYSES_NPZ, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, KeyError) as error:
        raise ReportError(f"{str(run.path / ANALYSES_NPZ)!r} cannot be read: {error}") from None
    return table, arrays


def online_label(run: RunDir) -> str:
    """An online run in the Oja paper's words: ``BP+Oja, 10 layers, N(0, 0.01²)``, ``BPTT`` (RNN),
    ``FA``; a rule other than F^0 or Oja keeps :attr:`RunDir.label`."""
    info, model = run.theta_json, run.config.get("model") or {}
    recurrent = info.get("model") == "rnn" or model.get("kind") == "rnn"
    feedback = "BPTT" if recurrent else str(info.get("feedback", "?")).upper()
    terms = tuple(info.get("terms") or (run.rule.terms if run.rule else ()))
    if terms not in ((0,), (0, 9)):
        return run.label
    name = feedback + ("+Oja" if terms == (0, 9) else "")
    sizes = info.get("sizes") or []
    if recurrent:
        name += f", RNN ({sizes[1]} units)" if len(sizes) == 3 else ", RNN"
    elif sizes:
        name += f", {len(sizes) - 1} layers"
    init, std = model.get("init"), model.get("init_std")
    if init == "normal" and std is not None:
        name += f", N(0, {std:g}²)"
    elif init and init != "xavier_uniform":
        name += f", {init}"
    return name


def _oja_relabel(runs: list[RunDir]) -> None:
    """Online runs of the Oja paper's rules (F^0, Oja) get :func:`online_label` when their networks or
    initialisations differ (else the usual labels tell them apart)."""
    online = [r for r in runs if r.kind == "online" and r.theta_json.get("sizes")]
    models = {
        (
            tuple(r.theta_json["sizes"]),
            str((r.config.get("model") or {}).get("init")),
            str((r.config.get("model") or {}).get("init_std")),
            r.theta_json.get("model"),
        )
        for r in online
    }
    if len(models) > 1:
        for run in online:
            run.label = online_label(run)


def _layer_columns(table: pd.DataFrame, prefix: str) -> list[tuple[int, str]]:
    found = [(int(m.group(1)), c) for c in table.columns if (m := re.fullmatch(rf"{prefix}(\d+)", c))]
    return sorted(found)


def layer_curves_figure(runs, tables, prefix, ylabel, symbol, out, name, title="", log=False) -> str:
    """One panel per run, one curve per layer ℓ (input side dark, output side light): mean over trials
    and 98 % bootstrap CI of ``<prefix><ℓ>`` against training samples seen; panels share the y-axis so
    runs compare (Oja paper Figs. 2 and 6, Supp. Fig. S1)."""
    rows, columns = _grid(len(runs))
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.6 * columns, 3.4 * rows), sharex=True, sharey=True, squeeze=False
    )
    axes = axes.ravel()
    for ax, run, table in zip(axes, runs, tables):
        layers = _layer_columns(table, prefix)
        palette = sns.color_palette("viridis", len(layers))
        drawn = 0
        for (layer, column), color in zip(layers, palette):
            label = rf"${symbol}_{{{layer}}}$"
            drawn += _band(ax, summarise(table, column, by="sample"), "sample", label, color, alpha=0.15)
        if not drawn:
            ax.text(0.5, 0.5, "no finite values", ha="center", transform=ax.transAxes)
        ax.set_title(_wrap(run.label, 45), fontsize=9)
        if log and drawn:
            ax.set_yscale("log")
        if layers:
            ax.legend(fontsize=7, ncol=2 if len(layers) > 5 else 1, frameon=False)
    for ax in axes[len(runs) :]:
        ax.set_visible(False)
    fig.supxlabel("training samples seen")
    fig.supylabel(ylabel + (" (log scale)" if log else ""))
    fig.suptitle(_wrap(title, 120), fontsize=10)
    fig.tight_layout()
    return _save(fig, out, name)


#: The hidden layers of the 10-layer net whose PCA the Oja paper's Fig. 3 shows.
PAPER_PCA_LAYERS = (1, 3, 7, 9)


def _spread_layers(layers: list[int], most: int = 4) -> list[int]:
    """Up to ``most`` layers spread from the first to the last (the paper's y_1, y_3, y_7, y_9 of 9)."""
    if len(layers) <= most:
        return layers
    if set(PAPER_PCA_LAYERS) <= set(layers) and most == len(PAPER_PCA_LAYERS):
        return list(PAPER_PCA_LAYERS)
    picks = np.unique(np.round(np.linspace(0, len(layers) - 1, most)).astype(int))
    return [layers[i] for i in picks]


def explained_variance_figure(runs, arrays, out, name, title="") -> str:
    """Oja paper Fig. 3: the cumulative fraction of variance of each hidden layer's activations (probe
    images, end of the stream) explained by its first k principal components, one panel per hidden
    layer (up to four, spread over the depth), one curve per run: mean over trials, 98 % bootstrap CI."""
    layer_sets = [sorted(int(k.split("_")[1]) for k in a if k.startswith("ev_")) for a in arrays]
    layers = _spread_layers(sorted(set().union(*map(set, layer_sets))))
    height, panels = 3.6 + 0.3 * math.ceil(len(runs) / 3), max(len(layers), 1)
    fig, axes = plt.subplots(1, panels, figsize=(3.9 * panels, height), squeeze=False)
    axes = axes.ravel()
    colors = sns.color_palette("tab10", len(runs))
    for ax, layer in zip(axes, layers):
        for run, data, color in zip(runs, arrays, colors):
            key = f"ev_{layer}"
            if key not in data:
                continue
            final = data[key][-1]  # (trials, k) at the end of the stream
            frame = pd.DataFrame(
                [
                    {"pcs": k + 1, "trial": t, "ev": final[t, k]}
                    for t in range(final.shape[0])
                    for k in range(final.shape[1])
                ]
            )
            _band(ax, summarise(frame, "ev", by="pcs"), "pcs", run.label, color)
        ax.set_title(rf"$y_{{{layer}}}$", fontsize=10)
        ax.set(xlabel="principal components k", ylim=(0, 1.02))
        ax.set_xscale("log")
    axes[0].set_ylabel("cumulative explained variance")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(_wrap(title, 120), fontsize=10)
    fig.tight_layout(rect=(0, 0.04 + 0.05 * math.ceil(len(labels) / 3), 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, fontsize=9)
    return _save(fig, out, name)


def reconstructions_figure(run, data, out, name, shown: int = 6) -> str:
    """Oja paper Fig. 4: probe images (left column) and, per hidden layer ℓ (left to right, deeper),
    the input reconstructed from ``y_ℓ`` through the transposed forward weights,
    ``x̂ = W_1^T … W_ℓ^T y_ℓ``, of trial 0 at the end of the stream (each image on its own grey
    scale: the linear decoder does not keep the pixels' scale)."""
    images = data["images"][:shown]
    layers = sorted(int(k.split("_")[1]) for k in data if k.startswith("recon_"))
    side = int(round(math.sqrt(images.shape[1])))
    fig, axes = plt.subplots(
        len(images), 1 + len(layers), figsize=(1.25 * (1 + len(layers)), 1.3 * len(images)), squeeze=False
    )
    for row, image in enumerate(images):
        panels = [image] + [data[f"recon_{layer}"][0, row] for layer in layers]
        for column, panel in enumerate(panels):
            ax = axes[row, column]
            if panel.size == side * side and np.isfinite(panel).all():
                ax.imshow(panel.reshape(side, side), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(
                    "input $x$" if column == 0 else rf"from $y_{{{layers[column - 1]}}}$", fontsize=9
                )
    fig.suptitle(_wrap(run.label, 60), fontsize=10)
    fig.tight_layout()
    return _save(fig, out, name)


def state_norms_figure(runs, arrays, out, name, title="") -> str:
    """The recurrent net's state norm ``‖z_t‖`` over the T steps of the probe sequences at the end of
    the stream (image shown for the first steps, then blanks): mean over trials, 98 % bootstrap CI."""
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for run, data, color in zip(runs, arrays, sns.color_palette("tab10", len(runs))):
        final = data["state_norm"][-1]  # (trials, T)
        frame = pd.DataFrame(
            [
                {"t": k + 1, "trial": t, "norm": final[t, k]}
                for t in range(final.shape[0])
                for k in range(final.shape[1])
            ]
        )
        _band(ax, summarise(frame, "norm", by="t"), "t", run.label, color)
    ax.set(xlabel="time step $t$", ylabel=r"$\|z_t\|$ (probe mean)")
    ax.set_title(_wrap(title, 90), fontsize=10)
    _legend_below(ax)
    return _save(fig, out, name)


def _analyses_items(runs: list[RunDir], out: Path) -> list:
    """The Oja paper's per-layer figures of the online runs that logged analyses (``online.analyses``)."""
    found = [(run, *read_analyses(run)) for run in runs if (run.path / ANALYSES_NPZ).exists()]
    if not found:
        return []
    band = _band_caption(1, "sample")
    items = []
    feed = [(r, t, a) for r, t, a in found if t is not None and not t.empty]
    if feed:
        fruns, tables, arrays = zip(*feed)
        context = context_line(list(fruns))
        for prefix, ylabel, symbol, stem, what, log in (
            (
                "norm_",
                r"activation norm $\|y_\ell\|$",
                "y",
                "oja_activation_norms",
                "Fig. 6: mean activation norm ‖y_ℓ‖ of each layer on the probe images (ℓ = 0: the input)",
                False,
            ),
            (
                "recon_",
                r"reconstruction error (Eq. 2)",
                r"\mathcal{J}",
                "oja_reconstruction_error",
                "Fig. 2: the paper's reconstruction error (Eq. 2), (1/N) Σ ‖y_{ℓ-1} − W_ℓᵀ σ(W_ℓ y_{ℓ-1})‖² "
                "over the probe images, per hidden layer ℓ",
                True,
            ),
            (
                "dw_bp_",
                r"$\|\Delta W_{BP}\|$",
                "W",
                "oja_update_norms_bp",
                "Supp. Fig. S1 A-B: norm of "
                "backprop's component θ_1 ‖∂L/∂W_ℓ‖ of the update on the next training sample, per layer",
                True,
            ),
            (
                "dw_",
                r"$\|\Delta W\|$",
                "W",
                "oja_update_norms",
                "Supp. Fig. S1 C-D: norm of the whole "
                "update ‖ΔW_ℓ‖ of the rule on the next training sample, per layer",
                True,
            ),
        ):
            pattern = rf"{prefix}\d+"
            if not any(any(re.fullmatch(pattern, c) for c in t.columns) for t in tables):
                continue
            name = layer_curves_figure(
                fruns, tables, prefix, ylabel, symbol, out, f"{stem}.png", context, log
            )
            items.append(("img", name, f"{what}. {context}. {band} One panel per run, shared y-axis."))
        name = explained_variance_figure(fruns, arrays, out, "oja_explained_variance.png", context)
        items.append(
            (
                "img",
                name,
                "Fig. 3: cumulative fraction of the variance of each hidden layer's activations (probe "
                "images, end of the stream) explained by its first k principal components (log k). "
                f"{context}. Line: mean over trials; band: {BAND}.",
            )
        )
        for run, _, data in feed:
            if "images" in data:
                name = reconstructions_figure(run, data, out, f"oja_reconstructions_{_slug(run.label)}.png")
                caption = (
                    f"Fig. 4: probe images (left) and the input reconstructed from each hidden layer's "
                    f"activations through the transposed forward weights (x̂ = W_1ᵀ…W_ℓᵀ y_ℓ), trial 0 at "
                    f"the end of the stream, {run.label}. Each image on its own grey scale."
                )
                items.append(("img", name, caption))
    recurrent = [(r, a) for r, t, a in found if "state_norm" in a]
    if recurrent:
        rruns, rarrays = zip(*recurrent)
        context = context_line(list(rruns))
        name = state_norms_figure(rruns, rarrays, out, "oja_state_norms.png", context)
        caption = f"RNN state norm ‖z_t‖ over the sequence at the end of the stream. {context}. {band}"
        items.append(("img", name, caption))
    return items


def write_report(
    runs: list[RunDir],
    out: Path,
    window: int = 5,
    burn_in: int = 100,
    last: int | None = None,
    keep: float = 0.1,
    command: str | None = None,
):
    """Every figure and table for ``runs`` under ``out``, and ``index.html``; returns the written names.

    ``last``: episodes per trial of the final accuracy (default: each run's ``objective.last``);
    ``command``: the command line that made the report, shown in its header."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sns.set_theme(style="whitegrid", context="notebook")
    _oja_relabel(runs)
    _unique_labels(runs)
    meta = [r for r in runs if r.kind == "meta"]
    online = [r for r in runs if r.kind == "online"]
    sections = _meta_sections(meta, out, window, burn_in, last, keep) if meta else []
    if online:
        sections.append(_online_section(online, out))
    _write_index(out, sections, runs, command)
    return sorted(p.name for p in out.iterdir())


CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:auto;padding:0 1em;color:#222}
header{border-bottom:1px solid #ccc;margin-bottom:1em}
figure{margin:0}
figure img{width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:13px;color:#444;margin:.3em 0 1em}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:1em}
table{border-collapse:collapse;font-size:12px;margin-bottom:1em}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
.rule{font-size:16px;font-family:'DejaVu Serif',serif;background:#f6f6f6;padding:.4em .8em}
code{font-size:12px;word-break:break-all}
.scroll{overflow-x:auto}
"""


def _html_table(frame: pd.DataFrame) -> str:
    table = frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0)
    return f"<div class='scroll'>{table}</div>"


def _write_index(out: Path, sections, runs, command: str | None) -> None:
    kinds = sorted({"meta-training" if r.kind == "meta" else "online evaluation" for r in runs})
    header = pd.DataFrame(
        [
            {
                "run": r.label,
                "kind": "meta-training" if r.kind == "meta" else "online",
                "dataset": dataset_name(r),
                "protocol": protocol(r),
                "trials": n_trials(r),
                "directory": str(r.path),
            }
            for r in runs
        ]
    )
    made = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    datasets = ", ".join(_distinct(map(dataset_name, runs)))
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>metaplast report: {html.escape(datasets)}</title>",
        f"<style>{CSS}</style></head><body><header><h1>metaplast report</h1>",
        f"<p>{len(runs)} run(s) ({', '.join(kinds)}) on {html.escape(datasets)}. "
        f"Statistics: mean over trials, {html.escape(BAND)}.</p>",
        _html_table(header),
        f"<p>Made {html.escape(made)} with metaplast {html.escape(metaplast.__version__)} by:<br>"
        f"<code>{html.escape(command or 'metaplast.analysis.report.write_report(...)')}</code></p>",
        "<nav><b>Contents:</b> "
        + " · ".join(f"<a href='#s{i}'>{html.escape(title)}</a>" for i, (title, _) in enumerate(sections))
        + "</nav></header>",
    ]
    for number, (title, items) in enumerate(sections):
        parts.append(f"<section id='s{number}'><h2>{html.escape(title)}</h2>")
        figures = [item for item in items if item[0] == "img"]
        if figures:
            parts.append("<div class='grid'>")
            for _, name, caption in figures:
                parts.append(
                    f"<figure><img src='{html.escape(name)}' alt='{html.escape(caption[:120])}'>"
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                )
            parts.append("</div>")
        for item in items:
            kind, payload = item[0], item[1]
            if kind == "text":
                parts.append(f"<p>{html.escape(payload)}</p>")
            elif kind == "rule":
                caption, equation = payload
                parts.append(f"<p>{html.escape(caption)}:</p><p class='rule'>{html.escape(equation)}</p>")
            elif kind == "table":
                caption, csv_name, md_name = payload
                table = pd.read_csv(out / csv_name)
                links = f"(<a href='{csv_name}'>CSV</a>, <a href='{md_name}'>Markdown</a>)"
                parts.append(f"<p>{html.escape(caption)} {links}</p>")
                parts.append(_html_table(table))
        parts.append("</section>")
    parts.append("</body></html>")
    write_text(out / "index.html", "\n".join(parts))


# ---------------------------------------------------------------- the command line


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error and exit code 2."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(prog="python -m metaplast.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (or multirun directories holding them)")
    parser.add_argument("--out", required=True, help="output directory for figures, tables and index.html")
    parser.add_argument("--window", type=int, default=5, help="moving-average window in episodes (default 5)")
    parser.add_argument(
        "--burn-in", type=int, default=100, help="Table 1: episodes dropped before averaging α (default 100)"
    )
    parser.add_argument(
        "--last",
        type=int,
        default=None,
        help="final accuracy: episodes averaged per trial (default: each run's objective.last, 10)",
    )
    parser.add_argument(
        "--keep", type=float, default=0.1, help="rule text: keep |θ_r| >= keep × max|θ| (0..1, default 0.1)"
    )
    parser.add_argument("--verbose", action="store_true", help="warnings, and a traceback on an error")
    return parser.parse_args(argv)


#: The largest moving-average window, final-accuracy span and burn-in accepted.
LIMIT = 10**7


def check_args(args: argparse.Namespace) -> Path:
    """Every option in range, and ``--out`` a directory that can be written (not a run's); returns it."""
    if not 1 <= args.window <= LIMIT:
        raise ReportError(f"--window={args.window} is not allowed; allowed: an integer in [1, {LIMIT}]")
    if args.last is not None and not 1 <= args.last <= LIMIT:
        raise ReportError(f"--last={args.last} is not allowed; allowed: an integer in [1, {LIMIT}]")
    if not 0 <= args.burn_in <= LIMIT:
        raise ReportError(f"--burn-in={args.burn_in} is not allowed; allowed: an integer in [0, {LIMIT}]")
    if not (math.isfinite(args.keep) and 0 <= args.keep <= 1):
        raise ReportError(f"--keep={args.keep} is not allowed; allowed: a number in [0, 1]")
    return check_out(args.out, args.runs)


def check_out(out, inputs=()) -> Path:
    """``out`` as an output directory: not an existing file, not a run directory nor one of
    ``inputs``; created (with its parents), and writable."""
    path = Path(out)
    if str(out).strip() == "":
        raise ReportError("--out is empty; allowed: a directory path")
    if path.exists() and not path.is_dir():
        raise ReportError(
            f"--out {str(path)!r} exists and is not a directory; allowed: a new or existing directory"
        )
    resolved = os.path.realpath(path)  # (Path.resolve raises on a symlink loop)
    if any(resolved == os.path.realpath(p) for p in inputs):
        raise ReportError(
            f"--out {str(path)!r} is one of the run directories given; allowed: another directory"
        )
    if path.is_dir() and (
        RunDir.is_run(path) or (path / ".hydra").is_dir() or (path / "result.json").exists()
    ):
        raise ReportError(f"--out {str(path)!r} is a run directory; allowed: a directory that holds no run")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ReportError(f"--out {str(path)!r} cannot be created: {error.strerror or error}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ReportError(f"--out {str(path)!r} is not writable")
    return path


def fail(message: str, code: int = 2):
    """Print ``message`` as one line to stderr and exit with ``code``."""
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(code)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    verbose = args.verbose or os.environ.get("HYDRA_FULL_ERROR") == "1"
    command = shlex.join(["python", "-m", "metaplast.report", *argv])
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")
            out = check_args(args)
            runs = load_runs(args.runs)
            written = write_report(runs, out, args.window, args.burn_in, args.last, args.keep, command)
            print(f"wrote {len(written)} files to {out}: open {out / 'index.html'}")
            sweeps = [Path(path) for path in args.runs if (Path(path) / "multirun.yaml").exists()]
            sweeps = [path for path in sweeps if not online_jobs([path])]  # online ones: in the report
            if sweeps:  # Hydra multirun directories: also one table over all their jobs (metaplast.sweep)
                sweep_report(sweeps, out / "sweep", last=args.last)
                print(f"wrote the sweep table and λ plots to {out / 'sweep'}: sweep.md, sweep.csv")
    except (ReportError, RunError, SweepError) as error:
        fail(str(error))
    except OSError as error:
        fail(f"{error.filename or ''}: {error.strerror or error}".lstrip(": "))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as error:  # the last resort: one line, unless --verbose
        if verbose:
            raise
        fail(f"unexpected {type(error).__name__}: {error} (rerun with --verbose for the traceback)")


if __name__ == "__main__":
    main()
