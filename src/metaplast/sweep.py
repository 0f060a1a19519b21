"""Sweeps: a job's final result, auto-resume of killed jobs, and one table and two plots per sweep.

A finished job writes ``result.json`` last (final Θ per trial, final meta-accuracy per
trial, surviving terms); its presence marks the job as finished. ``python -m
metaplast.sweep DIR [DIR ...] --out OUT`` collects every job under the given Hydra
(multi)run directories into ``sweep.csv`` / ``sweep.md`` (one row per configuration,
seeds and trials pooled: mean final meta-accuracy with the papers' 98 % bootstrap CI,
:func:`metaplast.stats.bootstrap_ci`; mean final Θ; surviving terms, |θ_r| > threshold)
and plots λ against accuracy and against the number of surviving terms, one line per rule.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf

from metaplast.safety import save_figure, write_text
from metaplast.stats import bootstrap_ci

log = logging.getLogger("metaplast")

RESULT = "result.json"
#: Config keys that do not change Θ or the metrics: two runs differing only here are the same job.
NOT_IDENTITY = ("ckpt_path", "resume", "objective", "trainer.progress_bar", "trainer.checkpoint_every")
#: Override keys shown through the derived ``rule`` and ``lam`` columns, or pooled (``seed``).
POOLED = ("seed", "meta.first_trial")
DERIVED = ("rule", "rule.terms", "rule.per_layer", "reg.lam")


# ---------------------------------------------------------------- a job's result


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
    """``result`` with surviving terms and objective recomputed for another threshold or ``max_terms``."""
    return job_result(
        result["theta"], result["terms"], result["trials"], result["meta_acc"], threshold, max_terms
    )


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


class FinalResult(L.Callback):
    """At the end of training: write ``result.json`` and put the result into the W&B run's summary."""

    def __init__(self, run_dir: Path, threshold: float, max_terms: int | None):
        self.run_dir, self.threshold, self.max_terms = Path(run_dir), threshold, max_terms

    def write(self, module, metrics=None) -> dict:
        trial_ids = module.trial_ids
        accuracy = final_accuracy(self.run_dir / "metrics.csv", trial_ids) if module.csv else None
        if accuracy is None:  # no CSV: the last episode's logged values
            accuracy = [float(metrics.get(f"meta/acc/trial_{t}", float("nan"))) for t in trial_ids]
        theta = module.theta.detach().double().cpu().numpy()
        result = job_result(theta, module.rule.terms, trial_ids, accuracy, self.threshold, self.max_terms)
        if module.term_scale is not None:
            result["term_scale"] = dict(zip(map(str, module.rule.terms), module.term_scale.tolist()))
        write_json(self.run_dir / RESULT, result)
        return result

    def on_train_end(self, trainer, module):
        result = self.write(module, trainer.callback_metrics)
        summary = {"final/meta_acc": result["final_meta_acc"], "final/objective": result["objective"]}
        summary["final/surviving_terms"] = result["surviving"]
        summary.update({f"final/theta/{r}": v for r, v in result["theta_mean"].items()})
        for trial, row in zip(result["trials"], result["theta"]):
            summary.update({f"final/theta/{r}/trial_{trial}": v for r, v in zip(result["terms"], row)})
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(summary)


class SaveOnSigterm(L.Callback):
    """On SIGTERM Lightning ends the current episode and stops; save the state at that point to ``path``.

    Lightning raises :class:`SIGTERMException` only between episodes, so the checkpoint is
    one a normal run could have written; resuming from it gives the uninterrupted Θ.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_exception(self, trainer, module, exception):
        if isinstance(exception, SIGTERMException) and trainer.global_step > 0:
            trainer.save_checkpoint(self.path)
            log.warning("SIGTERM: saved the state after episode %d to %s", trainer.global_step, self.path)


# ---------------------------------------------------------------- auto-resume


def sweep_name() -> str | None:
    """The W&B group of a multirun job: its sweep directory, relative to the launch directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra = HydraConfig.get()
    sweep_dir = Path(hydra.sweep.dir)
    inside = sweep_dir.is_absolute() and sweep_dir.is_relative_to(hydra.runtime.cwd)
    return str(sweep_dir.relative_to(hydra.runtime.cwd) if inside else sweep_dir)


def job_key(cfg) -> str:
    """A job's identity: a hash of its resolved config without the keys that do not change its results."""
    data = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for dotted in NOT_IDENTITY:
        *parents, leaf = dotted.split(".")
        node = data
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    for key in list(data.get("logger", {})):
        if key != "csv":  # where results are shown, not what they are
            data["logger"].pop(key)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]


