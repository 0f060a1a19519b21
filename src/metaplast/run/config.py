"""The configuration schema (Hydra structured configs), its validation, and the core objects it builds.

Defaults live here and only here: the YAML files of ``conf/`` list only what differs from
them. Types and enumerations are checked by OmegaConf when Hydra composes the config (an
unknown key or a wrong type stops the run before any work); the allowed values of each
enumeration are the names in the core's registries. The checks that need more than a type
live in :func:`validate`. :func:`typed` hands the runner a typed :class:`Config` object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from metaplast.core.inner_loop import ESTIMATORS
from metaplast.core.learner import SHARING, Learner
from metaplast.core.meta import REGULARISERS, check_term_scale
from metaplast.core.networks import ACTIVATIONS, INITIALISERS, LOSSES, MLP
from metaplast.core.pathways import PATHWAYS, make_pathway
from metaplast.core.rules import Rule
from metaplast.data.sampler import SAMPLING_MODES


class ConfigError(ValueError):
    """A configuration value that is not allowed; the message names field, value and what is allowed."""


def _enum(name: str, names) -> type[Enum]:
    """An Enum whose members are a registry's names (so OmegaConf lists them in its errors)."""
    return Enum(name, {n: n for n in names})


FeedbackKind = _enum("FeedbackKind", PATHWAYS)
WeightInit = _enum("WeightInit", INITIALISERS)
ActivationName = _enum("ActivationName", ACTIVATIONS)
LossName = _enum("LossName", LOSSES)
RegKind = _enum("RegKind", REGULARISERS)
Estimator = _enum("Estimator", ESTIMATORS)
Sharing = _enum("Sharing", SHARING)
SamplingMode = _enum("SamplingMode", SAMPLING_MODES)
WandbMode = _enum("WandbMode", ("auto", "online", "offline", "disabled"))


@dataclass
class DatasetConfig:
    name: str = "emnist"
    root: str | None = None  # None: $METAPLAST_DATA, else ~/.cache/metaplast/data
    split: str = "test"
    download: bool = True
    seed: int = 0  # glyphs only
    per_class: int = 400  # glyphs only


@dataclass
class ModelConfig:
    hidden: list[int] | None = field(default_factory=lambda: [170, 130, 100, 70])
    depth: int | None = None
    width: int | None = None
    activation: ActivationName = ActivationName.softplus
    beta: float = 10.0
    bias: bool = False
    loss: LossName = LossName.cross_entropy
    init: WeightInit = WeightInit.xavier_uniform
    init_std: float | None = None  # the standard deviation of init=normal
    remap_labels: bool = False
    learn_init: list[int] | None = None  # layers (0 = W_{0,1}) whose initial weights are meta-learned
    init_lr: float | None = None  # their Adam learning rate (None: meta.lr)
    init_reg: RegKind = RegKind.none
    init_lam: float = 0.0


@dataclass
class RuleConfig:
    terms: Any = "f0"
    per_layer: list[Any] | None = None
    theta0_init: float = 1e-3
    theta_init: float = 0.0
    term_scale: Any = None  # null (plain Adam), auto (measured) or {term id: s}: Adam on s_r θ_r
    share: Sharing = Sharing.all  # Θ for all layers, per layer, or per synapse


@dataclass
class FeedbackConfig:
    kind: FeedbackKind = FeedbackKind.fa
    init: WeightInit = WeightInit.xavier_uniform
    grad_through_b: bool = True  # BP: differentiate the meta-gradient through B = W^T
    decay: float = 0.0  # kolen_pollack: κ in W ← W + ΔW - κW, B ← B + ΔW^T - κB
    psi_init: list[float] | None = None  # plastic: initial ψ (Eq. 9), default 0
    learn: bool = False  # meta-learn the initial matrices B (fixed within an episode)
    lr: float | None = None  # Adam learning rate of ψ and B (None: meta.lr)
    reg: RegKind = RegKind.none  # regulariser of the learned B
    lam: float = 0.0


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
    gradient: Estimator = Estimator.auto  # the meta-gradient: fused where it applies, else autograd
    truncate: int | None = None  # autograd: backpropagate through the last k inner steps only
    batch: int = 1  # samples per inner step (1: online)


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
    recompute_segment: int = 16  # fused: inner steps per recomputation segment; 0 keeps every W


@dataclass
class ObjectiveConfig:
    survive_threshold: float = 1e-3
    max_terms: int | None = None
    last: int = 10  # final meta-accuracy: per trial, the mean over its last N episodes (analysis.results)


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


def _value(enum_or_str):
    return enum_or_str.value if isinstance(enum_or_str, Enum) else enum_or_str


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


def build_learner(cfg, input_dim: int, output_dim: int, rule: Rule | None = None) -> Learner:
    """The core learner of a config: network ``cfg.model``, pathway ``cfg.feedback``, rule ``cfg.rule``."""
    model = cfg.model
    network = MLP(
        (input_dim, *hidden_sizes(model), output_dim),
        activation=_value(model.activation),
        beta=model.beta,
        bias=model.bias,
        loss=_value(model.loss),
        init=_value(model.init),
        init_std=model.init_std,
    )
    kind = _value(cfg.feedback.kind)
    pathway = make_pathway(kind, decay=cfg.feedback.decay) if kind == "kolen_pollack" else make_pathway(kind)
    return Learner(
        network, pathway, rule or build_rule(cfg), cfg.feedback.grad_through_b, _value(cfg.rule.share)
    )


