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
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from metaplast.core.fused import RECOMPUTE_SEGMENT
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
#: Task families (``task.family``): few-shot image classification streams, or FLP's incremental sine
#: waves (Lindsey & Litwin-Kumar 2020); the stream order (``task.order``) of either.
TASK_FAMILIES = ("classify", "sine")
TaskFamily = _enum("TaskFamily", TASK_FAMILIES)
StreamOrder = _enum("StreamOrder", ("iid", "continual"))


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
    learn_bias: bool = False  # meta-learn the biases (fixed within an episode; needs model.bias=true)


@dataclass
class RuleConfig:
    terms: Any = "f0"
    per_layer: list[Any] | None = None
    theta0_init: float = 1e-3
    theta_init: float = 0.0
    term_scale: Any = None  # null (plain Adam), auto, measured, stable or {term id: s}: Adam on s_r θ_r
    share: Sharing = Sharing.all  # Θ for all layers, per layer, or per synapse
    plastic: int | None = None  # only the top N layers use rule.terms, those below are frozen ('none')
    # project Θ onto θ >= 0 after every meta-step (FLP's α: Oja's rule with α < 0 grows without bound)
    nonnegative: bool = False


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
class TaskConfig:
    """The task family and its stream (metaplast.data.sine; metaplast.data.sampler)."""

    family: TaskFamily = TaskFamily.classify
    order: StreamOrder = StreamOrder.iid  # iid: shuffled; continual: one class/function after another
    functions: int = 10  # sine: functions per episode
    batches: int = 400  # sine: mini-batches of meta.batch samples per episode
    query: int = 10  # sine: held-out points per function for the meta-loss
    test_classes: int = 0  # classify: classes held out of meta-training, for meta-testing only
    split_seed: int = 0  # classify: which classes are held out
    test_episodes: int = 0  # meta-test episodes after training (meta_test.json); 0: none


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
    backtrack: float = 0.5  # a bad trial moves to Θ_a + backtrack (Θ - Θ_a), Θ_a: its last healthy Θ
    spike_clip: float | None = None  # κ: clip each meta-gradient entry to ±κ √v̂ (Adam's RMS); null: plain
    spike_limit: float | None = None  # κ: ‖g‖ > κ × its RMS backtracks like a divergence; null: off
    restart_momentum: bool = False  # a diverged or spiking trial's Adam momentum restarts (m ← 0)
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
    recompute_segment: int = RECOMPUTE_SEGMENT  # fused: inner steps per segment; 0 keeps every W
    compile: bool = False  # fused: torch.compile each step's vector part (compiles ~1 min first)


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
    task: TaskConfig = field(default_factory=TaskConfig)
    seed: int = 0
    ckpt_path: str | None = None
    resume: str = "auto"  # auto (sweeps, requeued jobs), true or false: metaplast.run.resume
    jobs_dir: str | None = None  # the job index; null: $METAPLAST_JOBS or ~/.local/state/metaplast/jobs
    verbose: bool = False  # a failure shows its traceback (else one line, metaplast.run.cli)


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PRECISIONS = ("32-true", "64-true", "32", "64")
#: Seeds are 32-bit (numpy and Lightning's ``seed_everything`` take [0, 2^32)).
SEED_LIMIT = 2**32
#: The largest count a config may hold (a C int: episodes, sizes, steps, ...); memory is checked apart.
INT_LIMIT = 2**31 - 1
#: The largest magnitude of a real number in a config: float32's largest finite value.
FLOAT_LIMIT = 3.4028234663852886e38
#: W&B's limits (wandb.sdk.wandb_settings): project/entity characters and lengths, tag lengths.
WANDB_FORBIDDEN = "/\\#?%:"
WANDB_NAME_LIMIT, WANDB_TAG_LIMIT = 128, 64


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
        if not (0 <= model.depth <= INT_LIMIT and 1 <= model.width <= INT_LIMIT):
            _fail("model.depth/model.width", (model.depth, model.width), "depth >= 0 and width >= 1")
        return [model.width] * model.depth
    hidden = list(model.hidden or [])
    if any(not isinstance(h, int) or isinstance(h, bool) or not 1 <= h <= INT_LIMIT for h in hidden):
        _fail("model.hidden", hidden, "a list of positive layer widths")
    return hidden


