"""``python -m metaplast.train``: meta-learn a plasticity rule (Algorithm 1) from a Hydra config."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from metaplast.analysis.results import RESULT, rescore, write_json
from metaplast.core.meta import fixed_scales
from metaplast.data import DataError
from metaplast.run import resume
from metaplast.run.calibration import calibrate
from metaplast.run.callbacks import EpisodeProgress, FinalResult, RecordVersion, SaveFinal, SaveOnSigterm
from metaplast.run.cli import check_sweep_preset, console, fail, quiet_third_party, traceback_wanted
from metaplast.run.config import (
    ConfigError,
    build_learner,
    build_rule,
    check_memory,
    register,
    theta_init_row,
    typed,
    validate,
)
from metaplast.run.data import load_data
from metaplast.run.module import MetaPlasticity, check_checkpoint
from metaplast.run.tracking import episode_logger, short_name, wandb_mode
from metaplast.safety import CheckpointError, DirectoryLock, SafeCheckpointIO, load_checkpoint

log = logging.getLogger("metaplast")
register()


def term_scales(cfg, rule, data, output: int, ckpt_path: str | None) -> list[float] | None:
    """The ``rule.term_scale`` scales, one per column of Θ: given, measured (``auto``: calibrated
    before training, or read back from the checkpoint a resumed run continues), or None."""
    spec = cfg.rule.term_scale
    if spec is None:
        return None
    if spec != "auto":
        return fixed_scales(spec, rule.terms)
    if ckpt_path:
        saved = load_checkpoint(ckpt_path).get("metaplast_term_scale")
        if saved is not None:
            return saved
    scales = calibrate(
        build_learner(cfg, data.images.shape[1], output, rule),
        data.images,
        data.labels,
        theta_init_row(cfg, rule),
        cfg.meta.M,
        cfg.meta.K,
        cfg.meta.Q,
        cfg.feedback.init.value,
        cfg.meta.sampling.value,
        cfg.model.remap_labels,
    )
    shown = ", ".join(f"s_{r}={s:.3g}" for r, s in zip(rule.terms, scales))
    log.info("rule.term_scale=auto: measured per-term step scales %s", shown)
    return scales


def build_module(cfg: DictConfig, run_dir: Path, ckpt_path: str | None = None) -> MetaPlasticity:
    """Validate ``cfg`` against itself and its dataset, then build the LightningModule."""
    rule = validate(cfg)
    config = typed(cfg)
    data = load_data(config)
    output = config.meta.M if config.model.remap_labels else data.num_classes
    check_memory(cfg, rule, data.images.shape[1], output)  # again, with the data's widths
    try:
        scales = term_scales(config, rule, data, output, ckpt_path)
        csv_path = str(run_dir / "metrics.csv") if config.logger.csv else None
        module = MetaPlasticity(config, data, scales, csv_path)
        module.data_line = describe_data(config, data)  # for the start line
        return module
    except ValueError as error:  # the task sampler's checks of M, K and Q against the data
        if isinstance(error, (ConfigError, CheckpointError, DataError)):
            raise
        raise ConfigError(f"meta.{error} (dataset {config.dataset.name!r})") from None


def describe_data(cfg, data) -> str:
    """``glyphs (564 images, 47 classes; 3-way, K=4, Q=3)`` for the start line."""
    task = cfg.task
    if str(getattr(task.family, "value", task.family)) == "sine":
        order = getattr(task.order, "value", task.order)
        return f"sine waves ({task.functions} functions, {task.batches} batches per episode, {order})"
    images = getattr(data, "images", None)
    size = f"{images.shape[0]} samples" if images is not None else "?"
    classes = getattr(data, "num_classes", None)
    where = f"{cfg.dataset.name} ({size}" + (f", {classes} classes" if classes else "")
    return f"{where}; {cfg.meta.M}-way, K={cfg.meta.K}, Q={cfg.meta.Q})"


def build_logger(cfg: DictConfig, run_dir: Path, wandb_id: str | None = None):
    """W&B (:func:`metaplast.run.tracking.episode_logger`), or False (``logger.wandb=false``, disabled)."""
    if not cfg.logger.wandb:
        return False
    mode = wandb_mode(cfg.logger.mode.value)
    if mode == "disabled":
        return False
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    config["code_version"] = resume.code_version()
    logger = episode_logger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group or resume.sweep_name(),
        name=short_name(cfg.logger.name),
        tags=[*cfg.logger.tags, *run_tags(cfg)],
        id=wandb_id,
        resume="allow" if wandb_id else None,
        mode=mode,
        job_type="train",
        save_dir=str(run_dir),
        config=config,
    )
    logger.mode = mode  # for the start line
    return logger


def run_tags(cfg: DictConfig) -> list[str]:
    """W&B tags naming the rule, feedback, regulariser and dataset."""
    tags = [f"rule:{build_rule(cfg).label}", f"feedback:{cfg.feedback.kind.value}"]
    tags += [f"reg:{cfg.reg.kind.value}", f"dataset:{cfg.dataset.name}"]
    return [tag[:64] for tag in tags]  # W&B's limit


def run(
    cfg: DictConfig,
    run_dir: Path,
    ckpt_path: str | None = None,
    wandb_id: str | None = None,
    on_checkpoint=None,
) -> MetaPlasticity:
    """Meta-train as configured; results, checkpoints and W&B files go under ``run_dir``.

    ``run_dir`` is locked while the run writes into it (a second run there is refused). A
    checkpoint to resume from is checked against the config first. On SIGTERM the current
    episode ends, is saved as ``checkpoints/last.ckpt`` and :class:`SIGTERMException` is
    raised; a finished run saves its final state as ``checkpoints/last.ckpt`` (whatever
    ``trainer.checkpoint_every``), then writes ``result.json``. ``on_checkpoint(path)`` is
    called whenever a checkpoint is complete on disk.
    """
    validate(cfg)  # before anything uses a value (the seed, first)
    with DirectoryLock(run_dir, "output directory (hydra.run.dir)"):
        return _run(cfg, Path(run_dir), ckpt_path or cfg.ckpt_path, wandb_id, on_checkpoint)


def _run(cfg, run_dir: Path, ckpt_path, wandb_id, on_checkpoint) -> MetaPlasticity:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg, run_dir, ckpt_path)
    if ckpt_path:
        check_checkpoint(module, load_checkpoint(ckpt_path), ckpt_path, cfg.meta.episodes)
    precision = {"32": "32-true", "64": "64-true"}.get(str(cfg.trainer.precision), cfg.trainer.precision)
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="episode-{step}",
        auto_insert_metric_name=False,
        enable_version_counter=False,
        every_n_train_steps=cfg.trainer.checkpoint_every,
        save_top_k=-1,
        save_last=True,
    )
    logger = build_logger(cfg, run_dir, wandb_id)
    progress = [EpisodeProgress()] if cfg.trainer.progress_bar else []
    trainer = L.Trainer(
        max_steps=cfg.meta.episodes,
        max_epochs=-1,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        precision=precision,
        logger=logger,
        callbacks=[
            RecordVersion(),  # before the checkpoint callbacks write: every checkpoint holds the version
            checkpoints,
            *progress,
            SaveOnSigterm(last),
            SaveFinal(last),  # before FinalResult: result.json marks a run whose last.ckpt is final
            FinalResult(run_dir, cfg.objective.survive_threshold, cfg.objective.max_terms),
        ],
        plugins=[SafeCheckpointIO(on_checkpoint)],  # atomic fsync'd saves, weights_only=True loads
        log_every_n_steps=1,
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )
    mode = logger.mode if logger else "off"
    device = trainer.strategy.root_device
    terms = ", ".join(f"F^{r}" for r in module.rule.terms)
    log.info(
        "metaplast %s: meta-training rule %s (%s), feedback %s, reg %s; %d trials x %d episodes%s; data %s; "
        "device %s; W&B %s; run dir %s",
        resume.code_version(),
        module.rule.label,
        terms,
        cfg.feedback.kind.value,
        cfg.reg.kind.value,
        cfg.meta.trials,
        cfg.meta.episodes,
        f" from episode {load_checkpoint(ckpt_path)['global_step']}" if ckpt_path else "",
        getattr(module, "data_line", cfg.dataset.name),
        device.type if device.index is None else f"{device.type}:{device.index}",
        {"offline": f"offline (wandb sync {shown(run_dir)}/wandb/offline-run-*)"}.get(mode, mode),
        shown(run_dir),
    )
    try:
        trainer.fit(module, ckpt_path=ckpt_path, weights_only=True)
    finally:
        if logger:
            import wandb

            wandb.finish()
    # A run resumed from a checkpoint of its last episode has nothing left to train.
    if not (run_dir / RESULT).exists() and trainer.global_step >= cfg.meta.episodes:
        FinalResult(run_dir, cfg.objective.survive_threshold, cfg.objective.max_terms).write(module)
    return module


def end_line(run_dir: Path, result: dict, episodes: int) -> str:
    """The run's last console line: late meta-accuracy with its CI, final Θ, the run dir, what next."""
    low, high = result.get("final_meta_acc_ci", [float("nan")] * 2)
    last = min(result.get("last", 1), episodes)
    accuracy = (
        f"meta-accuracy {result['final_meta_acc']:.3f} (98 % CI {low:.3f}-{high:.3f}, "
        f"{len(result['trials'])} trials, mean of the last {last} episodes)"
    )
    theta = " ".join(f"θ_{r}={v:.3g}" for r, v in result["theta_mean"].items())
    where = shown(run_dir)
    return f"{accuracy}; final Θ {theta}; run dir {where}; next: python -m metaplast.report {where}"


