"""Training callbacks: the final result (``result.json`` and the W&B summary) and a checkpoint on SIGTERM."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from metaplast.analysis.results import RESULT, final_accuracy, job_result, write_json

log = logging.getLogger("metaplast")


class FinalResult(L.Callback):
    """At the end of training: write ``result.json`` and put the result into the W&B run's summary."""

    def __init__(self, run_dir: Path, threshold: float, max_terms: int | None):
        self.run_dir, self.threshold, self.max_terms = Path(run_dir), threshold, max_terms

    def write(self, module, metrics=None) -> dict:
        trial_ids = module.trial_ids
        accuracy = final_accuracy(self.run_dir / "metrics.csv", trial_ids) if module.csv else None
        if accuracy is None:  # no CSV: the last episode's logged values
            accuracy = [float(metrics.get(f"meta/acc/trial_{t}", float("nan"))) for t in trial_ids]
        theta = module.theta.detach().double().cpu().numpy()
        result = job_result(theta, module.rule.terms, trial_ids, accuracy, self.threshold, self.max_terms)
        result["theta_share"] = module.learner.share  # "all": exact Θ; else its mean over layers
        if module.term_scale is not None:
            result["term_scale"] = dict(zip(map(str, module.rule.terms), module.term_scale.tolist()))
        write_json(self.run_dir / RESULT, result)
        return result

    def on_train_end(self, trainer, module):
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
            trainer.save_checkpoint(self.path)
            log.warning("SIGTERM: saved the state after episode %d to %s", trainer.global_step, self.path)
