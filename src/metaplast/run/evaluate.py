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
import io
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from metaplast.analysis.rundir import RunDir, RunError
from metaplast.core.analyses import (
    activation_norms,
    explained_variance,
    reconstruct_input,
    reconstruction_error,
    update_norms,
)
from metaplast.core.inner_loop import adapt
from metaplast.core.metrics import episode_metrics
from metaplast.core.pathways import PATHWAYS
from metaplast.core.recurrent import RECURRENT_TERMS as RECURRENT_RULES
from metaplast.core.recurrent import RNN, RecurrentLearner
from metaplast.core.rules import Rule
from metaplast.core.terms import TERMS
from metaplast.data import DataError, trial_generators
from metaplast.data.datasets import SPLITS
from metaplast.run.cli import console, fail, traceback_wanted
from metaplast.run.config import (
    FLOAT_LIMIT,
    INT_LIMIT,
    ConfigError,
    DatasetConfig,
    FeedbackConfig,
    LoggerConfig,
    ModelConfig,
    RuleConfig,
    build_learner,
    build_rule,
    check_data_memory,
    check_dataset,
    check_feedback,
    check_model,
    check_rule,
    check_schema,
    check_seed,
    hidden_sizes,
    resolve_all,
)
from metaplast.run.data import load_data
from metaplast.run.memory import TooLarge, check_fits, online_estimate
from metaplast.safety import (
    CheckpointError,
    DirectoryLock,
    DivergenceError,
    load_checkpoint,
    write_bytes,
    write_text,
)

log = logging.getLogger("metaplast")


@dataclass
class OnlineConfig:
    trials: int = 20
    samples: int | None = None  # length of the stream; None: the whole stream split
    every: int = 100  # k: test every k samples
    stream_split: str = "train"
    test_split: str = "test"
    test_per_class: int | None = None  # None: the whole test split
    validation: int = 0  # images of the stream split held out of every stream: val_acc (grid searches)
    analyses: bool = False  # per-layer analyses (Oja paper Figs. 2-4, 6, S1): analyses.csv, analyses.npz
    probe: int = 256  # analyses: test images whose activations are analysed
    images: int = 8  # analyses: of the probe images, those reconstructed through W^T (Fig. 4)


#: ``model.kind`` of online evaluation: the MLP, or the Oja paper's recurrent network (Fig. 7).
ModelKind = Enum("ModelKind", {"mlp": "mlp", "rnn": "rnn"})


@dataclass
class EvalModelConfig(ModelConfig):
    """The model of online evaluation: training's, and the recurrent network of the Oja paper's Fig. 7
    (``kind=rnn``: one recurrent layer of width ``hidden[0]``, the image for ``show`` steps, blanks
    to step ``length``, the label asked at the end; trained by BPTT (rule f0) or BPTT+Oja (rule oja))."""

    kind: ModelKind = ModelKind.mlp
    show: int = 5
    length: int = 50