def build_rule(cfg) -> Rule:
    """The rule of ``cfg.rule`` for the network of ``cfg.model``; errors name the field."""
    depth = len(hidden_sizes(cfg.model)) + 1
    per_layer = None if cfg.rule.per_layer is None else list(cfg.rule.per_layer)
    terms = cfg.rule.terms
    plastic = getattr(cfg.rule, "plastic", None)
    if plastic is not None:
        if per_layer is not None:
            _fail("rule.plastic", plastic, "null when rule.per_layer is given (it says which layers learn)")
        if isinstance(plastic, bool) or not isinstance(plastic, int) or not 1 <= plastic <= depth:
            _fail("rule.plastic", plastic, f"null or an integer in 1..{depth} (the network's layers)")
        if OmegaConf.is_config(terms):
            terms = OmegaConf.to_container(terms)
        per_layer = ["none"] * (depth - plastic) + [terms] * plastic
    if per_layer is None and terms is None:
        _fail("rule.terms", None, "a named rule (f0, pool, bio, ehebb, oja) or a list of term ids")
    if per_layer is not None and any(spec is None for spec in per_layer):
        _fail("rule.per_layer", per_layer, "one named rule or list of term ids per layer, none null")
    if OmegaConf.is_config(terms):
        terms = OmegaConf.to_container(terms)
    if isinstance(terms, (list, tuple)) and any(isinstance(t, (list, tuple, dict)) for t in terms):
        _fail("rule.terms", terms, "a named rule or a flat list of term ids")
    if not isinstance(terms, (str, int, list, tuple)) and not (terms is None and per_layer is not None):
        _fail("rule.terms", terms, "a named rule (f0, pool, bio, ehebb, oja) or a list of term ids")
    terms = list(terms) if isinstance(terms, (list, tuple)) else terms  # null with rule.per_layer
    try:
        return Rule.build(terms, depth, per_layer)
    except (ValueError, TypeError) as error:
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


def check_schema(cfg, schema: type = None) -> None:
    """Keys added with Hydra's ``+key=value`` bypass struct mode; merge into the schema to catch them."""
    schema = schema or Config
    try:
        OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(cfg))
    except ConfigKeyError as error:
        parent = error.full_key.rpartition(".")[0]
        node = OmegaConf.select(OmegaConf.structured(schema), parent) if parent else schema
        allowed = (
            ", ".join(OmegaConf.structured(node).keys()) if parent else ", ".join(schema.__dataclass_fields__)
        )
        raise ConfigError(f"{error.full_key} is not a known key; allowed keys here: {allowed}") from None
    except OmegaConfBaseException as error:  # a value of the wrong type added with +key=value
        key = getattr(error, "full_key", None) or "?"
        raise ConfigError(f"{key}: {str(error).strip().splitlines()[0]}") from None


def typed(cfg: DictConfig) -> Config:
    """The composed config as a typed :class:`Config` (sub-configs are dataclasses, enums are enums)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))


def _integer(
    name: str, value, low: int, high: int = INT_LIMIT, nullable: bool = False, allowed: str | None = None
) -> None:
    """``value`` an integer in ``[low, high]`` (or null when ``nullable``)."""
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        too_large = isinstance(value, int) and value > high
        if too_large or (allowed is None and high != INT_LIMIT):
            allowed = f"an integer in {low}..{high}"
        _fail(name, value, ("null or " if nullable else "") + (allowed or f"an integer >= {low}"))


def _positive(name: str, value, allowed: str | None = None) -> None:
    _integer(name, value, 1, allowed=allowed)


def _real(name: str, value, nullable: bool = False) -> None:
    """``value`` a finite number that float32 can hold (|x| <= 3.4e38); not NaN, not ±inf."""
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, value, "a finite number")
    if not math.isfinite(value):
        _fail(name, value, "a finite number")
    if abs(value) > FLOAT_LIMIT:
        _fail(name, value, f"a finite number within float32's range (|x| <= {FLOAT_LIMIT:.4g})")


def check_seed(name: str, value) -> None:
    """Seeds are 32-bit: an integer in [0, 2^32)."""
    _integer(name, value, 0, SEED_LIMIT - 1)


def resolve_all(cfg) -> None:
    """Resolve every interpolation (``${...}``) up front; one that fails names its key."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(
            f"{key}: {reason}; allowed: a value, or an interpolation that resolves (e.g. ${{meta.M}})"
        ) from None