def shown(path: Path) -> str:
    """``path`` as the console shows it: relative to the working directory when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def launch(cfg: DictConfig, run_dir: Path) -> float:
    """Run the job, or (``resume``, :mod:`metaplast.run.resume`) continue or skip an earlier run of it.

    ``resume=auto`` takes an earlier run over in a sweep or a requeued cluster job only; a single
    run always runs (and says so when an earlier run of the same job exists). Earlier runs are
    found by the hash of the job's config in the job index (:func:`metaplast.run.resume.index_dir`);
    the entry points at ``run_dir`` once it holds a checkpoint. An earlier run made by other code
    is refused unless ``resume=true``. Returns the job's objective.
    """
    validate(cfg)
    mode = resume.resume_mode(cfg.resume)
    with DirectoryLock(run_dir, "output directory (hydra.run.dir)"):
        state, path, wandb_id, on_checkpoint = "new", None, None, None
        if cfg.ckpt_path is None:
            index, key, version = resume.index_dir(cfg.jobs_dir), resume.job_key(cfg), resume.code_version()
            if resume.takes_over(mode):
                earlier = resume.peek(key, index)
                source = shown(earlier[1]) if earlier else "?"
                state, path, wandb_id = resume.claim(key, run_dir, index, version, force=mode == "true")
            else:
                announce_earlier(key, index, mode)

            def on_checkpoint(saved: Path, key=key, index=index, wandb_id=wandb_id, version=version) -> None:
                resume.record(key, run_dir, index, wandb_id, version)

        if state == "finished":
            objective = cfg.objective
            result = rescore(json.loads(path.read_text()), objective.survive_threshold, objective.max_terms)
            write_json(path, result)
            old = result.get("code_version", "an unrecorded version")
            log.warning(
                "resume=%s: skipped: this job already finished in %s (metaplast %s); its results are copied "
                "to %s (resume=false runs it again)",
                mode,
                source,
                old,
                shown(run_dir),
            )
            log.info("%s", end_line(run_dir, result, cfg.meta.episodes))
            return result["objective"]
        if state == "resume":
            episode = load_checkpoint(path)["global_step"]
            log.warning(
                "resume=%s: continuing this job from episode %d/%d of %s, copied to %s (resume=false "
                "starts it afresh)",
                mode,
                episode,
                cfg.meta.episodes,
                source,
                shown(run_dir),
            )
        (run_dir / RESULT).unlink(missing_ok=True)
        try:
            run(cfg, run_dir, str(path) if path else None, wandb_id, on_checkpoint)
        except SIGTERMException:
            last = run_dir / "checkpoints" / "last.ckpt"
            message = (
                f"stopped by SIGTERM; saved {last}; the same command with resume=true continues it "
                "(a sweep or a requeued job does so by itself)"
            )
            log.error("%s", message)
            print(f"metaplast: {message}", file=sys.stderr)
            raise SystemExit(143) from None
        result = json.loads((run_dir / RESULT).read_text())
        log.info("%s", end_line(run_dir, result, cfg.meta.episodes))
        return result["objective"]


def announce_earlier(key: str, index: Path, mode: str) -> None:
    """A single run that does not take over an earlier run of its job says where that run is (one line)."""
    if mode == "false":
        return
    found = resume.peek(key, index)
    if found is None:
        return
    state, old, episode = found
    if state == "stopped":
        at = f" at episode {episode}" if episode is not None else ""
        log.warning(
            "an unfinished run of this job stopped%s in %s; this run starts afresh (resume=true continues "
            "that one instead)",
            at,
            shown(old),
        )


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    """Returns the objective (final meta-accuracy, see ``objective.max_terms``) for the optuna sweeper.

    Every failure is one line with exit code 2 (3: divergence), unless ``verbose=true`` or
    ``HYDRA_FULL_ERROR=1`` asks for the traceback (:mod:`metaplast.run.cli`).
    """
    quiet_third_party(bool(cfg.get("verbose")))
    try:
        check_sweep_preset("metaplast.train", "experiment")
        return launch(cfg, Path(HydraConfig.get().runtime.output_dir))
    except Exception as error:
        if traceback_wanted(cfg):
            raise
        fail(error)


#: The ``metaplast-train`` console script.
main = console(hydra_main)


if __name__ == "__main__":
    main()
