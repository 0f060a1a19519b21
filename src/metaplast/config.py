"""The configuration schema (Hydra structured configs) and its validation.

Types and enumerations are checked by OmegaConf when Hydra composes the
config (an unknown key or a wrong type stops the run before any work); the
checks that need more than a type live in :func:`validate`. Defaults live in
``conf/``; this file only states the shape and the allowed values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from metaplast.episode import Rule
from metaplast.term_scale import check_spec


class ConfigError(ValueError):
    """A configuration value that is not allowed; the message names field, value and what is allowed."""


class FeedbackKind(Enum):
    bp = "bp"
    fa = "fa"
    dfa = "dfa"


class FeedbackInit(Enum):
    xavier_uniform = "xavier_uniform"
    xavier_normal = "xavier_normal"


class SamplingMode(Enum):
    fresh = "fresh"
    authors = "authors"


class RegKind(Enum):
    none = "none"
    l1 = "l1"
    l2 = "l2"


class WandbMode(Enum):
    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class DatasetConfig:
    name: str = "emnist"
    root: str | None = None
    split: str = "test"
    download: bool = True
    seed: int = 0
    per_class: int = 400


@dataclass
class ModelConfig:
    hidden: list[int] | None = field(default_factory=lambda: [170, 130, 100, 70])
    depth: int | None = None
    width: int | None = None
    beta: float = 10.0
    remap_labels: bool = False


@dataclass
class RuleConfig:
    terms: Any = "f0"
    per_layer: list[Any] | None = None
    theta0_init: float = 1e-3
    theta_init: float = 0.0
    term_scale: Any = None  # null (plain Adam), auto (measured) or {term id: s}: Adam on s_r θ_r


@dataclass
class FeedbackConfig:
    kind: FeedbackKind = FeedbackKind.fa
    init: FeedbackInit = FeedbackInit.xavier_uniform
    grad_through_b: bool = True


@dataclass
class RegConfig:
    kind: RegKind = RegKind.none
    lam: float = 0.0


@dataclass
class MetaConfig:
    episodes: int = 600
    M: int = 5
    K: int = 50
    Q: int = 10
    trials: int = 20
    lr: float = 1e-3
    first_trial: int = 0
    max_diverged: int = 10  # consecutive diverged episodes of one trial that stop the run
    backtrack: float = 0.5  # a diverged trial moves to Θ_a + backtrack (Θ - Θ_a), Θ_a: its last finite Θ
    sampling: SamplingMode = SamplingMode.fresh  # fresh (metaplast) or authors (the authors' code)


@dataclass
class LoggerConfig:
    wandb: bool = True
    project: str = "metaplast"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: WandbMode = WandbMode.auto
    csv: bool = True


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: int = 1
    precision: str = "32-true"
    checkpoint_every: int = 50
    progress_bar: bool = True
    recompute_segment: int = 16


@dataclass
class ObjectiveConfig:
    survive_threshold: float = 1e-3
    max_terms: int | None = None


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rule: RuleConfig = field(default_factory=RuleConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    seed: int = 0
    ckpt_path: str | None = None
    resume: bool = True


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PRECISIONS = ("32-true", "64-true", "32", "64")


def register() -> None:
    """Make the schema Hydra's base config (``conf/config.yaml`` lists ``base_config`` first)."""
    ConfigStore.instance().store(name="base_config", node=Config)


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{field_name}={value!r} is not allowed; allowed: {allowed}")


def hidden_sizes(model) -> list[int]:
    """Hidden widths from ``model.hidden`` or from ``model.depth`` × ``model.width``."""
    if model.depth is not None or model.width is not None:
        if model.depth is None or model.width is None:
            _fail("model.depth/model.width", (model.depth, model.width), "both set, or neither")
        if model.depth < 0 or model.width < 1:
            _fail("model.depth/model.width", (model.depth, model.width), "depth >= 0 and width >= 1")
        return [model.width] * model.depth
    hidden = list(model.hidden or [])
    if any(h < 1 for h in hidden):
        _fail("model.hidden", hidden, "a list of positive layer widths")
    return hidden