def check_model(model) -> list[int]:
    """Checks of ``model.*`` (training and online evaluation); returns the hidden widths."""
    hidden = hidden_sizes(model)
    _real("model.beta", model.beta)
    if model.beta <= 0:
        _fail("model.beta", model.beta, "a positive number")
    _real("model.init_std", model.init_std, nullable=True)
    if model.init_std is not None and model.init_std <= 0:
        _fail("model.init_std", model.init_std, "null or a standard deviation > 0")
    if _value(model.init) == "normal" and model.init_std is None:
        _fail("model.init_std", model.init_std, "a standard deviation > 0 for model.init=normal")
    _learning_rate("model.init_lr", model.init_lr)
    _penalty("model.init_lam", model.init_lam)
    return hidden


def check_rule(cfg) -> Rule:
    """Checks of ``rule.*`` (training and online evaluation); returns the rule."""
    for name in ("rule.theta0_init", "rule.theta_init"):
        _real(name, OmegaConf.select(cfg, name))
    term_scale = cfg.rule.term_scale
    term_scale = OmegaConf.to_container(term_scale) if OmegaConf.is_config(term_scale) else term_scale
    try:
        check_term_scale(term_scale)
    except ValueError as error:
        raise ConfigError(f"rule.term_scale={error}") from None
    if isinstance(term_scale, dict):
        for key, value in term_scale.items():
            _real(f"rule.term_scale.{key}", value)
    return build_rule(cfg)


def check_feedback(feedback) -> None:
    """Checks of ``feedback.*`` that need no rule (training and online evaluation)."""
    _real("feedback.decay", feedback.decay)
    if not 0 <= feedback.decay <= 1:
        _fail("feedback.decay", feedback.decay, "a number in [0, 1] (κ of W <- W + ΔW - κW)")
    _learning_rate("feedback.lr", feedback.lr)
    _penalty("feedback.lam", feedback.lam)
    for index, value in enumerate(feedback.psi_init or []):
        _real(f"feedback.psi_init[{index}]", value)


def check_dataset(dataset) -> None:
    """Checks of ``dataset.*`` that need no data (the data's own checks: metaplast.data)."""
    from metaplast.data.datasets import LOADERS, SPLITS

    if dataset.name not in LOADERS:
        _fail("dataset.name", dataset.name, ", ".join(LOADERS))
    if dataset.split not in SPLITS:
        _fail("dataset.split", dataset.split, ", ".join(SPLITS))
    if dataset.root is not None and not str(dataset.root).strip():
        _fail(
            "dataset.root", dataset.root, "null ($METAPLAST_DATA or ~/.cache/metaplast/data) or a directory"
        )
    check_seed("dataset.seed", dataset.seed)
    _positive("dataset.per_class", dataset.per_class)


def _learning_rate(name: str, value) -> None:
    if value is None and name != "meta.lr":
        return
    _real(name, value)
    if not value > 0:
        _fail(name, value, "a positive learning rate" + (" or null (meta.lr)" if name != "meta.lr" else ""))


def _penalty(name: str, value) -> None:
    _real(name, value)
    if not value >= 0:
        _fail(name, value, "a non-negative number (λ >= 0)")


