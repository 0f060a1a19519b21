"""The one reader of run directories: every consumer (report, sweep, online evaluation's
``from_run``) reads a run's config, overrides, tables, rule, label and final Θ here.

A meta-training run holds ``.hydra/config.yaml`` (and ``overrides.yaml``), ``metrics.csv`` (one
row per episode and trial), ``checkpoints/last.ckpt`` and, once finished, ``result.json``; an
online evaluation holds ``online.csv`` and ``theta.json``. A directory holding run directories
(a Hydra multirun) stands for all of them (:func:`expand`, :func:`hydra_jobs`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from metaplast.analysis.results import DEFAULT_LAST, RESULT, check_last, final_accuracy
from metaplast.core.rules import Rule
from metaplast.safety import CheckpointError, load_checkpoint

#: ``theta_<r>``: a column of Θ shared by all layers.
THETA_COLUMN = re.compile(r"^theta_(\d+)$")
#: ``theta_layer<ℓ>_<r>``: a column of per-layer Θ (per synapse: the mean over the layer's synapses).
THETA_LAYER_COLUMN = re.compile(r"^theta_layer(\d+)_(\d+)$")

#: Where the final Θ (after the last Adam step) is read, in order: ``result.json`` of a finished
#: run, ``checkpoints/last.ckpt``, and last the last episode's rows of ``metrics.csv`` (the Θ that
#: episode ran with, one Adam step before).
SOURCES = ("result", "checkpoint", "csv")


class RunError(ValueError):
    """A run directory that cannot be read as asked; the message names it and what is missing."""


#: The columns naming a row of each kind of table (integers in [0, KEY_LIMIT)).
KEYS = {"meta": ("episode", "trial"), "online": ("sample", "trial")}
KEY_LIMIT = 2**31
#: Columns (regular expressions) whose values have a range: accuracies and angles (degrees).
RANGES = {r"meta_acc|acc": (0.0, 1.0), r"angle_\d+": (0.0, 180.0)}


def _why(error: Exception) -> str:
    """An OS or parse error in a few words (no traceback)."""
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__
    return " ".join(str(error).split())[:200] or type(error).__name__


def read_yaml(path: Path, kind: type = dict):
    """A YAML file of a run (``.hydra/config.yaml``, ``overrides.yaml``) as plain data of ``kind``."""
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as error:  # OmegaConf/yaml raise many kinds; all mean "cannot read this file"
        raise RunError(f"{str(path)!r} cannot be read as YAML: {_why(error)}") from None
    if data is None:
        return kind()
    if not isinstance(data, kind):
        raise RunError(f"{str(path)!r} holds a {type(data).__name__}, not a {kind.__name__}")
    return data


def read_json(path: Path) -> dict:
    """A JSON file of a run (``result.json``, ``theta.json``) as a dict."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise RunError(f"{str(path)!r} cannot be read as JSON: {_why(error)}") from None
    if not isinstance(data, dict):
        raise RunError(f"{str(path)!r} holds a JSON {type(data).__name__}, not an object")
    return data