@dataclass
class EvaluateConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    rule: RuleConfig = field(default_factory=RuleConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # W&B (job_type evaluate) after the pass
    theta: Any = None  # θ_r by term id; the rule picks its terms
    from_run: str | None = None  # a meta-training run directory: its rule and final Θ
    from_trial: int | None = None  # which trial's Θ of from_run; None: the mean over trials
    seed: int = 0
    verbose: bool = False  # a failure shows its traceback (else one line, metaplast.run.cli)


ConfigStore.instance().store(name="base_evaluate", node=EvaluateConfig)


def theta_from_run(run_dir: str | Path, trial: int | None = None) -> tuple[Rule, dict[int, float]]:
    """The rule and final Θ of a meta-training run (:meth:`metaplast.analysis.rundir.RunDir.final_theta`).

    A run directory that is missing, not a meta-training run, or whose ``last.ckpt`` is damaged or
    holds no Θ of this run's rule is refused (:class:`ConfigError` naming ``from_run``).
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(
            f"from_run={str(run_dir)!r} is not a directory; allowed: a meta-training run directory"
        )
    checkpoint = path / "checkpoints" / "last.ckpt"
    try:
        if checkpoint.exists():
            saved = load_checkpoint(checkpoint)
            if not isinstance(saved.get("state_dict"), dict):
                raise CheckpointError(
                    f"checkpoint {checkpoint} holds no state_dict (not a metaplast checkpoint)"
                )
        run = RunDir(run_dir)
        rule = run.rule
        if run.kind != "meta" or rule is None:
            raise RunError(f"{str(run_dir)!r} is not a meta-training run with a rule")
        if trial is not None and trial not in run.trials:
            trials = run.trials
            raise ConfigError(f"from_trial={trial} is not allowed; allowed: {trials[0]}..{trials[-1]}")
        values = run.final_theta(trial)
    except (RunError, CheckpointError) as error:
        raise ConfigError(f"from_run={str(run_dir)!r}: {error}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(
            f"from_run={str(run_dir)!r}: its files cannot be read as a meta-training run "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); allowed: a run "
            "directory written by metaplast-train"
        ) from None
    bad = {r: v for r, v in values.items() if not math.isfinite(v)}
    if bad:
        raise ConfigError(
            f"from_run={str(run_dir)!r}: its final Θ holds non-finite values {bad}; allowed: a run whose "
            "final Θ is finite"
        )
    return rule, values


def typed_evaluate(cfg) -> EvaluateConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvaluateConfig), cfg))


def _theta_overrides(theta) -> dict[int, float]:
    """``theta`` (a mapping term id -> θ_r) as ints and finite floats; errors name the entry."""
    if theta is None:
        return {}
    if OmegaConf.is_config(theta):
        theta = OmegaConf.to_container(theta)
    if not isinstance(theta, Mapping):
        raise ConfigError(f"theta={theta!r} is not allowed; allowed: a mapping term id -> θ, e.g. {{0:0.01}}")
    values = {}
    for key, value in theta.items():
        try:
            term = int(key)
            if isinstance(key, (bool, float)) or str(term) != str(key).strip():
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(
                f"theta has the key {key!r}; allowed: term ids {min(TERMS)}..{max(TERMS)}, e.g. {{0:0.01}}"
            ) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"theta.{key}={value!r} is not allowed; allowed: a finite number")
        if not math.isfinite(value) or abs(value) > FLOAT_LIMIT:
            raise ConfigError(
                f"theta.{key}={value!r} is not allowed; allowed: a finite number within float32's range "
                f"(|x| <= {FLOAT_LIMIT:.4g})"
            )
        values[term] = float(value)
    return values


def resolve_theta(cfg, depth: int) -> tuple[Rule, torch.Tensor]:
    """The rule and the Θ row (one value per rule term) of an evaluation config."""
    overrides = _theta_overrides(cfg.theta)
    if cfg.from_run is not None:
        rule, values = theta_from_run(cfg.from_run, cfg.from_trial)
        try:
            rule = rule.with_depth(depth)
        except ValueError as error:
            raise ConfigError(f"from_run={cfg.from_run!r}: {error}; use its model (model.hidden)") from None
    else:
        if cfg.from_trial is not None:
            raise ConfigError(f"from_trial={cfg.from_trial} is not allowed without from_run; allowed: null")
        rule = build_rule(cfg)
        values = {r: (cfg.rule.theta0_init if r == 0 else cfg.rule.theta_init) for r in rule.terms}
    values.update(overrides)
    bad = sorted(set(values) - set(TERMS))
    if bad:
        raise ConfigError(f"theta has term ids {bad}; allowed: term ids {min(TERMS)}..{max(TERMS)}")
    return rule, torch.tensor([values[r] for r in rule.terms])


def validate_evaluate(cfg) -> list[int]:
    """Every check of an evaluation config that needs no data; returns the hidden widths.

    Types and keys by the schema (:class:`EvaluateConfig`), ranges like training's
    (:func:`metaplast.run.config.validate`), and what online evaluation itself needs: Θ shared by
    all layers, a pathway without meta-learned parts, ``online.*`` in range.
    """
    resolve_all(cfg)
    check_schema(cfg, EvaluateConfig)
    check_seed("seed", cfg.seed)
    hidden = check_model(cfg.model)
    check_feedback(cfg.feedback)
    check_dataset(cfg.dataset)
    check_rule(cfg)
    online = cfg.online
    for name in ("trials", "every"):
        value = getattr(online, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= INT_LIMIT:
            raise ConfigError(f"online.{name}={value} is not allowed; allowed: an integer >= 1")
    for name in ("samples", "test_per_class"):
        value = getattr(online, name)
        if value is not None and (not isinstance(value, int) or not 1 <= value <= INT_LIMIT):
            raise ConfigError(f"online.{name}={value} is not allowed; allowed: null or an integer >= 1")
    for name, low in (("validation", 0), ("probe", 2), ("images", 0)):
        value = getattr(online, name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= INT_LIMIT:
            raise ConfigError(f"online.{name}={value} is not allowed; allowed: an integer >= {low}")
    if online.images > online.probe:
        raise ConfigError(
            f"online.images={online.images} is not allowed; allowed: at most online.probe={online.probe}"
        )
    if online.validation and online.stream_split == online.test_split:
        raise ConfigError(
            f"online.validation={online.validation} is not allowed with online.stream_split = "
            f"online.test_split = {online.test_split!r}; allowed: 0, or a stream split other than the test "
            "split (the validation images are held out of the stream, never taken from the test split)"
        )
    _check_recurrent(cfg, hidden)
    for name in ("stream_split", "test_split"):
        if getattr(online, name) not in SPLITS:
            raise ConfigError(
                f"online.{name}={getattr(online, name)!r} is not allowed; allowed: {', '.join(SPLITS)}"
            )
    kind = cfg.feedback.kind.value
    if PATHWAYS[kind].rule_terms:
        raise ConfigError(
            f"feedback.kind={kind!r} is not allowed here; allowed: a pathway without its own rule"
        )
    if cfg.feedback.learn:
        raise ConfigError(
            "feedback.learn=True is not allowed here; allowed: false (nothing is meta-learned online)"
        )
    if cfg.rule.share.value != "all":
        raise ConfigError(
            f"rule.share={cfg.rule.share.value!r} is not allowed here; allowed: all (one Θ for every layer)"
        )
    if cfg.model.learn_init:
        raise ConfigError(
            f"model.learn_init={list(cfg.model.learn_init)} is not allowed here; allowed: null "
            "(online evaluation learns no initial weights)"
        )
    if cfg.from_run is not None and not str(cfg.from_run).strip():
        raise ConfigError("from_run='' is not allowed; allowed: null or a meta-training run directory")
    if cfg.from_trial is not None and not 0 <= cfg.from_trial <= INT_LIMIT:
        raise ConfigError(f"from_trial={cfg.from_trial} is not allowed; allowed: null or a trial id >= 0")
    _theta_overrides(cfg.theta)
    check_data_memory(cfg.dataset, splits=2)
    _check_memory(cfg, hidden, 1, 1, 1)
    return hidden


def _check_recurrent(cfg, hidden) -> None:
    """``model.kind=rnn``: one recurrent width, ``1 <= show <= length``, BPTT's feedback (bp),
    rule f0 (BPTT) or oja (BPTT+Oja)."""
    model = cfg.model
    if model.kind.value != "rnn":
        return
    for name, value, low, high in (
        ("length", model.length, 1, INT_LIMIT),
        ("show", model.show, 1, model.length),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(
                f"model.{name}={value} is not allowed; allowed: an integer in {low}..{high}"
                + (" (model.length)" if name == "show" else "")
            )
    if len(hidden) != 1:
        raise ConfigError(
            f"model.hidden={hidden} is not allowed with model.kind=rnn; allowed: one width, e.g. [100]"
        )
    if cfg.feedback.kind.value != "bp":
        raise ConfigError(
            f"feedback.kind={cfg.feedback.kind.value!r} is not allowed with model.kind=rnn; allowed: bp "
            "(BPTT sends errors back through the transposed weights)"
        )
    terms = build_rule(cfg).terms
    if terms not in RECURRENT_RULES:
        raise ConfigError(
            f"rule.terms={list(terms)} is not allowed with model.kind=rnn; allowed: f0 (BPTT) or oja "
            "(BPTT+Oja)"
        )
    if model.bias or model.loss.value != "cross_entropy":
        raise ConfigError(
            "model.bias/model.loss are not allowed with model.kind=rnn; allowed: bias=false, "
            "loss=cross_entropy"
        )


def _check_memory(cfg, hidden, input_dim: int, output_dim: int, test_images: int) -> None:
    estimate = online_estimate(
        [input_dim, *hidden, output_dim], cfg.online.trials, test_images, cfg.online.every
    )
    try:
        check_fits(
            estimate,
            "cpu",
            "online evaluation",
            "fewer online.trials, narrower layers or online.test_per_class",
        )
    except TooLarge as error:
        raise ConfigError(str(error)) from None


def _subsample_per_class(labels: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    picks = []
    for c in torch.unique(labels).tolist():
        indices = torch.nonzero(labels == c).flatten()
        picks.append(indices[torch.randperm(len(indices), generator=generator)[:per_class]])
    return torch.cat(picks)


def _result(value, diverged: bool) -> float:
    """A result cell: the value, or nan for a diverged trial (no result, flagged ``diverged = 1``)."""
    return float("nan") if diverged else float(value)


def run(cfg: DictConfig, out_dir: Path) -> pd.DataFrame:
    """The online pass; writes ``online.csv`` and ``theta.json`` under ``out_dir`` and returns the table.

    A trial whose network diverges (non-finite weights or test loss) is flagged, not scored:
    from that sample on its rows hold ``diverged = 1`` and ``nan`` results. When every trial has
    diverged the pass stops (:class:`DivergenceError`, after writing the table).
    """
    hidden = validate_evaluate(cfg)
    with DirectoryLock(out_dir, "output directory (hydra.run.dir)"):
        return _run(cfg, Path(out_dir), hidden)


def _finite_trials(state, metrics) -> torch.Tensor:
    """Per trial: whether its weights, test loss and alignment metrics (or state norms) are all finite."""
    finite = metrics["loss"].isfinite()
    tensors = [metrics[k] for k in ("angle", "orth", "state_norm") if k in metrics]
    for value in [*state.weights, *tensors]:
        finite = finite & value.reshape(len(finite), -1).isfinite().all(1)
    return finite


def build_online_learner(cfg, input_dim: int, output_dim: int, rule: Rule):
    """The learner of an evaluation config: the MLP learner of training, or for ``model.kind=rnn``
    the recurrent network trained by BPTT(+Oja) (:class:`metaplast.core.recurrent.RecurrentLearner`)."""
    model = cfg.model
    if model.kind.value != "rnn":
        return build_learner(typed_evaluate(cfg), input_dim, output_dim, rule)
    hidden = hidden_sizes(model)
    network = RNN(
        input_dim,
        hidden[0],
        output_dim,
        show=model.show,
        length=model.length,
        activation=model.activation.value,
        beta=model.beta,
        init=model.init.value,
        init_std=model.init_std,
    )
    return RecurrentLearner(network, rule)


def _accuracy(learner, state, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-trial accuracy of the current network on ``x (T, N, d)``."""
    if isinstance(learner, RecurrentLearner):
        logits = learner.network.logits(state.weights, x)
    else:
        logits = learner.network.forward(state.weights, x, state.biases)[1][-1]
    return (logits.argmax(-1) == y).to(logits.dtype).mean(1)


def _held_out_order(cfg, size: int, length: int, trials: list[int]):
    """The validation images (indices into the stream split, shared by all trials) and each trial's
    stream order drawn from the remaining images only: no validation image is ever streamed."""
    online = cfg.online
    order_generators = trial_generators(cfg.seed, trials, 1)
    if not online.validation:
        order = torch.stack([torch.randperm(size, generator=g)[:length] for g in order_generators])
        return torch.zeros(0, dtype=torch.long), order
    held = torch.randperm(size, generator=torch.Generator().manual_seed(cfg.seed))
    validation, pool = held[: online.validation], held[online.validation :]
    order = torch.stack([pool[torch.randperm(len(pool), generator=g)[:length]] for g in order_generators])
    return validation, order


class Analyses:
    """The Oja paper's per-layer analyses of the probe images, at every test point of the online pass
    (:mod:`metaplast.core.analyses`): ``‖y_ℓ‖`` (Fig. 6), Eq. 2's reconstruction error (Fig. 2),
    the update norms ``‖ΔW_ℓ‖`` and backprop's ``‖ΔW_BP,ℓ‖`` on the next stream sample (Supp. Fig. S1)
    into ``analyses.csv``; PCA's cumulative explained variance of each hidden layer (Fig. 3) and, at
    the end, the first ``online.images`` probe images reconstructed from each hidden layer through
    the transposed forward weights (Fig. 4) into ``analyses.npz``. For the recurrent net: the state
    norms ``‖z_t‖`` of the probe sequences, t = 1..T (``state_norm``, in the npz)."""

    def __init__(self, learner, probe: torch.Tensor, probe_labels: torch.Tensor, images: int):
        self.learner, self.probe, self.probe_labels, self.images = learner, probe, probe_labels, images
        self.recurrent = isinstance(learner, RecurrentLearner)
        self.rows: list[dict] = []
        self.samples: list[int] = []
        self.series: dict[str, list] = {}

    def record(self, state, meta, seen: int, trials, diverged, upcoming=None) -> None:
        """Measure at ``seen`` samples; ``upcoming = (x, y)``: the next stream sample of each trial."""
        self.samples.append(seen)
        if self.recurrent:
            norms = self.learner.metrics(state, self.probe, self.probe_labels)["state_norm"]
            self.series.setdefault("state_norm", []).append(norms.double().numpy())
            return
        network = self.learner.network
        ys, _ = network.forward(state.weights, self.probe, state.biases)
        columns = {"norm": activation_norms(ys)}
        if len(ys) > 2:
            columns["recon"] = reconstruction_error(network, state.weights, ys)
        for layer in range(1, len(ys) - 1):
            variance = explained_variance(ys[layer].double())
            self.series.setdefault(f"ev_{layer}", []).append(variance.numpy())
        if upcoming is not None:
            columns["dw"], columns["dw_bp"] = update_norms(self.learner, state, meta, *upcoming)
        for i, trial in enumerate(trials):
            row = {"sample": seen, "trial": trial}
            for name, values in columns.items():
                first = 0 if name == "norm" else 1
                for index, value in enumerate(values[i].tolist()):
                    row[f"{name}_{index + first}"] = _result(value, bool(diverged[i]))
            self.rows.append(row)

    def write(self, state, out_dir: Path) -> None:
        arrays = {"samples": np.asarray(self.samples)}
        arrays.update({name: np.stack(values) for name, values in self.series.items()})
        if not self.recurrent and self.images:
            x = self.probe[:, : self.images]
            arrays["images"] = x[0].double().numpy()
            ys, _ = self.learner.network.forward(state.weights, x, state.biases)
            for layer in range(1, len(ys) - 1):
                arrays[f"recon_{layer}"] = reconstruct_input(state.weights, ys[layer], layer).double().numpy()
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        write_bytes(out_dir / "analyses.npz", buffer.getvalue())
        if self.rows:
            table = pd.DataFrame(self.rows)
            write_text(out_dir / "analyses.csv", table.to_csv(index=False, quoting=csv.QUOTE_MINIMAL))


@torch.no_grad()
def _run(cfg: DictConfig, out_dir: Path, hidden: list[int]) -> pd.DataFrame:
    online = cfg.online
    rule, theta_row = resolve_theta(cfg, len(hidden) + 1)
    stream = load_data(cfg, online.stream_split)
    test = load_data(cfg, online.test_split)
    available = stream.images.shape[0] - online.validation
    if available < 1:
        raise ConfigError(
            f"online.validation={online.validation} is not allowed; allowed: fewer than the "
            f"{stream.images.shape[0]} images of the {online.stream_split!r} split of {cfg.dataset.name!r}"
        )
    length = available if online.samples is None else online.samples
    if length > available:
        held = f" less the online.validation={online.validation} held out" if online.validation else ""
        raise ConfigError(
            f"online.samples={length} is not allowed; allowed: at most {available}, "
            f"the size of the {online.stream_split!r} split of {cfg.dataset.name!r}{held}"
        )
    if stream.images.shape[1] != test.images.shape[1]:
        raise DataError(
            f"the {online.stream_split!r} split has images of {stream.images.shape[1]} pixels, the "
            f"{online.test_split!r} split of {test.images.shape[1]}; allowed: splits of one image size"
        )
    classes = max(stream.num_classes, test.num_classes)
    x_test, y_test = test.images, test.labels
    if online.test_per_class is not None:
        keep = _subsample_per_class(y_test, online.test_per_class, torch.Generator().manual_seed(cfg.seed))
        x_test, y_test = x_test[keep], y_test[keep]
    _check_memory(cfg, hidden, stream.images.shape[1], classes, len(y_test))
    learner = build_online_learner(cfg, stream.images.shape[1], classes, rule)
    trials = list(range(online.trials))
    init_generators = trial_generators(cfg.seed, trials, 0)
    validation, order = _held_out_order(cfg, stream.images.shape[0], length, trials)
    T = len(trials)
    x_val = stream.images[validation].expand(T, len(validation), -1)
    y_val = stream.labels[validation].expand(T, len(validation))
    analyses = None
    if online.analyses:
        picks = torch.randperm(len(y_test), generator=torch.Generator().manual_seed(cfg.seed + 1))
        picks = picks[: online.probe]
        probe = x_test[picks].expand(T, len(picks), -1)
        analyses = Analyses(learner, probe, y_test[picks].expand(T, len(picks)), online.images)
    x_test = x_test.expand(T, *x_test.shape)
    y_test = y_test.expand(T, *y_test.shape)
    kind = cfg.feedback.kind.value
    state = learner.init_state(init_generators, cfg.feedback.init.value)
    meta = {"theta": theta_row.expand(T, -1)}

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
                "model": cfg.model.kind.value,
                "sizes": list(learner.network.sizes),
                "validation": int(online.validation),
            },
            indent=1,
        ),
    )
    rows = []
    seen = 0
    diverged = torch.zeros(T, dtype=torch.bool)
    diverged_at: dict[int, int] = {}
    while True:
        if isinstance(learner, RecurrentLearner):
            metrics = learner.metrics(state, x_test, y_test)
        else:
            metrics = episode_metrics(learner, state, x_test, y_test)
        if "acc" not in metrics:  # a loss without accuracy (mse): the output's argmax
            output = learner.network.forward(state.weights, x_test, state.biases)[1][-1]
            metrics["acc"] = (output.argmax(-1) == y_test).to(output.dtype).mean(1)
        newly = ~_finite_trials(state, metrics) & ~diverged
        for i in newly.nonzero().flatten().tolist():
            diverged_at[trials[i]] = seen
        diverged |= newly
        finite = ~diverged
        if finite.any():
            log.info("sample %d/%d: test accuracy %.3f", seen, length, float(metrics["acc"][finite].mean()))
        val_acc = _accuracy(learner, state, x_val, y_val) if online.validation else None
        for i, t in enumerate(trials):
            blank = bool(diverged[i])
            row = {"sample": seen, "trial": t}
            row["acc"], row["loss"] = _result(metrics["acc"][i], blank), _result(metrics["loss"][i], blank)
            if val_acc is not None:
                row["val_acc"] = _result(val_acc[i], blank)
            if "angle" in metrics:
                row.update({f"angle_{l}": _result(a, blank) for l, a in enumerate(metrics["angle"][i])})
                row.update({f"orth_{l + 1}": _result(e, blank) for l, e in enumerate(metrics["orth"][i])})
            row["diverged"] = int(blank)
            rows.append(row)
        done = seen >= length or diverged.all()
        chunk = order[:, seen : seen + online.every]
        x = stream.images[chunk]
        y = stream.labels[chunk]
        if analyses is not None:
            upcoming = None if done else (x[:, :1], y[:, :1])
            analyses.record(state, meta, seen, trials, diverged, upcoming)
        if done:
            break
        state = adapt(learner, state, meta, x, y)
        seen += chunk.shape[1]
    table = pd.DataFrame(rows)
    write_text(out_dir / "online.csv", table.to_csv(index=False, quoting=csv.QUOTE_MINIMAL))
    if analyses is not None:
        analyses.write(state, out_dir)
    if diverged_at:
        first = min(diverged_at.values())
        log.warning(
            "%d of %d trials diverged (non-finite weights or test loss), the first at sample %d; "
            "flagged in online.csv (diverged = 1), not scored",
            len(diverged_at),
            T,
            first,
        )
    if diverged.all():
        shown = ", ".join(f"theta_{r}={v:.6g}" for r, v in zip(rule.terms, theta_row.tolist()))
        raise DivergenceError(
            f"every trial diverged during online evaluation (non-finite weights or test loss), the last "
            f"at sample {max(diverged_at.values())} of {length}; no accuracy to report; Θ: {shown} "
            f"(feedback.kind={kind}); the rows up to it are in {out_dir / 'online.csv'}"
        )
    return table


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def hydra_main(cfg: DictConfig) -> None:
    """Every failure is one line with exit code 2 (3: every trial diverged), unless ``verbose=true``
    or ``HYDRA_FULL_ERROR=1`` asks for the traceback (:mod:`metaplast.run.cli`). The pass goes to W&B
    afterwards (``logger``; :func:`metaplast.run.tracking.log_evaluation`)."""
    from metaplast.run.cli import check_sweep_preset, quiet_third_party
    from metaplast.run.tracking import log_evaluation

    quiet_third_party(bool(cfg.get("verbose")))
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        check_sweep_preset("metaplast.evaluate", "eval_experiment")
        table = run(cfg, out_dir)
        log_evaluation(cfg, out_dir, table)
    except Exception as error:
        if isinstance(error, DivergenceError) and HydraConfig.get().mode == RunMode.MULTIRUN:
            # a grid search goes on: this job's online.csv flags every trial diverged (no score)
            log.error("%s", " ".join(str(error).split()))
            return
        if traceback_wanted(cfg):
            raise
        fail(error)
    final = table[table["sample"] == table["sample"].max()]
    scored = final[final["diverged"] == 0]
    diverged = len(final) - len(scored)
    note = f"; {diverged} diverged, flagged in online.csv" if diverged else ""
    print(f"final test accuracy: {scored['acc'].mean():.4f} (mean over {len(scored)} trials{note})")


#: The ``metaplast-evaluate`` console script.
main = console(hydra_main)


if __name__ == "__main__":
    main()