def build_rule(cfg) -> Rule:
    """The rule of ``cfg.rule`` for the network of ``cfg.model``; errors name the field."""
    depth = len(hidden_sizes(cfg.model)) + 1
    per_layer = None if cfg.rule.per_layer is None else list(cfg.rule.per_layer)
    terms = cfg.rule.terms
    terms = list(terms) if not isinstance(terms, (str, int)) and terms is not None else terms
    try:
        return Rule.build(terms, depth, per_layer)
    except ValueError as error:
        name = "rule.per_layer" if per_layer is not None else "rule.terms"
        raise ConfigError(f"{name}: {error}") from None


def check_schema(cfg) -> None:
    """Keys added with Hydra's ``+key=value`` bypass struct mode; merge into the schema to catch them."""
    try:
        OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.to_container(cfg))
    except ConfigKeyError as error:
        parent = error.full_key.rpartition(".")[0]
        node = OmegaConf.select(OmegaConf.structured(Config), parent) if parent else Config
        allowed = (
            ", ".join(OmegaConf.structured(node).keys()) if parent else ", ".join(Config.__dataclass_fields__)
        )
        raise ConfigError(f"{error.full_key} is not a known key; allowed keys here: {allowed}") from None


def validate(cfg) -> Rule:
    """Checks that need more than a type; returns the rule. Raises :class:`ConfigError`."""
    check_schema(cfg)
    for name in ("episodes", "M", "K", "Q", "trials"):
        value = getattr(cfg.meta, name)
        if value < 1:
            _fail(f"meta.{name}", value, "an integer >= 1")
    if cfg.meta.first_trial < 0:
        _fail("meta.first_trial", cfg.meta.first_trial, "an integer >= 0")
    if cfg.meta.max_diverged < 1:
        _fail("meta.max_diverged", cfg.meta.max_diverged, "an integer >= 1")
    if not 0 <= cfg.meta.backtrack < 1:
        _fail("meta.backtrack", cfg.meta.backtrack, "a number in [0, 1) (0: back to the last finite Θ)")
    if cfg.meta.sampling == SamplingMode.authors and cfg.model.remap_labels:
        allowed = "fresh with model.remap_labels=true (the authors' tasks can repeat a class)"
        _fail("meta.sampling", "authors", allowed)
    term_scale = cfg.rule.term_scale
    term_scale = OmegaConf.to_container(term_scale) if OmegaConf.is_config(term_scale) else term_scale
    try:
        check_spec(term_scale)
    except ValueError as error:
        raise ConfigError(f"rule.term_scale={error}") from None
    for name in ("meta.lr", "reg.lam", "model.beta", "rule.theta0_init", "rule.theta_init"):
        if not math.isfinite(OmegaConf.select(cfg, name)):
            _fail(name, OmegaConf.select(cfg, name), "a finite number")
    if not cfg.meta.lr > 0:
        _fail("meta.lr", cfg.meta.lr, "a positive learning rate")
    if not cfg.reg.lam >= 0:
        _fail("reg.lam", cfg.reg.lam, "a non-negative number (λ >= 0)")
    if cfg.model.beta <= 0:
        _fail("model.beta", cfg.model.beta, "a positive number")
    if cfg.trainer.accelerator not in ACCELERATORS:
        _fail("trainer.accelerator", cfg.trainer.accelerator, ", ".join(ACCELERATORS))
    if str(cfg.trainer.precision) not in PRECISIONS:
        _fail("trainer.precision", cfg.trainer.precision, ", ".join(PRECISIONS))
    if not cfg.objective.survive_threshold >= 0:
        _fail("objective.survive_threshold", cfg.objective.survive_threshold, "a number >= 0")
    if cfg.objective.max_terms is not None and cfg.objective.max_terms < 0:
        _fail("objective.max_terms", cfg.objective.max_terms, "null or an integer >= 0")
    if cfg.trainer.checkpoint_every < 1:
        _fail("trainer.checkpoint_every", cfg.trainer.checkpoint_every, "an integer >= 1")
    if cfg.trainer.recompute_segment < 0:
        allowed = "0 (keep every W) or an integer >= 1"
        _fail("trainer.recompute_segment", cfg.trainer.recompute_segment, allowed)
    return build_rule(cfg)