def read_table(path: Path, kind: str) -> pd.DataFrame:
    """A run's table (``metrics.csv`` or ``online.csv``), checked: a regular UTF-8 CSV file with its
    key columns (``episode``/``sample`` and ``trial``: integers >= 0, each pair once) and numbers
    (or empty cells) in every column."""
    if not path.is_file():
        raise RunError(f"{str(path)!r} is not a regular file")
    try:
        table = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise RunError(f"{str(path)!r} is empty (not even a header line)") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, ValueError) as error:
        raise RunError(f"{str(path)!r} is not a readable CSV table: {_why(error)}") from None
    missing = [c for c in KEYS[kind] if c not in table.columns]
    if missing:
        raise RunError(
            f"{str(path)!r} has no column {', '.join(map(repr, missing))}; its header: "
            f"{', '.join(map(str, table.columns))[:200]}"
        )
    for column in table.columns:
        numbers = pd.to_numeric(table[column], errors="coerce")
        bad = numbers.isna() & table[column].notna()
        if bad.any():
            value = table[column][bad].iloc[0]
            raise RunError(
                f"{str(path)!r}: column {column!r} holds {str(value)[:40]!r} (line {bad.idxmax() + 2}); "
                f"allowed: numbers or empty cells"
            )
        table[column] = numbers
    for column in KEYS[kind]:
        values = table[column]
        bad = ~np.isfinite(values) | (values < 0) | (values >= KEY_LIMIT) | (values != np.floor(values))
        if bad.any():
            raise RunError(
                f"{str(path)!r}: column {column!r} holds {values[bad].iloc[0]:g} (line {bad.idxmax() + 2}); "
                f"allowed: integers in [0, 2^31)"
            )
        table[column] = values.astype(np.int64)
    for column, (low, high) in RANGES.items():
        for name in [c for c in table.columns if re.fullmatch(column, c)]:
            values = table[name]
            bad = values.notna() & ~values.between(low, high)
            if bad.any():
                value, line = values[bad].iloc[0], bad.idxmax() + 2
                raise RunError(
                    f"{str(path)!r}: column {name!r} holds {value:g} (line {line}); "
                    f"allowed: numbers in [{low:g}, {high:g}], or an empty cell (diverged)"
                )
    duplicated = table.duplicated(list(KEYS[kind]))
    if duplicated.any():
        row = table[duplicated].iloc[0]
        raise RunError(
            f"{str(path)!r} has more than one row for {KEYS[kind][0]} {int(row[KEYS[kind][0]])}, trial "
            f"{int(row['trial'])} (a damaged file, or two runs writing it)"
        )
    return table


def theta_columns(frame: pd.DataFrame) -> dict[int, str]:
    """``{term id: column}`` of the shared-Θ columns of a metrics table, by term id."""
    found = {int(m.group(1)): c for c in frame.columns if (m := THETA_COLUMN.match(c))}
    return dict(sorted(found.items()))


def theta_layer_columns(frame: pd.DataFrame) -> dict[tuple[int, int], str]:
    """``{(layer, term id): column}`` of the per-layer Θ columns of a metrics table, sorted."""
    found = {
        (int(m.group(1)), int(m.group(2))): c for c in frame.columns if (m := THETA_LAYER_COLUMN.match(c))
    }
    return dict(sorted(found.items()))


def theta_term(column: str) -> int | None:
    """The term id of a Θ column (``theta_<r>`` or ``theta_layer<ℓ>_<r>``), None for other columns."""
    if m := THETA_COLUMN.match(column):
        return int(m.group(1))
    if m := THETA_LAYER_COLUMN.match(column):
        return int(m.group(2))
    return None


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


def _run_order(path: Path):
    """Hydra's job directories ``0, 1, ..., 10`` in number order, then the others by name."""
    return (not path.name.isdigit(), int(path.name) if path.name.isdigit() else 0, path.name)


def expand(paths) -> list[RunDir]:
    """Run directories as given; a directory holding run directories (a multirun) gives all of them."""
    found = []
    for path in map(Path, paths):
        if not path.exists():
            raise RunError(f"{str(path)!r} does not exist")
        if RunDir.is_run(path):
            found.append(RunDir(path))
            continue
        try:
            children = sorted(
                (p for p in path.iterdir() if p.is_dir() and RunDir.is_run(p)) if path.is_dir() else [],
                key=_run_order,
            )
        except OSError as error:
            raise RunError(f"{str(path)!r} cannot be listed: {_why(error)}") from None
        if not children:
            raise RunError(
                f"{str(path)!r} is not a run directory: it has no metrics.csv or online.csv, "
                f"nor any sub-directory that has one"
            )
        found.extend(RunDir(child) for child in children)
    return found


