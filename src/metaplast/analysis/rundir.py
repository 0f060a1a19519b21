"""The one reader of run directories: every consumer (report, sweep, online evaluation's
``from_run``) reads a run's config, tables, rule and final Θ here.

A meta-training run holds ``.hydra/config.yaml``, ``metrics.csv`` (one row per episode and
trial), ``checkpoints/last.ckpt`` and, once finished, ``result.json``; an online evaluation
holds ``online.csv`` and ``theta.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from metaplast.analysis.results import RESULT
from metaplast.core.rules import Rule
from metaplast.safety import load_checkpoint

#: ``theta_<r>``: a column of Θ shared by all layers (per-layer Θ has ``theta_layer<ℓ>_<r>``).
THETA_COLUMN = re.compile(r"^theta_(\d+)$")


class RunError(ValueError):
    """A run directory that cannot be read as asked; the message names it and what is missing."""


def theta_columns(frame: pd.DataFrame) -> dict[int, str]:
    """``{term id: column}`` of the shared-Θ columns of a metrics table, by term id."""
    found = {int(m.group(1)): c for c in frame.columns if (m := THETA_COLUMN.match(c))}
    return dict(sorted(found.items()))


def depth_of(config: dict) -> int | None:
    """Number of weight layers of a run's network, from its config (None when unknown)."""
    model = config.get("model") or {}
    if model.get("depth") is not None:
        return int(model["depth"]) + 1
    if "hidden" in model:
        return len(model.get("hidden") or []) + 1
    return None


def rule_of(config: dict, depth: int | None = None) -> Rule | None:
    """The rule of a run's config (its ``rule.terms`` or ``rule.per_layer``), None when absent."""
    rule = config.get("rule") or {}
    depth = depth or depth_of(config)
    if depth is None:
        return None
    try:
        if rule.get("per_layer"):
            return Rule.build(None, depth, list(rule["per_layer"]))
        if rule.get("terms") is not None:
            terms = rule["terms"]
            return Rule.build(terms if isinstance(terms, (str, int)) else list(terms), depth)
    except ValueError:
        return None
    return None


class RunDir:
    """One run directory (``kind`` is ``meta`` for meta-training, ``online`` for online evaluation)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        hydra_config = self.path / ".hydra" / "config.yaml"
        self.config = OmegaConf.to_container(OmegaConf.load(hydra_config)) if hydra_config.exists() else {}
        if (self.path / "metrics.csv").exists():
            self.kind, self.table_path = "meta", self.path / "metrics.csv"
        elif (self.path / "online.csv").exists():
            self.kind, self.table_path = "online", self.path / "online.csv"
        else:
            raise RunError(f"{str(self.path)!r} is not a run directory: it has no metrics.csv or online.csv")
        self._table = None

    @staticmethod
    def is_run(path: Path) -> bool:
        return (Path(path) / "metrics.csv").exists() or (Path(path) / "online.csv").exists()

    @property
    def table(self) -> pd.DataFrame:
        if self._table is None:
            self._table = pd.read_csv(self.table_path)
        return self._table

    @property
    def trials(self) -> list[int]:
        """The trial ids of the run's table."""
        return sorted(int(t) for t in self.table["trial"].unique())

    @property
    def result(self) -> dict | None:
        """``result.json`` of a finished meta-training run (None before it finished)."""
        path = self.path / RESULT
        return json.loads(path.read_text()) if path.exists() else None

    @property
    def theta_json(self) -> dict:
        path = self.path / "theta.json"
        return json.loads(path.read_text()) if path.exists() else {}

    @property
    def rule(self) -> Rule | None:
        """The run's rule: from its config, else (online) its ``theta.json``, else its Θ columns."""
        if self.kind == "online":
            layer_terms = self.theta_json.get("layer_terms")
            if layer_terms:
                layer_terms = tuple(tuple(t) for t in layer_terms)
                return Rule(tuple(sorted(set().union(*layer_terms))), layer_terms)
        depth = sum(1 for c in self.table.columns if c.startswith("orth_")) or None
        rule = rule_of(self.config, depth)
        if rule is None and self.kind == "meta":
            terms = tuple(theta_columns(self.table))
            if terms and depth:
                rule = Rule(terms, (terms,) * depth)
        return rule

    def final_theta(self, trial: int | None = None) -> dict[int, float]:
        """Θ after the last Adam step (``checkpoints/last.ckpt``; else the last episode's row of
        ``metrics.csv``, the Θ that episode ran with): the mean over trials, or one ``trial``."""
        checkpoint = self.path / "checkpoints" / "last.ckpt"
        terms = self.rule.terms if self.rule is not None else tuple(theta_columns(self.table))
        if checkpoint.exists():
            state = load_checkpoint(checkpoint)
            theta = state["state_dict"]["meta.theta"].double()
            if theta.dim() != 2:
                raise RunError(
                    f"{str(self.path)!r}: Θ is not shared by all layers (shape {tuple(theta.shape)})"
                )
            first = int((state.get("hyper_parameters") or {}).get("meta", {}).get("first_trial", 0))
            if trial is None:
                values = theta.mean(0)
            elif first <= trial < first + theta.shape[0]:
                values = theta[trial - first]
            else:
                last = first + theta.shape[0] - 1
                raise RunError(f"trial {trial} is not a trial of {self.path}; allowed: {first}..{last}")
            return dict(zip(terms, values.tolist()))
        table = self.table
        last = table[table["episode"] == table["episode"].max()]
        if trial is not None:
            last = last[last["trial"] == trial]
            if last.empty:
                raise RunError(f"trial {trial} is not a trial of {self.path}")
        return {r: float(last[column].mean()) for r, column in theta_columns(table).items()}