def claim(key: str, run_dir: Path, index_dir: Path) -> tuple[str, Path | None, str | None]:
    """Make ``run_dir`` the home of job ``key``, taking over an earlier run of the same job.

    Returns ``(state, path, wandb_id)``: ``("finished", result.json)`` when an earlier run
    finished (its results are copied into ``run_dir``), ``("resume", last.ckpt)`` when it left
    a checkpoint (its ``metrics.csv`` is copied; the run continues from the checkpoint), else
    ``("new", None)``. The W&B run id stays the same across resumptions.
    """
    run_dir, index_dir = Path(run_dir).resolve(), Path(index_dir)
    entry = index_dir / f"{key}.json"
    previous = json.loads(entry.read_text()) if entry.exists() else None
    state, path, wandb_id = "new", None, None
    if previous is not None:
        old = Path(previous["run_dir"])
        wandb_id = previous.get("wandb_id")
        if (old / RESULT).exists():
            state, path = "finished", run_dir / RESULT
            names = (RESULT, "metrics.csv", "checkpoints/last.ckpt")
        elif (old / "checkpoints" / "last.ckpt").exists():
            state, path = "resume", old / "checkpoints" / "last.ckpt"
            names = ("metrics.csv",)
        if state != "new" and old != run_dir:
            for name in names:
                if (old / name).exists():
                    (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(old / name, run_dir / name)
            log.info("job %s: %s %s", key, {"finished": "finished in", "resume": "resumes"}[state], old)
    if wandb_id is None:
        wandb_id = f"{key[:12]}-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:6]}"
    if state != "finished":
        index_dir.mkdir(parents=True, exist_ok=True)
        write_json(entry, {"run_dir": str(run_dir), "wandb_id": wandb_id})
    return state, path, wandb_id


# ---------------------------------------------------------------- aggregation


def rule_label(rule) -> str:
    """A rule's name for tables and legends: ``ehebb``, ``[0, 2, 3]`` or ``per_layer[f0, ehebb, f0]``."""
    if rule.get("per_layer") is not None:
        return "per_layer[" + ", ".join(str(r) for r in rule["per_layer"]) + "]"
    terms = rule["terms"]
    return terms if isinstance(terms, str) else str([int(t) if str(t).isdigit() else t for t in terms])


def parse_overrides(lines) -> dict[str, str]:
    return {key.lstrip("+~"): value for key, _, value in (str(line).partition("=") for line in lines)}


def find_jobs(directories) -> list[Path]:
    """Job directories (those with ``.hydra/overrides.yaml``) under each given directory, in order."""
    jobs = []
    for directory in directories:
        directory = Path(directory)
        if not directory.is_dir():
            raise SystemExit(f"metaplast.sweep: error: {directory} is not a directory")
        found = sorted(p.parent.parent for p in directory.rglob(".hydra/overrides.yaml"))
        if not found:
            raise SystemExit(
                f"metaplast.sweep: error: no Hydra job directory (with .hydra/) under {directory}"
            )
        jobs.extend(found)
    return jobs


def collect(directories) -> tuple[pd.DataFrame, list[Path]]:
    """One row per finished job and trial (overrides, rule, λ, seed, accuracy, Θ), and the unfinished jobs."""
    rows, unfinished = [], []
    for job in find_jobs(directories):
        if not (job / RESULT).exists():
            unfinished.append(job)
            continue
        result = json.loads((job / RESULT).read_text())
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        overrides = parse_overrides(OmegaConf.load(job / ".hydra" / "overrides.yaml"))
        threshold = OmegaConf.select(cfg, "objective.survive_threshold", default=1e-3)
        for index, trial in enumerate(result["trials"]):
            row = {"job": str(job), **{f"override:{k}": v for k, v in overrides.items()}}
            row.update(
                rule=rule_label(cfg.rule),
                lam=float(cfg.reg.lam) if str(cfg.reg.kind) != "none" else 0.0,
                seed=int(cfg.seed),
                trial=int(trial),
                threshold=float(threshold),
                acc=result["meta_acc"][index],
            )
            row.update({f"theta_{r}": v for r, v in zip(result["terms"], result["theta"][index])})
            rows.append(row)
    return pd.DataFrame(rows), unfinished


def aggregate(trials: pd.DataFrame, threshold: float | None = None) -> pd.DataFrame:
    """One row per configuration (all seeds and trials pooled), sorted by rule and λ."""
    override_columns = [c for c in trials.columns if c.startswith("override:")]
    varying = [
        c
        for c in override_columns
        if c.removeprefix("override:") not in POOLED + DERIVED and trials[c].fillna("").nunique() > 1
    ]
    keys = [*varying, "rule", "lam"]
    theta_columns = [c for c in trials.columns if c.startswith("theta_")]
    table = []
    for values, group in trials.fillna({c: "" for c in varying}).groupby(keys, sort=False):
        accuracy = group["acc"].dropna()  # diverged trials have none
        low, high = bootstrap_ci(accuracy) if len(accuracy) else (float("nan"), float("nan"))
        terms = [c.removeprefix("theta_") for c in theta_columns if group[c].notna().all()]
        mean_theta = {f"theta_{r}": group[f"theta_{r}"].mean() for r in terms}
        limit = threshold if threshold is not None else group["threshold"].max()
        alive = surviving_terms(mean_theta.values(), terms, limit)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metaplast.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="Hydra multirun (or run) directories")
    parser.add_argument("--out", type=Path, help="output directory (default: DIR/summary of the first DIR)")
    parser.add_argument(
        "--threshold", type=float, help="|θ| above which a term survives (default: the jobs')"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or args.dirs[0] / "summary"
    table = report(args.dirs, out, args.threshold)
    print(markdown(table))
    print(f"wrote {out}/sweep.csv, sweep.md, trials.csv, lambda_accuracy.png, lambda_surviving.png")


if __name__ == "__main__":
    main()
