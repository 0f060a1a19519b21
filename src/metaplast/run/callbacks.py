"""Training callbacks: the final result (``result.json``, the W&B summary and artifacts), a checkpoint
on SIGTERM, the code version in every checkpoint, and the progress bar in episodes."""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from metaplast.analysis.results import (
    DEFAULT_LAST,
    RESULT,
    final_accuracy,
    job_result,
    write_json,
)
from metaplast.run.resume import CHECKPOINT_VERSION, code_version
from metaplast.run.tracking import late_summary, log_run_artifact, meta_columns

log = logging.getLogger("metaplast")


class FinalResult(L.Callback):
    """At the end of training: write ``result.json`` and put the result into the W&B run's summary.

    The final meta-accuracy is :func:`metaplast.analysis.results.final_accuracy`: per trial, the
    mean over the last ``objective.last`` episodes of the run's episode record (what
    ``metrics.csv`` holds, also without the file: :meth:`MetaPlasticity.episode_table`); the final
    Θ is the module's, after the last Adam step.
    """

    def __init__(self, run_dir: Path, threshold: float, max_terms: int | None, last: int | None = None):
        self.run_dir, self.threshold, self.max_terms, self.last = Path(run_dir), threshold, max_terms, last

    def _last(self, module) -> int:
        return self.last or int(getattr(module.cfg.objective, "last", DEFAULT_LAST))

    def write(self, module) -> dict:
        trial_ids, last = module.trial_ids, self._last(module)
        table = module.episode_table()
        accuracy = final_accuracy(table, trial_ids, last) if table is not None else None
        if accuracy is None:  # no episode recorded
            accuracy = [float("nan")] * len(trial_ids)
        theta = module.theta.detach().double().cpu().numpy()
        terms = module.rule.terms
        result = job_result(theta, terms, trial_ids, accuracy, self.threshold, self.max_terms, last)
        result["theta_share"] = module.learner.share  # "all": exact Θ; else its mean over layers
        result["code_version"] = code_version()
        if module.term_scale is not None:
            result["term_scale"] = dict(zip(map(str, module.rule.terms), module.term_scale.tolist()))
        write_json(self.run_dir / RESULT, result)
        return result

    def on_train_end(self, trainer, module):
        if not trainer.is_global_zero:
            return
        result = self.write(module)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                finish_wandb_run(logger.experiment, module, result, self.run_dir)


def finish_wandb_run(experiment, module, result: dict, run_dir: Path) -> None:
    """The W&B summary of a finished run and its files: the summary holds what ``result.json`` holds
    (each result key the mean over the last ``objective.last`` episodes, each meta-parameter its final
    value, per trial under ``trials/``); the artifact: last checkpoint, ``metrics.csv``, ``result.json``."""
    final = {
        key: value.detach().double().cpu()
        for key, value in meta_columns(module.meta, module.rule.terms).items()
    }
    summary = late_summary(module.table, module.trial_ids, result["last"], final)
    summary["meta/acc"] = result["final_meta_acc"]  # the one definition (analysis.results.final_accuracy)
    summary.update({f"trials/meta/acc/trial_{t}": a for t, a in zip(result["trials"], result["meta_acc"])})
    summary = {
        k: v for k, v in summary.items() if isinstance(v, float) and math.isfinite(v) or k == "meta/acc"
    }
    summary["final/meta_acc"] = result["final_meta_acc"]
    summary["final/meta_acc_ci"] = result["final_meta_acc_ci"]
    summary["final/objective"] = result["objective"]
    summary["final/surviving_terms"] = result["surviving"]
    summary.update({f"final/theta/{r}": v for r, v in result["theta_mean"].items()})
    for trial, row in zip(result["trials"], result["theta"]):
        summary.update({f"trials/final/theta/{r}/trial_{trial}": v for r, v in zip(result["terms"], row)})
    experiment.summary.update(summary)
    files = {"checkpoints/last.ckpt": run_dir / "checkpoints" / "last.ckpt"}
    files.update({name: run_dir / name for name in ("metrics.csv", RESULT)})
    metadata = {"final_meta_acc": result["final_meta_acc"], "code_version": result.get("code_version")}
    log_run_artifact(experiment, "train", files, metadata)


class RecordVersion(L.Callback):
    """Every checkpoint holds the code version that wrote it (:func:`metaplast.run.resume.code_version`):
    a job is not continued by other code without ``resume=true``."""

    def on_save_checkpoint(self, trainer, module, checkpoint):
        checkpoint[CHECKPOINT_VERSION] = code_version()


