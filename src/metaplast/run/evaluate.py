"""``python -m metaplast.evaluate``: online evaluation of a fixed rule (Figs. 1, S1, S4, S6; DESIGN §3).

Fresh networks (one per trial, batched) learn in a single online pass over a
stream of a dataset with all its classes, one sample per step, with a fixed Θ
given on the command line (``theta={0:0.01,2:-0.02}``) or read from a finished
meta-training run (``from_run=RUN_DIR``). Every ``online.every`` samples the
test accuracy, loss, α_ℓ and E_W,ℓ of every trial go to ``online.csv``.
The update is :func:`metaplast.core.inner_loop.adapt`, the metrics
:func:`metaplast.core.metrics.episode_metrics`: the same code as meta-training.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from metaplast.analysis.rundir import RunDir, RunError
from metaplast.core.inner_loop import adapt
from metaplast.core.metrics import episode_metrics
from metaplast.core.rules import Rule
from metaplast.core.terms import TERMS
from metaplast.data import DataError, trial_generators
from metaplast.run.config import (
    ConfigError,
    DatasetConfig,
    FeedbackConfig,
    ModelConfig,
    RuleConfig,
    build_learner,
    build_rule,
    hidden_sizes,
)
from metaplast.run.data import load_data
from metaplast.safety import write_text

log = logging.getLogger("metaplast")


@dataclass
class OnlineConfig:
    trials: int = 20
    samples: int | None = None  # length of the stream; None: the whole stream split
    every: int = 100  # k: test every k samples
    stream_split: str = "train"
    test_split: str = "test"
    test_per_class: int | None = None  # None: the whole test split


@dataclass
class EvaluateConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rule: RuleConfig = field(default_factory=RuleConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    theta: Any = None  # θ_r by term id; the rule picks its terms
    from_run: str | None = None  # a meta-training run directory: its rule and final Θ
    from_trial: int | None = None  # which trial's Θ of from_run; None: the mean over trials
    seed: int = 0


ConfigStore.instance().store(name="base_evaluate", node=EvaluateConfig)


def theta_from_run(run_dir: str | Path, trial: int | None = None) -> tuple[Rule, dict[int, float]]:
    """The rule and final Θ of a meta-training run (:meth:`metaplast.analysis.rundir.RunDir.final_theta`)."""
    try:
        run = RunDir(run_dir)
        rule = run.rule
        if run.kind != "meta" or rule is None:
            raise RunError(f"{str(run_dir)!r} is not a meta-training run with a rule")
        if trial is not None and trial not in run.trials:
            trials = run.trials
            raise ConfigError(f"from_trial={trial} is not allowed; allowed: {trials[0]}..{trials[-1]}")
        return rule, run.final_theta(trial)
    except RunError as error:
        raise ConfigError(f"from_run={str(run_dir)!r}: {error}") from None


def typed_evaluate(cfg) -> EvaluateConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvaluateConfig), cfg))


def resolve_theta(cfg, depth: int) -> tuple[Rule, torch.Tensor]:
    """The rule and the Θ row (one value per rule term) of an evaluation config."""
    if cfg.theta is not None and not isinstance(cfg.theta, Mapping):
        raise ConfigError(
            f"theta={cfg.theta!r} is not allowed; allowed: a mapping term id -> θ, e.g. {{0:0.01}}"
        )
    if cfg.from_run is not None:
        rule, values = theta_from_run(cfg.from_run, cfg.from_trial)
        try:
            rule = rule.with_depth(depth)
        except ValueError as error:
            raise ConfigError(f"from_run={cfg.from_run!r}: {error}; use its model (model.hidden)") from None
        values.update({int(r): float(v) for r, v in (cfg.theta or {}).items()})
    else:
        rule = build_rule(cfg)
        values = {r: (cfg.rule.theta0_init if r == 0 else cfg.rule.theta_init) for r in rule.terms}
        values.update({int(r): float(v) for r, v in (cfg.theta or {}).items()})
    bad = sorted(set(values) - set(TERMS))
    if bad:
        raise ConfigError(f"theta has term ids {bad}; allowed: term ids {min(TERMS)}..{max(TERMS)}")
    return rule, torch.tensor([values[r] for r in rule.terms])


def _subsample_per_class(labels: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    picks = []
    for c in torch.unique(labels).tolist():
        indices = torch.nonzero(labels == c).flatten()
        picks.append(indices[torch.randperm(len(indices), generator=generator)[:per_class]])
    return torch.cat(picks)


@torch.no_grad()
def run(cfg: DictConfig, out_dir: Path) -> pd.DataFrame:
    """The online pass; writes ``online.csv`` and ``theta.json`` under ``out_dir`` and returns the table."""
    online = cfg.online
    for name in ("trials", "every"):
        if getattr(online, name) < 1:
            raise ConfigError(
                f"online.{name}={getattr(online, name)} is not allowed; allowed: an integer >= 1"
            )
    if online.samples is not None and online.samples < 1:
        raise ConfigError(f"online.samples={online.samples} is not allowed; allowed: null or an integer >= 1")
    hidden = hidden_sizes(cfg.model)
    rule, theta_row = resolve_theta(cfg, len(hidden) + 1)
    stream = load_data(cfg, online.stream_split)
    test = load_data(cfg, online.test_split)
    learner = build_learner(typed_evaluate(cfg), stream.images.shape[1], stream.num_classes, rule)
    trials = list(range(online.trials))
    init_generators = trial_generators(cfg.seed, trials, 0)
    order_generators = trial_generators(cfg.seed, trials, 1)
    length = stream.images.shape[0] if online.samples is None else online.samples
    if length > stream.images.shape[0]:
        raise ConfigError(
            f"online.samples={length} is not allowed; allowed: at most {stream.images.shape[0]}, "
            f"the size of the {online.stream_split!r} split of {cfg.dataset.name!r}"
        )
    order = torch.stack(
        [torch.randperm(stream.images.shape[0], generator=g)[:length] for g in order_generators]
    )
    x_test, y_test = test.images, test.labels
    if online.test_per_class is not None:
        keep = _subsample_per_class(y_test, online.test_per_class, torch.Generator().manual_seed(cfg.seed))
        x_test, y_test = x_test[keep], y_test[keep]
    T = len(trials)
    x_test = x_test.expand(T, *x_test.shape)
    y_test = y_test.expand(T, *y_test.shape)
    kind = cfg.feedback.kind.value
    state = learner.init_state(init_generators, cfg.feedback.init.value)
    meta = {"theta": theta_row.expand(T, -1)}
    if learner.pathway.rule_terms:
        raise ConfigError(
            f"feedback.kind={kind!r} is not allowed here; allowed: a pathway without its own rule"
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(
        out_dir / "theta.json",
        json.dumps(
            {
                "terms": list(rule.terms),
                "layer_terms": [list(t) for t in rule.layer_terms],
                "theta": theta_row.tolist(),
                "feedback": kind,
                "dataset": cfg.dataset.name,
                "synthetic": stream.synthetic,
            },
            indent=1,
        ),
    )
    rows = []
    seen = 0
    while True:
        metrics = episode_metrics(learner, state, x_test, y_test)
        log.info("sample %d/%d: test accuracy %.3f", seen, length, float(metrics["acc"].mean()))
        for i, t in enumerate(trials):
            row = {
                "sample": seen,
                "trial": t,
                "acc": float(metrics["acc"][i]),
                "loss": float(metrics["loss"][i]),
            }
            row.update({f"angle_{l}": float(a) for l, a in enumerate(metrics["angle"][i])})
            row.update({f"orth_{l + 1}": float(e) for l, e in enumerate(metrics["orth"][i])})
            rows.append(row)
        if seen >= length:
            break
        chunk = order[:, seen : seen + online.every]
        x = stream.images[chunk]
        y = stream.labels[chunk]
        state = adapt(learner, state, meta, x, y)
        seen += chunk.shape[1]
    table = pd.DataFrame(rows)
    write_text(out_dir / "online.csv", table.to_csv(index=False, quoting=csv.QUOTE_MINIMAL))
    return table


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        table = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, DataError) as error:
        log.error("%s", error)
        print(f"metaplast: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    final = table[table["sample"] == table["sample"].max()]
    print(f"final test accuracy: {final['acc'].mean():.4f} (mean over {len(final)} trials)")


if __name__ == "__main__":
    main()