def check_accelerator(accelerator: str, devices: int) -> None:
    """An accelerator this machine has, and one device (a run's trials are batched on one device)."""
    import torch

    if accelerator not in ACCELERATORS:
        _fail("trainer.accelerator", accelerator, ", ".join(ACCELERATORS))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        _fail(
            "trainer.accelerator",
            accelerator,
            "auto or cpu on this machine (no CUDA GPU is visible: torch.cuda.is_available() is False)",
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        _fail("trainer.accelerator", accelerator, "auto or cpu on this machine (no Apple MPS device)")
    if devices != 1:
        _fail(
            "trainer.devices",
            devices,
            "1 (a run's trials are batched on one device; more devices would start one process per "
            "device, each running the same trials and writing the same files; run more jobs instead)",
        )


def check_logger(logger) -> None:
    """W&B's own limits, checked before any work: project and entity names, group, tags, mode."""
    for name in ("project", "entity"):
        value = getattr(logger, name)
        if value is None and name == "entity":
            continue
        bad = sorted({c for c in str(value) if c in WANDB_FORBIDDEN or c.isspace() and c != " "})
        if value is None or not str(value).strip() or len(str(value)) > WANDB_NAME_LIMIT or bad:
            _fail(
                f"logger.{name}",
                value,
                f"1 to {WANDB_NAME_LIMIT} characters, none of {' '.join(WANDB_FORBIDDEN)}"
                + (" or null" if name == "entity" else ""),
            )
    for name in ("group", "name"):
        value = getattr(logger, name)
        if value is not None and (not str(value).strip() or len(str(value)) > WANDB_NAME_LIMIT):
            _fail(f"logger.{name}", value, f"null or 1 to {WANDB_NAME_LIMIT} characters")
    for tag in logger.tags:
        if not str(tag).strip() or len(str(tag)) > WANDB_TAG_LIMIT:
            _fail("logger.tags", list(logger.tags), f"tags of 1 to {WANDB_TAG_LIMIT} characters each")
    if logger.wandb and _value(logger.mode) == "online":
        from metaplast.run.tracking import has_wandb_key

        if not has_wandb_key():
            _fail(
                "logger.mode",
                "online",
                "auto, offline or disabled without a W&B API key (set WANDB_API_KEY or run `wandb login`)",
            )


def stream_length(cfg) -> int:
    """Samples in one episode's training stream: M K images, or the sine task's batches x meta.batch."""
    task = getattr(cfg, "task", None)
    if task is not None and _value(task.family) == "sine":
        return task.batches * cfg.meta.batch
    return cfg.meta.M * cfg.meta.K


def query_length(cfg) -> int:
    """Samples in one episode's query set (the meta-loss)."""
    task = getattr(cfg, "task", None)
    if task is not None and _value(task.family) == "sine":
        return task.functions * task.query
    return cfg.meta.M * cfg.meta.Q


def check_task(cfg) -> None:
    """Checks of ``task.*`` (:class:`TaskConfig`) against the model and the meta-settings."""
    task = cfg.task
    for name in ("functions", "batches", "query"):
        _positive(f"task.{name}", getattr(task, name))
    _integer("task.test_classes", task.test_classes, 0)
    _integer("task.test_episodes", task.test_episodes, 0)
    check_seed("task.split_seed", task.split_seed)
    if _value(task.family) == "sine":
        if _value(cfg.model.loss) != "mse":
            _fail("model.loss", _value(cfg.model.loss), "mse for task.family=sine (a regression task)")
        if (task.batches * cfg.meta.batch) % task.functions:
            _fail(
                "task.batches",
                task.batches,
                f"a number of batches whose task.batches x meta.batch samples split equally over "
                f"task.functions={task.functions}",
            )
        if task.test_classes:
            _fail(
                "task.test_classes", task.test_classes, "0 for task.family=sine (its functions are new draws)"
            )
    elif _value(cfg.model.loss) != "cross_entropy":
        _fail("model.loss", _value(cfg.model.loss), "cross_entropy for task.family=classify")
    if cfg.rule.nonnegative and min(cfg.rule.theta0_init, cfg.rule.theta_init) < 0:
        _fail(
            "rule.nonnegative",
            True,
            "false, or rule.theta0_init and rule.theta_init >= 0 (Θ is kept in θ >= 0)",
        )
    if cfg.model.learn_bias and not cfg.model.bias:
        _fail("model.learn_bias", True, "false, or model.bias=true (there are no biases to learn)")


def validate(cfg) -> Rule:
    """Checks that need more than a type; returns the rule. Raises :class:`ConfigError`."""
    resolve_all(cfg)
    check_schema(cfg)
    for name in ("episodes", "M", "K", "Q", "trials", "batch"):
        _positive(f"meta.{name}", getattr(cfg.meta, name))
    _integer("meta.first_trial", cfg.meta.first_trial, 0)
    _positive("meta.max_diverged", cfg.meta.max_diverged)
    if cfg.meta.truncate is not None:
        _integer("meta.truncate", cfg.meta.truncate, 1, nullable=True)
    check_seed("seed", cfg.seed)
    for name in ("meta.lr", "reg.lam", "meta.backtrack"):
        _real(name, OmegaConf.select(cfg, name))
    _learning_rate("meta.lr", cfg.meta.lr)
    _penalty("reg.lam", cfg.reg.lam)
    check_model(cfg.model)
    check_feedback(cfg.feedback)
    check_dataset(cfg.dataset)
    check_task(cfg)
    if not 0 < cfg.meta.backtrack < 1:
        _fail("meta.backtrack", cfg.meta.backtrack, "a number in (0, 1)")
    for name in ("spike_clip", "spike_limit"):
        kappa = getattr(cfg.meta, name)  # a float by the schema
        if kappa is not None and not 1 <= kappa < math.inf:
            _fail(f"meta.{name}", kappa, "null (plain Adam) or a number >= 1")
    if _value(cfg.meta.sampling) == "authors" and cfg.model.remap_labels:
        allowed = "fresh with model.remap_labels=true (the authors' tasks can repeat a class)"
        _fail("meta.sampling", "authors", allowed)
    check_accelerator(cfg.trainer.accelerator, cfg.trainer.devices)
    if str(cfg.trainer.precision) not in PRECISIONS:
        _fail("trainer.precision", cfg.trainer.precision, ", ".join(PRECISIONS))
    _real("objective.survive_threshold", cfg.objective.survive_threshold)
    if not cfg.objective.survive_threshold >= 0:
        _fail("objective.survive_threshold", cfg.objective.survive_threshold, "a number >= 0")
    _integer("objective.max_terms", cfg.objective.max_terms, 0, nullable=True)
    _integer("objective.last", cfg.objective.last, 1, allowed="an integer >= 1 (episodes averaged per trial)")
    _positive("trainer.checkpoint_every", cfg.trainer.checkpoint_every)
    if not isinstance(cfg.trainer.recompute_segment, int) or not (
        0 <= cfg.trainer.recompute_segment <= INT_LIMIT
    ):
        _fail(
            "trainer.recompute_segment", cfg.trainer.recompute_segment, "0 (keep every W) or an integer >= 1"
        )
    if cfg.ckpt_path is not None and not str(cfg.ckpt_path).strip():
        _fail(
            "ckpt_path", cfg.ckpt_path, "null (start afresh or auto-resume) or the path of a checkpoint file"
        )
    if str(cfg.get("resume", "auto")).strip().lower() not in ("auto", "true", "false"):
        _fail("resume", cfg.resume, "auto (take over earlier runs in sweeps and requeued jobs), true, false")
    check_logger(cfg.logger)
    rule = check_rule(cfg)
    depth = len(rule.layer_terms)
    bad = [i for i in cfg.model.learn_init or [] if not 0 <= i < depth]
    if bad or len(set(cfg.model.learn_init or [])) != len(cfg.model.learn_init or []):
        _fail(
            "model.learn_init", list(cfg.model.learn_init), f"null or distinct layer indices 0..{depth - 1}"
        )
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
    check_memory(cfg, rule)
    return rule


def run_device(accelerator: str) -> str:
    """The device a run with ``trainer.accelerator`` uses: ``cuda`` or ``cpu`` (mps: counted as cpu)."""
    import torch

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def check_memory(cfg, rule: Rule | None = None, input_dim: int = 1, output_dim: int = 1) -> None:
    """Refuse a config whose episode cannot fit in the memory of its device, naming the sizes.

    Before the data is loaded the input and output widths count as 1 (a lower bound still);
    :func:`metaplast.run.train.build_module` checks again with the data's.
    """
    from metaplast.run.memory import TooLarge, check_fits, episode_estimate

    check_data_memory(cfg.dataset, run_device(cfg.trainer.accelerator))
    meta = cfg.meta
    sizes = [input_dim, *hidden_sizes(cfg.model), output_dim]
    steps = math.ceil(stream_length(cfg) / meta.batch)
    precision = str(cfg.trainer.precision)
    element = 8 if precision.startswith("64") else 4
    estimator = "autograd" if _value(meta.gradient) == "autograd" or meta.truncate else "auto"
    estimate = episode_estimate(
        sizes, meta.trials, steps, query_length(cfg), estimator, cfg.trainer.recompute_segment, element
    )
    try:
        check_fits(
            estimate,
            run_device(cfg.trainer.accelerator),
            "an episode",
            "fewer meta.trials, narrower or fewer layers (model.hidden), smaller meta.M/meta.K, "
            f"or a longer trainer.recompute_segment (now {cfg.trainer.recompute_segment}; fewer kept W)",
        )
    except TooLarge as error:
        raise ConfigError(str(error)) from None


def check_data_memory(dataset, device: str = "cpu", splits: int = 1) -> None:
    """The generated glyphs (47 x ``dataset.per_class`` images of 28 x 28, as bytes and as float32)
    must fit in memory (on the CPU, where they are made)."""
    from metaplast.data.glyphs import GLYPH_CLASSES, IMAGE_SIZE
    from metaplast.run.memory import Estimate, TooLarge, check_fits

    if dataset.name != "glyphs":
        return
    images = len(GLYPH_CLASSES) * dataset.per_class * splits
    pixels = IMAGE_SIZE * IMAGE_SIZE
    estimate = Estimate(
        images * pixels * 5, f"{images:,} glyph images of {pixels} pixels x 5 bytes (uint8 and float32)"
    )
    try:
        check_fits(estimate, "cpu", f"dataset.per_class={dataset.per_class}", "a smaller dataset.per_class")
    except TooLarge as error:
        raise ConfigError(str(error)) from None
