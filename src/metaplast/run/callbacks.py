"""Training callbacks: the final result (``result.json`` and the W&B summary) and a checkpoint on SIGTERM."""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from metaplast.analysis.results import (
    DEFAULT_LAST,
    RESULT,
    final_accuracy,
    job_result,
    per_trial_mean,
    write_json,
)

log = logging.getLogger("metaplast")


class FinalResult(L.Callback):
    """At the end of training: write ``result.json`` and put the result into the W&B run's summary.

    The final meta-accuracy is :func:`metaplast.analysis.results.final_accuracy`: per trial, the
    mean over the last ``objective.last`` episodes of ``metrics.csv`` (without a CSV: of those this
    process saw); the final Θ is the module's, after the last Adam step.
    """

    def __init__(self, run_dir: Path, threshold: float, max_terms: int | None, last: int | None = None):
        self.run_dir, self.threshold, self.max_terms, self.last = Path(run_dir), threshold, max_terms, last
        self.recent: deque = deque()  # per episode seen: each trial's accuracy (NaN: diverged)

    def _last(self, module) -> int:
        return self.last or int(getattr(module.cfg.objective, "last", DEFAULT_LAST))

    def on_fit_start(self, trainer, module):
        self.recent = deque(maxlen=self._last(module))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        _, record, diverged = getattr(module, "_episode", (None, {}, None))  # set in its optimizer step
        if "meta/acc" in record:
            acc = record["meta/acc"].detach().double().cpu().masked_fill(diverged.bool(), float("nan"))
            self.recent.append(acc.tolist())

    def write(self, module, metrics=None) -> dict:
        trial_ids, last = module.trial_ids, self._last(module)
        accuracy = final_accuracy(self.run_dir / "metrics.csv", trial_ids, last) if module.csv else None
        if accuracy is None and self.recent:  # no CSV: the episodes seen here
            accuracy = per_trial_mean(list(self.recent)[-last:])
        if accuracy is None:  # nothing seen (resumed after its last episode): the last logged values
            accuracy = [float((metrics or {}).get(f"meta/acc/trial_{t}", float("nan"))) for t in trial_ids]
        theta = module.theta.detach().double().cpu().numpy()
        terms = module.rule.terms
        result = job_result(theta, terms, trial_ids, accuracy, self.threshold, self.max_terms, last)
        result["theta_share"] = module.learner.share  # "all": exact Θ; else its mean over layers
        if module.term_scale is not None:
            result["term_scale"] = dict(zip(map(str, module.rule.terms), module.term_scale.tolist()))
        write_json(self.run_dir / RESULT, result)
        return result

    def on_train_end(self, trainer, module):
        if not trainer.is_global_zero:
            return
        result = self.write(module, trainer.callback_metrics)
        summary = {"final/meta_acc": result["final_meta_acc"], "final/objective": result["objective"]}
        summary["final/surviving_terms"] = result["surviving"]
        summary.update({f"final/theta/{r}": v for r, v in result["theta_mean"].items()})
        for trial, row in zip(result["trials"], result["theta"]):
            summary.update({f"final/theta/{r}/trial_{trial}": v for r, v in zip(result["terms"], row)})
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(summary)


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
