"""Sweep tables: one table and two plots per sweep (``metaplast-sweep``, and the report of a multirun).

Collects every finished job (with ``result.json``) under the given Hydra (multi)run directories
into ``sweep.csv`` / ``sweep.md`` (one row per configuration, seeds and trials pooled: mean final
meta-accuracy with the papers' 98 % bootstrap CI, :func:`metaplast.analysis.stats.bootstrap_ci`;
mean final Θ; surviving terms, |θ_r| > threshold) and plots λ against accuracy and against the
number of surviving terms, one line per rule.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from metaplast.analysis.results import RESULT, surviving_terms
from metaplast.analysis.rundir import RunDir, RunError, hydra_jobs, theta_term
from metaplast.analysis.stats import bootstrap_ci
from metaplast.safety import save_figure, write_text

log = logging.getLogger("metaplast")

#: Override keys shown through the derived ``rule`` and ``lam`` columns, or pooled (``seed``).
POOLED = ("seed", "meta.first_trial")
DERIVED = ("rule", "rule.terms", "rule.per_layer", "reg.lam")


def find_jobs(directories) -> list[RunDir]:
    """Job directories (those with ``.hydra/overrides.yaml``) under each given directory, in order."""
    try:
        return [job for directory in directories for job in hydra_jobs(directory)]
    except RunError as error:
        raise SystemExit(f"metaplast.sweep: error: {error}") from None


def collect(directories) -> tuple[pd.DataFrame, list[Path]]:
    """One row per finished job and trial (overrides, rule, λ, seed, accuracy, Θ), and the unfinished jobs."""
    rows, unfinished = [], []
    for job in find_jobs(directories):
        result = job.result
        if result is None:
            unfinished.append(job.path)
            continue
        final = job.final(sources=("result",))
        config = job.config
        reg = config.get("reg") or {}
        threshold = (config.get("objective") or {}).get("survive_threshold", 1e-3)
        for index, trial in enumerate(final.trials):
            row = {"job": str(job.path), **{f"override:{k}": v for k, v in job.overrides.items()}}
            row.update(
                rule=job.rule_label,
                lam=float(reg.get("lam", 0.0)) if str(reg.get("kind", "none")) != "none" else 0.0,
                seed=int(config.get("seed", 0)),
                trial=int(trial),
                threshold=float(threshold),
                acc=result["meta_acc"][index],
            )
            row.update(final.columns(final.values[index]))
            rows.append(row)
    return pd.DataFrame(rows), unfinished


def _theta_order(column: str) -> tuple:
    """Θ columns shared by all layers by term id, then per-layer ones by layer and term id."""
    return column.startswith("theta_layer"), [int(n) for n in re.findall(r"\d+", column)]


def aggregate(trials: pd.DataFrame, threshold: float | None = None) -> pd.DataFrame:
    """One row per configuration (all seeds and trials pooled), sorted by rule and λ."""
    override_columns = [c for c in trials.columns if c.startswith("override:")]
    varying = [
        c
        for c in override_columns
        if c.removeprefix("override:") not in POOLED + DERIVED and trials[c].fillna("").nunique() > 1
    ]
    keys = [*varying, "rule", "lam"]
    theta_columns = sorted((c for c in trials.columns if theta_term(c) is not None), key=_theta_order)
    table = []
    for values, group in trials.fillna({c: "" for c in varying}).groupby(keys, sort=False):
        accuracy = group["acc"].dropna()  # diverged trials have none
        low, high = bootstrap_ci(accuracy) if len(accuracy) else (float("nan"), float("nan"))
        mean_theta = {c: group[c].mean() for c in theta_columns if group[c].notna().all()}
        limit = threshold if threshold is not None else group["threshold"].max()
        alive = sorted(set(surviving_terms(mean_theta.values(), [theta_term(c) for c in mean_theta], limit)))
        row = {c.removeprefix("override:"): v for c, v in zip(keys, values)}
        row.update(
            jobs=group["job"].nunique(),
            trials=len(group),
            acc=accuracy.mean(),
            acc_lo=low,
            acc_hi=high,
            **mean_theta,
            surviving=len(alive),
            surviving_terms=" ".join(str(r) for r in alive),
        )
        table.append(row)
    columns = [c.removeprefix("override:") for c in keys]
    return pd.DataFrame(table).sort_values(columns, kind="stable").reset_index(drop=True)


def markdown(table: pd.DataFrame) -> str:
    shown = table.copy()
    shown["acc (98% CI)"] = [
        f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in zip(shown.acc, shown.acc_lo, shown.acc_hi)
    ]
    shown = shown.drop(columns=["acc", "acc_lo", "acc_hi"])
    order = [c for c in shown.columns if not c.startswith("theta_") and c != "acc (98% CI)"]
    order.insert(order.index("trials") + 1, "acc (98% CI)")
    order[order.index("trials") + 2 : order.index("trials") + 2] = [
        c for c in shown if c.startswith("theta_")
    ]
    shown = shown[order].rename(columns={c: f"θ_{c.removeprefix('theta_')}" for c in order if "theta_" in c})
    shown = shown.astype(object).where(shown.notna(), None)  # a term a rule lacks: an empty cell
    return shown.to_markdown(index=False, floatfmt=".3g", missingval="") + "\n"


def plot(table: pd.DataFrame, out: Path) -> list[Path]:
    """λ vs final meta-accuracy (98 % CI band) and λ vs surviving terms, one line per rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    extra = list(table.columns[: table.columns.get_loc("rule")])  # the other varying overrides
    data = table.assign(setting=table[extra].astype(str).agg(", ".join, axis=1) if extra else "")
    style = "setting" if extra else None
    paths = []
    for y, label, name in (
        ("acc", "final meta-accuracy", "lambda_accuracy"),
        ("surviving", "surviving terms", "lambda_surviving"),
    ):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        sns.lineplot(data=data, x="lam", y=y, hue="rule", style=style, marker="o", errorbar=None, ax=ax)
        if y == "acc":
            palette = dict(zip(data["rule"].unique(), sns.color_palette(n_colors=data["rule"].nunique())))
            for (rule, _), line in data.groupby(["rule", "setting"], sort=False):
                ax.fill_between(line["lam"], line["acc_lo"], line["acc_hi"], color=palette[rule], alpha=0.2)
        positive = data.loc[data["lam"] > 0, "lam"]
        if len(positive):
            ax.set_xscale("symlog", linthresh=float(positive.min()))
            ax.set_xlim(left=float(data["lam"].min()))  # no empty negative λ range
        ax.set(xlabel="λ", ylabel=label)
        fig.tight_layout()
        paths.append(out / f"{name}.png")
        save_figure(fig, paths[-1], dpi=120)
        plt.close(fig)
    return paths


def report(directories, out: Path, threshold: float | None = None) -> pd.DataFrame:
    """Write ``trials.csv``, ``sweep.csv``, ``sweep.md`` and the two plots into ``out``; return the table."""
    trials, unfinished = collect(directories)
    for job in unfinished:
        log.warning("skipped unfinished job %s (no %s)", job, RESULT)
    if trials.empty:
        raise SystemExit(
            f"metaplast.sweep: error: no finished job (with {RESULT}) under {list(map(str, directories))}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate(trials, threshold)
    write_text(out / "trials.csv", trials.to_csv(index=False))
    write_text(out / "sweep.csv", table.to_csv(index=False))
    write_text(out / "sweep.md", markdown(table))
    plot(table, out)
    return table
