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
from metaplast.run.callbacks import FinalResult, SaveFinal, SaveOnSigterm
from metaplast.run.cli import console, fail, traceback_wanted
from metaplast.run.config import (
    WANDB_NAME_LIMIT,
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
from metaplast.run.tracking import wandb_mode
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
        return MetaPlasticity(config, data, scales, csv_path)
    except ValueError as error:  # the task sampler's checks of M, K and Q against the data
        if isinstance(error, (ConfigError, CheckpointError, DataError)):
            raise
        raise ConfigError(f"meta.{error} (dataset {config.dataset.name!r})") from None


def build_logger(cfg: DictConfig, run_dir: Path, wandb_id: str | None = None):
    if not cfg.logger.wandb:
        return False
    mode = wandb_mode(cfg.logger.mode.value)
    if mode == "disabled":
        return False
    from lightning.pytorch.loggers import WandbLogger

    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    name = cfg.logger.name or (",".join(overrides) if overrides else None)
    return WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group or resume.sweep_name(),
        name=name[:WANDB_NAME_LIMIT] if name else name,
        tags=[*cfg.logger.tags, *run_tags(cfg)],
        id=wandb_id,
        resume="allow" if wandb_id else None,
        mode=mode,
        save_dir=str(run_dir),
        config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
    )


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
    trainer = L.Trainer(
        max_steps=cfg.meta.episodes,
        max_epochs=-1,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        precision=precision,
        logger=logger,
        callbacks=[
            checkpoints,
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


def launch(cfg: DictConfig, run_dir: Path) -> float:
    """Run the job; with ``resume=true`` continue or skip an earlier run of the same job.

    Earlier runs are found by the hash of the job's config in ``.metaplast/jobs/`` under the
    launch directory (:mod:`metaplast.run.resume`); the entry points at ``run_dir`` once it
    holds a checkpoint. Returns the job's objective.
    """
    validate(cfg)
    with DirectoryLock(run_dir, "output directory (hydra.run.dir)"):
        state, path, wandb_id, on_checkpoint = "new", None, None, None
        if cfg.resume and cfg.ckpt_path is None:
            index = Path(HydraConfig.get().runtime.cwd) / ".metaplast" / "jobs"
            key = resume.job_key(cfg)
            state, path, wandb_id = resume.claim(key, run_dir, index)

            def on_checkpoint(saved: Path, key=key, index=index, wandb_id=wandb_id) -> None:
                resume.record(key, run_dir, index, wandb_id)

        if state == "finished":
            objective = cfg.objective
            result = rescore(json.loads(path.read_text()), objective.survive_threshold, objective.max_terms)
            write_json(path, result)
            done = "skipped: this job already finished (resume=false runs it again); results in %s"
            log.info(done, run_dir)
            return result["objective"]
        (run_dir / RESULT).unlink(missing_ok=True)
        try:
            run(cfg, run_dir, str(path) if path else None, wandb_id, on_checkpoint)
        except SIGTERMException:
            last = run_dir / "checkpoints" / "last.ckpt"
            message = f"stopped by SIGTERM; saved {last}; the same command resumes from it"
            log.error("%s", message)
            print(f"metaplast: {message}", file=sys.stderr)
            raise SystemExit(143) from None
        return json.loads((run_dir / RESULT).read_text())["objective"]


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    """Returns the objective (final meta-accuracy, see ``objective.max_terms``) for the optuna sweeper.

    Every failure is one line with exit code 2 (3: divergence), unless ``verbose=true`` or
    ``HYDRA_FULL_ERROR=1`` asks for the traceback (:mod:`metaplast.run.cli`).
    """
    try:
        return launch(cfg, Path(HydraConfig.get().runtime.output_dir))
    except Exception as error:
        if traceback_wanted(cfg):
            raise
        fail(error)


#: The ``metaplast-train`` console script.
main = console(hydra_main)


if __name__ == "__main__":
    main()