class EpisodeProgress(ProgressBar):
    """Progress in episodes: s/episode, the time left and the mean meta-accuracy over the trials.

    On a terminal a bar (``episode 45/100 |####  | 1.21s/episode, ETA 01:06, meta-acc 0.412 (4
    trials)``); elsewhere (a log file, a cluster job) the same as a line every ``every``
    seconds, logged (so ``train.log`` has it too).
    """

    def __init__(self, stream=None, every: float = 60.0):
        super().__init__()
        self.stream, self.every = stream, every
        self._enabled, self.bar, self._last_line, self._started = True, None, 0.0, 0.0
        self.accuracy: float | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, module):
        stream = self.stream or sys.stderr
        self.total, self.first = trainer.max_steps, trainer.global_step
        self._started = self._last_line = time.monotonic()
        if not self._enabled or not getattr(stream, "isatty", lambda: False)():
            return
        import os
        import shutil

        from tqdm import tqdm

        try:  # a terminal that reports no size (0 x 0) gets $COLUMNS x $LINES or 80 x 24 (tqdm hides
            width = os.get_terminal_size(stream.fileno()).columns  # a bar below a 0-line screen)
        except (OSError, ValueError, AttributeError):
            width = 0
        fallback = shutil.get_terminal_size()
        self.bar = tqdm(
            total=self.total,
            initial=self.first,
            unit="episode",
            file=stream,
            dynamic_ncols=width > 0,
            ncols=None if width > 0 else fallback.columns,
            nrows=None if width > 0 else fallback.lines,
            bar_format="episode {n_fmt}/{total_fmt} |{bar}| {rate_inv_fmt}, ETA {remaining}{postfix}",
        )

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        _, record, diverged = getattr(module, "_episode", (None, {}, None))
        finite = None if diverged is None else ~diverged.bool()
        shown = ""
        if "meta/acc" in record and finite is not None and finite.any():
            self.accuracy = float(record["meta/acc"].detach().cpu()[finite].double().mean())
            shown = f"meta-acc {self.accuracy:.3f} ({int(finite.sum())} trials)"
        if self.bar is not None:
            self.bar.set_postfix_str(shown, refresh=False)
            self.bar.update(1)
        elif self._enabled and time.monotonic() - self._last_line >= self.every:
            self._last_line = time.monotonic()
            log.info("%s", self.line(trainer.global_step, shown))

    def line(self, done: int, shown: str) -> str:
        """``episode 45/100 (45 %), 1.21 s/episode, ETA 1:06, meta-acc 0.412 (4 trials)``."""
        steps = max(done - self.first, 1)
        per = (time.monotonic() - self._started) / steps
        left = int(per * (self.total - done))
        eta = (
            f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
            if left >= 3600
            else f"{left // 60}:{left % 60:02d}"
        )
        percent = 100 * done / max(self.total, 1)
        text = f"episode {done}/{self.total} ({percent:.0f} %), {per:.2f} s/episode, ETA {eta}"
        return f"{text}, {shown}" if shown else text

    def _close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_train_end(self, trainer, module):
        self._close()

    def on_exception(self, trainer, module, exception):
        self._close()


class SaveOnSigterm(L.Callback):
    """On SIGTERM Lightning ends the current episode and stops; save the state at that point to ``path``.

    Lightning raises :class:`SIGTERMException` only between episodes, so the checkpoint is
    one a normal run could have written; resuming from it gives the uninterrupted Θ.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_exception(self, trainer, module, exception):
        if isinstance(exception, SIGTERMException) and trainer.global_step > 0:
            trainer.save_checkpoint(self.path, weights_only=False)
            log.warning("SIGTERM: saved the state after episode %d to %s", trainer.global_step, self.path)


class SaveFinal(L.Callback):
    """At the end of training save the final state to ``path`` (``last.ckpt``), unless the periodic
    checkpoint of the last episode already did: ``last.ckpt`` is always the final state, also when
    ``meta.episodes`` is not a multiple of ``trainer.checkpoint_every``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_end(self, trainer, module):
        saved = getattr(trainer.checkpoint_callback, "_last_global_step_saved", -1)
        if trainer.global_step == 0 or saved == trainer.global_step:
            return
        trainer.save_checkpoint(self.path, weights_only=False)