def job_paths(directory) -> list[Path]:
    """Every Hydra job directory (with ``.hydra/overrides.yaml``) under ``directory``, finished or not."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RunError(f"{directory} is not a directory")
    try:
        found = sorted(p.parent.parent for p in directory.rglob(".hydra/overrides.yaml"))
    except OSError as error:
        raise RunError(f"{str(directory)!r} cannot be searched: {_why(error)}") from None
    if not found:
        raise RunError(f"no Hydra job directory (with .hydra/) under {directory}")
    return found


def hydra_jobs(directory) -> list[RunDir]:
    """:func:`job_paths` opened as :class:`RunDir` (a job whose files cannot be read raises)."""
    return [RunDir(job) for job in job_paths(directory)]


@dataclass(frozen=True)
class FinalTheta:
    """Θ of every trial after the last Adam step: ``values`` is ``(trials, R)`` or ``(trials, L, R)``
    (per layer), one column per term of ``terms``; ``source`` says where it was read (one of
    :data:`SOURCES`). ``share`` is the run's ``rule.share``: with ``layer`` or ``synapse``,
    ``(trials, R)`` values are ``result.json``'s summary, Θ's mean over layers (and synapses)."""

    terms: tuple[int, ...]
    trials: tuple[int, ...]
    values: np.ndarray
    source: str
    share: str = "all"

    @property
    def per_layer(self) -> bool:
        return self.values.ndim == 3

    def mean(self) -> np.ndarray:
        """The mean over trials, ``(R,)`` or ``(L, R)`` (as ``result.json``'s ``theta_mean``)."""
        return self.values.mean(axis=0)

    def row(self, trial: int) -> np.ndarray:
        """Θ of one trial (by trial id)."""
        if trial not in self.trials:
            allowed = f"{self.trials[0]}..{self.trials[-1]}" if self.trials else "none"
            raise RunError(f"trial {trial} is not a trial of this run; allowed: {allowed}")
        return self.values[self.trials.index(trial)]

    def columns(self, values: np.ndarray) -> dict[str, float]:
        """Values ``(R,)`` or ``(L, R)`` by metrics-table column: ``theta_<r>`` or ``theta_layer<ℓ>_<r>``."""
        if values.ndim == 1:
            return {f"theta_{r}": float(v) for r, v in zip(self.terms, values)}
        return {
            f"theta_layer{layer}_{r}": float(v)
            for layer, row in enumerate(values)
            for r, v in zip(self.terms, row)
        }


class RunDir:
    """One run directory (``kind`` is ``meta`` for meta-training, ``online`` for online evaluation).

    Any directory with a table (``metrics.csv``, ``online.csv``), a ``result.json`` or a ``.hydra/``
    can be opened; what it lacks raises :class:`RunError` when asked for.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        hydra_config = self.path / ".hydra" / "config.yaml"
        self.config = read_yaml(hydra_config) if hydra_config.exists() else {}
        if (self.path / "online.csv").exists() and not (self.path / "metrics.csv").exists():
            self.kind, self.table_path = "online", self.path / "online.csv"
        elif self.is_run(self.path) or (self.path / RESULT).exists() or (self.path / ".hydra").is_dir():
            self.kind, self.table_path = "meta", self.path / "metrics.csv"
        else:
            raise RunError(f"{str(self.path)!r} is not a run directory: it has no metrics.csv or online.csv")
        self._table = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @staticmethod
    def is_run(path: Path) -> bool:
        """Whether ``path`` holds a run's table (``metrics.csv`` or ``online.csv``)."""
        try:
            return (Path(path) / "metrics.csv").exists() or (Path(path) / "online.csv").exists()
        except OSError:
            return False

    @property
    def table(self) -> pd.DataFrame:
        """The run's table (:func:`read_table`, checked)."""
        if self._table is None:
            if not self.table_path.exists():
                raise RunError(f"{str(self.path)!r} has no {self.table_path.name} (yet)")
            self._table = read_table(self.table_path, self.kind)
        return self._table

    @property
    def last(self) -> int:
        """Episodes averaged per trial for the final meta-accuracy: the run's ``objective.last``."""
        value = (self.config.get("objective") or {}).get("last", DEFAULT_LAST)
        try:
            return check_last(value)
        except ValueError:
            raise RunError(
                f"{str(self.path)!r}: objective.last={value!r} in its config; allowed: >= 1"
            ) from None

    def final_accuracy(self, last: int | None = None) -> list[float]:
        """Per trial (:attr:`trials`), the final meta-accuracy
        (:func:`metaplast.analysis.results.final_accuracy`) over ``last`` episodes (default
        :attr:`last`): from ``metrics.csv``, else ``result.json``'s when it averaged as many."""
        last = self.last if last is None else check_last(last)
        if self.kind == "meta" and self.table_path.exists():
            found = final_accuracy(self.table, self.trials, last)
            if found is not None:
                return found
        result = self.result
        if result is not None and int(result.get("last", 1)) == last and "meta_acc" in result:
            return [float(a) for a in result["meta_acc"]]
        raise RunError(
            f"{str(self.path)!r} has no meta-accuracy over its last {last} episodes "
            f"(no rows in metrics.csv, nor a result.json over {last} episodes)"
        )

    @property
    def trials(self) -> list[int]:
        """The trial ids of the run's table (without one: of its ``result.json``)."""
        if not self.table_path.exists() and self.result is not None:
            return [int(t) for t in self.result["trials"]]
        return sorted(int(t) for t in self.table["trial"].unique())

    @property
    def result(self) -> dict | None:
        """``result.json`` of a finished meta-training run (None before it finished)."""
        path = self.path / RESULT
        return read_json(path) if path.exists() else None

    @property
    def overrides(self) -> dict[str, str]:
        """The job's command-line overrides (``.hydra/overrides.yaml``) by key, ``+``/``~`` dropped."""
        path = self.path / ".hydra" / "overrides.yaml"
        if not path.exists():
            return {}
        lines = read_yaml(path, list)
        return {key.lstrip("+~"): value for key, _, value in (str(line).partition("=") for line in lines)}

    @property
    def share(self) -> str:
        """How Θ is shared (``rule.share``): by ``all`` layers (the default), per ``layer`` or ``synapse``."""
        return str((self.config.get("rule") or {}).get("share") or "all")

    @property
    def theta_json(self) -> dict:
        path = self.path / "theta.json"
        return read_json(path) if path.exists() else {}

    @cached_property
    def rule(self) -> Rule | None:
        """The run's rule: from its config, else (online) its ``theta.json``, else its Θ columns."""
        if self.kind == "online":
            layer_terms = self.theta_json.get("layer_terms")
            if layer_terms:
                layer_terms = tuple(tuple(t) for t in layer_terms)
                return Rule(tuple(sorted(set().union(*layer_terms))), layer_terms)
        has_table = self.table_path.exists()
        depth = sum(1 for c in self.table.columns if c.startswith("orth_")) if has_table else 0
        rule = rule_of(self.config, depth or None)
        if rule is None and self.kind == "meta" and has_table:
            terms = tuple(theta_columns(self.table)) or tuple(
                sorted({r for _, r in theta_layer_columns(self.table)})
            )
            if terms and depth:
                rule = Rule(terms, (terms,) * depth)
        return rule

    @property
    def rule_label(self) -> str:
        """The rule's name (:attr:`metaplast.core.rules.Rule.label`), ``?`` when unknown."""
        return self.rule.label if self.rule is not None else "?"

    @cached_property
    def label(self) -> str:
        """The run for legends: rule, feedback (``B~N``: Gaussian initial B) and regulariser,
        e.g. ``ehebb FA L1 λ=0.001``; a consumer may set another (e.g. to tell runs apart)."""
        feedback = self.config.get("feedback") or {"kind": self.theta_json.get("feedback", "?")}
        parts = [self.rule_label, str(feedback.get("kind", "?")).upper()]
        if feedback.get("init") == "xavier_normal":
            parts.append("B~N")
        reg = self.config.get("reg") or {}
        if reg.get("kind") not in (None, "none"):
            parts.append(f"{str(reg['kind']).upper()} λ={reg.get('lam')}")
        return " ".join(parts)

    # ------------------------------------------------------------ the final Θ

    def final(self, sources=SOURCES) -> FinalTheta:
        """Θ of every trial after the last Adam step, from the first of ``sources`` the run has."""
        for source in sources:
            found = getattr(self, f"_final_from_{source}")()
            if found is not None:
                return found
        raise RunError(f"{str(self.path)!r} has no final Θ (looked in: {', '.join(sources)})")

    def final_theta(self, trial: int | None = None, sources=("checkpoint", "csv")) -> dict[int, float]:
        """Θ shared by all layers after the last Adam step (:meth:`final`), ``{term id: θ_r}``: the
        mean over trials, or one ``trial``'s. By default from ``checkpoints/last.ckpt``, else the
        CSV; a finished run's checkpoint holds its ``result.json`` Θ (the report reads
        :data:`SOURCES`, ``result.json`` first)."""
        final = self.final(sources)
        if final.per_layer or final.share != "all":
            raise RunError(
                f"{str(self.path)!r}: Θ is not shared by all layers (rule.share={final.share}, "
                f"shape {tuple(final.values.shape)})"
            )
        if trial is not None and trial not in final.trials:
            allowed = f"{final.trials[0]}..{final.trials[-1]}" if final.trials else "none"
            raise RunError(f"trial {trial} is not a trial of {self.path}; allowed: {allowed}")
        values = final.mean() if trial is None else final.row(trial)
        return dict(zip(final.terms, values.tolist()))

    def _final_from_result(self) -> FinalTheta | None:
        result = self.result
        if result is None:
            return None
        try:
            values = np.asarray(result["theta"], dtype=float)
            terms, trials = tuple(map(int, result["terms"])), tuple(map(int, result["trials"]))
        except (KeyError, TypeError, ValueError) as error:
            raise RunError(f"{str(self.path / RESULT)!r} has no readable Θ: {_why(error)}") from None
        if values.ndim not in (2, 3) or values.shape[0] != len(trials) or values.shape[-1] != len(terms):
            raise RunError(
                f"{str(self.path / RESULT)!r}: Θ of shape {values.shape} does not match its "
                f"{len(trials)} trials and {len(terms)} terms"
            )
        return FinalTheta(terms, trials, values, "result", str(result.get("theta_share", self.share)))

    def _final_from_checkpoint(self) -> FinalTheta | None:
        checkpoint = self.path / "checkpoints" / "last.ckpt"
        if not checkpoint.exists():
            return None
        try:
            state = load_checkpoint(checkpoint)
            theta = state["state_dict"].get("meta.theta")
        except (CheckpointError, OSError, KeyError, TypeError, AttributeError) as error:
            raise RunError(f"{str(checkpoint)!r} cannot be read as a checkpoint: {_why(error)}") from None
        if theta is None:  # Θ per synapse: a list of tensors (the CSV has its means per layer)
            return None
        first = int((state.get("hyper_parameters") or {}).get("meta", {}).get("first_trial", 0))
        trials = tuple(range(first, first + theta.shape[0]))
        if self.rule is not None:
            terms = self.rule.terms
        elif self.result is not None:
            terms = tuple(map(int, self.result["terms"]))
        else:
            terms = tuple(theta_columns(self.table))
        if len(terms) != theta.shape[-1]:
            raise RunError(
                f"{checkpoint}: Θ has {theta.shape[-1]} columns but the run's rule has terms {list(terms)}"
            )
        return FinalTheta(tuple(terms), trials, theta.double().numpy(), "checkpoint", self.share)

    def _final_from_csv(self) -> FinalTheta | None:
        if not self.table_path.exists() or self.kind != "meta":
            return None
        table = self.table
        if table.empty:
            return None
        last = table[table["episode"] == table["episode"].max()].sort_values("trial")
        trials = tuple(int(t) for t in last["trial"])
        shared, layered = theta_columns(table), theta_layer_columns(table)
        if shared:
            values = last[list(shared.values())].to_numpy(float)
            return FinalTheta(tuple(shared), trials, values, "csv", self.share)
        if not layered:
            return None
        layers = sorted({layer for layer, _ in layered})
        terms = tuple(sorted({r for _, r in layered}))
        values = np.full((len(trials), len(layers), len(terms)), np.nan)
        for (layer, r), column in layered.items():
            values[:, layers.index(layer), terms.index(r)] = last[column].to_numpy(float)
        return FinalTheta(terms, trials, values, "csv", self.share)