def theta_init_row(cfg, rule: Rule) -> list[float]:
    """The initial Θ of one trial: θ_0 at ``rule.theta0_init``, the others at ``rule.theta_init``."""
    return [cfg.rule.theta0_init if r == 0 else cfg.rule.theta_init for r in rule.terms]


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


def typed(cfg: DictConfig) -> Config:
    """The composed config as a typed :class:`Config` (sub-configs are dataclasses, enums are enums)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))


def _positive(name: str, value, allowed: str = "an integer >= 1") -> None:
    if value < 1:
        _fail(name, value, allowed)


def validate(cfg) -> Rule:
    """Checks that need more than a type; returns the rule. Raises :class:`ConfigError`."""
    check_schema(cfg)
    for name in ("episodes", "M", "K", "Q", "trials", "batch"):
        _positive(f"meta.{name}", getattr(cfg.meta, name))
    if cfg.meta.first_trial < 0:
        _fail("meta.first_trial", cfg.meta.first_trial, "an integer >= 0")
    _positive("meta.max_diverged", cfg.meta.max_diverged)
    if cfg.meta.truncate is not None:
        _positive("meta.truncate", cfg.meta.truncate, "null or an integer >= 1")
    for name in ("meta.lr", "reg.lam", "model.beta", "rule.theta0_init", "rule.theta_init", "feedback.decay"):
        if not math.isfinite(OmegaConf.select(cfg, name)):
            _fail(name, OmegaConf.select(cfg, name), "a finite number")
    for name in ("meta.lr", "feedback.lr", "model.init_lr"):
        value = OmegaConf.select(cfg, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            _fail(
                name, value, "a positive learning rate" + (" or null (meta.lr)" if name != "meta.lr" else "")
            )
    for name in ("reg.lam", "feedback.lam", "model.init_lam"):
        value = OmegaConf.select(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            _fail(name, value, "a non-negative number (λ >= 0)")
    if cfg.model.beta <= 0:
        _fail("model.beta", cfg.model.beta, "a positive number")
    if _value(cfg.model.init) == "normal" and not (cfg.model.init_std is not None and cfg.model.init_std > 0):
        _fail("model.init_std", cfg.model.init_std, "a standard deviation > 0 for model.init=normal")
    if not 0 < cfg.meta.backtrack < 1:
        _fail("meta.backtrack", cfg.meta.backtrack, "a number in (0, 1)")
    if _value(cfg.meta.sampling) == "authors" and cfg.model.remap_labels:
        allowed = "fresh with model.remap_labels=true (the authors' tasks can repeat a class)"
        _fail("meta.sampling", "authors", allowed)
    if cfg.trainer.accelerator not in ACCELERATORS:
        _fail("trainer.accelerator", cfg.trainer.accelerator, ", ".join(ACCELERATORS))
    if str(cfg.trainer.precision) not in PRECISIONS:
        _fail("trainer.precision", cfg.trainer.precision, ", ".join(PRECISIONS))
    if not cfg.objective.survive_threshold >= 0:
        _fail("objective.survive_threshold", cfg.objective.survive_threshold, "a number >= 0")
    if cfg.objective.max_terms is not None and cfg.objective.max_terms < 0:
        _fail("objective.max_terms", cfg.objective.max_terms, "null or an integer >= 0")
    if cfg.objective.last < 1:
        _fail("objective.last", cfg.objective.last, "an integer >= 1 (episodes averaged per trial)")
    _positive("trainer.checkpoint_every", cfg.trainer.checkpoint_every)
    if cfg.trainer.recompute_segment < 0:
        _fail(
            "trainer.recompute_segment", cfg.trainer.recompute_segment, "0 (keep every W) or an integer >= 1"
        )
    term_scale = cfg.rule.term_scale
    term_scale = OmegaConf.to_container(term_scale) if OmegaConf.is_config(term_scale) else term_scale
    try:
        check_term_scale(term_scale)
    except ValueError as error:
        raise ConfigError(f"rule.term_scale={error}") from None
    rule = build_rule(cfg)
    depth = len(rule.layer_terms)
    bad = [i for i in cfg.model.learn_init or [] if not 0 <= i < depth]
    if bad:
        _fail("model.learn_init", list(cfg.model.learn_init), f"null or layer indices 0..{depth - 1}")
    kind = _value(cfg.feedback.kind)
    pathway = PATHWAYS[kind]
    if cfg.feedback.learn and not pathway.has_matrices:
        allowed = "false for feedback.kind=" + kind + " (it has no matrices of its own)"
        _fail("feedback.learn", True, allowed)
    if cfg.feedback.psi_init is not None and len(cfg.feedback.psi_init) != len(pathway.rule_terms):
        _fail("feedback.psi_init", list(cfg.feedback.psi_init), f"null or {len(pathway.rule_terms)} numbers")
    if _value(cfg.meta.gradient) == "fused" and (
        pathway.plastic or cfg.feedback.learn or _value(cfg.rule.share) == "synapse" or cfg.meta.truncate
    ):
        _fail(
            "meta.gradient", "fused", "auto or autograd for this learner (the fused path does not cover it)"
        )
    return rule
