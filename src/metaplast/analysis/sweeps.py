"""Sweep tables: one table and two plots per sweep (``metaplast-sweep``, and the report of a multirun).

Collects every finished job (with ``result.json``) under the given Hydra (multi)run directories
into ``sweep.csv`` / ``sweep.md`` (one row per configuration, seeds and trials pooled: mean final
meta-accuracy — per trial the mean over its last N episodes,
:func:`metaplast.analysis.results.final_accuracy`, as in ``result.json`` and the optuna objective —
with the papers' 98 % bootstrap CI, :func:`metaplast.analysis.stats.bootstrap_ci`; mean final Θ
after the last Adam step; surviving terms, |θ_r| > threshold) and plots λ against accuracy and
against the number of surviving terms, one line per rule.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from metaplast.analysis.results import RESULT, accuracy_summary, check_last, surviving_terms
from metaplast.analysis.rundir import RunDir, RunError, job_paths, theta_term
from metaplast.analysis.stats import bootstrap_ci
from metaplast.safety import save_figure, write_text

log = logging.getLogger("metaplast")

#: Override keys shown through the derived ``rule`` and ``lam`` columns, or pooled (``seed``).
POOLED = ("seed", "meta.first_trial")
DERIVED = ("rule", "rule.terms", "rule.per_layer", "reg.lam")


class SweepError(ValueError):
    """Sweep directories or options that cannot be used; the message names them."""


def find_jobs(directories) -> list[Path]:
    """Job directories (those with ``.hydra/overrides.yaml``) under each given directory, in order."""
    try:
        return [job for directory in directories for job in job_paths(directory)]
    except RunError as error:
        raise SweepError(str(error)) from None


def _job_rows(path: Path, last: int | None) -> list[dict] | None:
    """The rows of one job (None when unfinished); :class:`RunError` when it cannot be read."""
    job = RunDir(path)
    result = job.result
    if result is None:
        return None
    final = job.final(sources=("result",))
    accuracy = job.final_accuracy(last)
    if len(accuracy) != len(final.trials):
        raise RunError(
            f"{str(path)!r}: {len(accuracy)} trials in metrics.csv, {len(final.trials)} in {RESULT}"
        )
    config = job.config
    reg = config.get("reg") or {}
    threshold = (config.get("objective") or {}).get("survive_threshold", 1e-3)
    way = (config.get("meta") or {}).get("M")
    rows = []
    for index, trial in enumerate(final.trials):
        row = {"job": str(job.path), **{f"override:{k}": v for k, v in job.overrides.items()}}
        row.update(
            rule=job.rule_label,
            lam=float(reg.get("lam", 0.0)) if str(reg.get("kind", "none")) != "none" else 0.0,
            seed=int(config.get("seed", 0)),
            trial=int(trial),
            threshold=float(threshold),
            last=job.last if last is None else last,
            chance=1 / way if isinstance(way, int) and way > 0 else float("nan"),
            acc=accuracy[index],
        )
        row.update(final.columns(final.values[index]))
        rows.append(row)
    return rows


def collect(directories, last: int | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """One row per finished job and trial (overrides, rule, λ, seed, final accuracy over the last
    ``last`` episodes — default each job's ``objective.last`` —, Θ), and the jobs left out:
    unfinished ones and those that cannot be read (each logged with its reason)."""
    rows, left_out = [], []
    for path in find_jobs(directories):
        try:
            found = _job_rows(path, last)
        except (RunError, ValueError, TypeError, KeyError) as error:
            log.warning("skipped job %s: %s", path, " ".join(str(error).split()))
            left_out.append(path)
            continue
        if found is None:
            log.warning("skipped unfinished job %s (no %s)", path, RESULT)
            left_out.append(path)
            continue
        rows.extend(found)
    return pd.DataFrame(rows), left_out


def _theta_order(column: str) -> tuple:
    """Θ columns shared by all layers by term id, then per-layer ones by layer and term id."""
    return column.startswith("theta_layer"), [int(n) for n in re.findall(r"\d+", column)]


def _one(values: pd.Series):
    """The value all rows share, else NaN (``mixed``)."""
    distinct = values.dropna().unique()
    return distinct[0] if len(distinct) == 1 else float("nan")


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
        mean, low, high, _ = accuracy_summary(group["acc"])  # diverged trials have none
        mean_theta = {c: group[c].mean() for c in theta_columns if group[c].notna().all()}
        limit = threshold if threshold is not None else group["threshold"].max()
        alive = sorted(set(surviving_terms(mean_theta.values(), [theta_term(c) for c in mean_theta], limit)))
        row = {c.removeprefix("override:"): v for c, v in zip(keys, values)}
        row.update(
            jobs=group["job"].nunique(),
            trials=len(group),
            acc=mean,
            acc_lo=low,
            acc_hi=high,
            **mean_theta,
            surviving=len(alive),
            surviving_terms=" ".join(str(r) for r in alive),
            last=_one(group["last"]),
            chance=_one(group["chance"]),
        )
        table.append(row)
    columns = [c.removeprefix("override:") for c in keys]
    return pd.DataFrame(table).sort_values(columns, kind="stable").reset_index(drop=True)


def markdown(table: pd.DataFrame) -> str:
    """The table in Markdown, with a note saying what each number is."""
    lasts = sorted({int(n) for n in table.get("last", pd.Series(dtype=float)).dropna()})
    shown = table.drop(columns=[c for c in ("last", "chance") if c in table])
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
    over = f" over its last {', '.join(map(str, lasts))} episodes" if lasts else ""
    note = (
        f"\nacc: final meta-accuracy (per trial the mean{over}, as in result.json), mean over the "
        "trials of all seeds with a 98 % bootstrap CI; θ: final Θ after the last Adam step, mean over "
        "trials; surviving: |mean θ_r| above the threshold.\n"
    )
    return shown.to_markdown(index=False, floatfmt=".3g", missingval="") + "\n" + note


def plot(table: pd.DataFrame, out: Path) -> list[Path]:
    """λ vs final meta-accuracy (98 % CI band) and λ vs surviving terms, one line per rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    extra = list(table.columns[: table.columns.get_loc("rule")])  # the other varying overrides
    data = table.assign(setting=table[extra].astype(str).agg(", ".join, axis=1) if extra else "")
    style = "setting" if extra else None
    paths = []
    lasts = sorted({int(n) for n in table["last"].dropna()}) if "last" in table else []
    accuracy = "final meta-accuracy" + (
        f"\n(last {', '.join(map(str, lasts))} episodes per trial)" if lasts else ""
    )
    for y, label, name in (
        ("acc", accuracy, "lambda_accuracy"),
        ("surviving", "surviving terms", "lambda_surviving"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        sns.lineplot(data=data, x="lam", y=y, hue="rule", style=style, marker="o", errorbar=None, ax=ax)
        if y == "acc":
            palette = dict(zip(data["rule"].unique(), sns.color_palette(n_colors=data["rule"].nunique())))
            for (rule, _), line in data.groupby(["rule", "setting"], sort=False):
                ax.fill_between(line["lam"], line["acc_lo"], line["acc_hi"], color=palette[rule], alpha=0.2)
            chances = sorted({float(c) for c in data.get("chance", pd.Series(dtype=float)).dropna()})
            for value in chances:
                ax.axhline(value, ls="--", lw=1, color="0.35", label=f"chance (1/{round(1 / value)})")
            ax.legend(fontsize=9)
        positive = data.loc[data["lam"] > 0, "lam"]
        if len(positive):
            ax.set_xscale("symlog", linthresh=float(positive.min()))
            ax.set_xlim(left=float(data["lam"].min()))  # no empty negative λ range
        ax.set(xlabel=r"$\lambda$ (symlog)" if len(positive) else r"$\lambda$", ylabel=label)
        ax.set_title("98 % bootstrap CI over trials (seeds pooled)" if y == "acc" else "", fontsize=10)
        fig.tight_layout()
        paths.append(out / f"{name}.png")
        save_figure(fig, paths[-1], dpi=120)
        plt.close(fig)
    return paths


def check_threshold(threshold) -> float | None:
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise SweepError(f"--threshold={threshold} is not allowed; allowed: a number >= 0")
    return threshold


def report(directories, out: Path, threshold: float | None = None, last: int | None = None) -> pd.DataFrame:
    """Write ``trials.csv``, ``sweep.csv``, ``sweep.md`` and the two plots into ``out``; return the table.

    ``last``: episodes per trial of the final accuracy (default: each job's ``objective.last``)."""
    check_threshold(threshold)
    if last is not None:
        try:
            check_last(last)
        except ValueError as error:
            raise SweepError(str(error)) from None
    trials, left_out = collect(directories, last)
    if trials.empty:
        raise SweepError(
            f"no finished, readable job (with {RESULT}) under {', '.join(map(str, directories))}"
            + (f" ({len(left_out)} left out, see the warnings)" if left_out else "")
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate(trials, threshold)
    write_text(out / "trials.csv", trials.to_csv(index=False))
    write_text(out / "sweep.csv", table.to_csv(index=False))
    write_text(out / "sweep.md", markdown(table))
    plot(table, out)
    return table


# ---------------------------------------------------------------- online grid searches (Oja paper)


def online_jobs(directories) -> bool:
    """Whether the jobs under ``directories`` are online evaluations (``online.csv``, no metrics.csv)."""
    kinds = {RunDir(job).kind for job in find_jobs(directories) if RunDir.is_run(job)}
    return kinds == {"online"}  # jobs still running (no table yet) do not count


def online_grid(directories, score: str = "val_acc") -> pd.DataFrame:
    """One row per online-evaluation job of a grid search (``+eval_experiment=oja_grid``): its swept
    overrides, Θ (``theta_<r>`` from ``theta.json``), and at the end of the stream the mean over
    trials of ``score`` (default the validation accuracy, held out of the training stream), its 98 %
    bootstrap CI, and the test accuracy (shown, never used to choose); sorted best first, ``best``
    marks the pair with the highest ``score``. Diverged trials count as chance-free failures: a job
    with any diverged trial is ranked by its finite trials but ``diverged`` says how many."""
    rows = []
    for path in find_jobs(directories):
        if not (path / "online.csv").exists():
            log.warning("skipped unfinished job %s (no online.csv)", path)
            continue
        try:
            job = RunDir(path)
            if job.kind != "online":
                raise RunError(f"{str(path)!r} is not an online evaluation")
            table = job.table
        except (RunError, OSError) as error:
            log.warning("skipped job %s: %s", path, " ".join(str(error).split()))
            continue
        if score not in table:
            raise SweepError(
                f"{str(path)!r}: online.csv has no {score!r} column; run the grid with online.validation > 0"
            )
        end = table[table["sample"] == table["sample"].max()]
        values = end[score].to_numpy(float)
        finite = values[np.isfinite(values)]
        row = {"job": str(path), **{k: v for k, v in job.overrides.items() if k not in ("eval_experiment",)}}
        theta = job.theta_json
        row.update({f"theta_{r}": float(v) for r, v in zip(theta.get("terms", []), theta.get("theta", []))})
        low, high = bootstrap_ci(finite) if finite.size else (float("nan"), float("nan"))
        row.update(
            samples=int(end["sample"].iloc[0]),
            trials=len(end),
            diverged=int(end["diverged"].sum()) if "diverged" in end else 0,
            score=score,
            value=float(finite.mean()) if finite.size else float("nan"),
            value_lo=low,
            value_hi=high,
            test_acc=float(np.nanmean(end["acc"].to_numpy(float))) if finite.size else float("nan"),
        )
        rows.append(row)
    if not rows:
        raise SweepError(f"no readable online evaluation under {', '.join(map(str, directories))}")
    table = pd.DataFrame(rows)
    overrides = [k for k in table.columns[1 : table.columns.get_loc("samples")] if not k.startswith("theta_")]
    # only what the grid varies; Θ itself as theta_<r> (from theta.json), not its override strings
    table = table.drop(
        columns=[k for k in overrides if k.startswith("theta") or table[k].astype(str).nunique() == 1]
    )
    table = table.sort_values("value", ascending=False, na_position="last", kind="stable")
    table = table.reset_index(drop=True)
    table["best"] = False
    if table["value"].notna().any():
        table.loc[0, "best"] = True
    return table


def online_grid_markdown(table: pd.DataFrame) -> str:
    """The grid table in Markdown, best first, with a note saying what each number is."""
    score = table["score"].iloc[0]
    shown = table.drop(columns=["job", "score"]).copy()
    shown[f"{score} (98% CI)"] = [
        f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in zip(shown.value, shown.value_lo, shown.value_hi)
    ]
    shown = shown.drop(columns=["value", "value_lo", "value_hi"])
    shown["best"] = ["**best**" if b else "" for b in shown["best"]]
    note = (
        f"\n{score}: accuracy at the end of the stream on the validation images held out of the training "
        "stream (never streamed, never the test split), mean over trials with a 98 % bootstrap CI; the "
        f"best pair is chosen by {score} alone. test_acc (the test split) is shown, not used to choose.\n"
    )
    return shown.to_markdown(index=False, floatfmt=".4g") + "\n" + note


def online_grid_report(directories, out: Path, score: str = "val_acc") -> pd.DataFrame:
    """Write ``grid.csv`` and ``grid.md`` (:func:`online_grid`) into ``out``; return the table."""
    table = online_grid(directories, score)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "grid.csv", table.to_csv(index=False))
    write_text(out / "grid.md", online_grid_markdown(table))
    return table
