"""Auto-resume of killed jobs: a job's identity, the index of its runs, its W&B group.

No run is ever lost: the index entry of a job (``.metaplast/jobs/<key>.json`` under the
launch directory) points at a run directory only once that directory holds a checkpoint
(:func:`record`, called when a checkpoint is complete on disk), and a run that takes over an
earlier one first copies that run's checkpoint and table into its own directory. A run killed
at any moment — before its first checkpoint, during a failed resume — leaves the index at the
last directory that holds the job's progress.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from metaplast.analysis.results import RESULT, write_json
from metaplast.safety import DirectoryLock, OutputError, write_bytes

log = logging.getLogger("metaplast")

#: Config keys that do not change Θ or the metrics: two runs differing only here are the same job.
NOT_IDENTITY = (
    "ckpt_path",
    "resume",
    "verbose",
    "objective",
    "trainer.progress_bar",
    "trainer.checkpoint_every",
)
#: What a finished result.json must hold to be taken as finished.
RESULT_KEYS = ("terms", "trials", "theta", "meta_acc", "objective")


def sweep_name() -> str | None:
    """The W&B group of a multirun job: its sweep directory, relative to the launch directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra = HydraConfig.get()
    sweep_dir = Path(hydra.sweep.dir)
    inside = sweep_dir.is_absolute() and sweep_dir.is_relative_to(hydra.runtime.cwd)
    return str(sweep_dir.relative_to(hydra.runtime.cwd) if inside else sweep_dir)


def job_key(cfg) -> str:
    """A job's identity: a hash of its resolved config without the keys that do not change its results."""
    data = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for dotted in NOT_IDENTITY:
        *parents, leaf = dotted.split(".")
        node = data
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    for key in list(data.get("logger", {})):
        if key != "csv":  # where results are shown, not what they are
            data["logger"].pop(key)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]


def read_entry(entry: Path) -> dict | None:
    """The index entry of a job (``{"run_dir", "wandb_id"}``), None when there is none.

    A damaged entry (not JSON, not an object with a ``run_dir`` string) is refused with a message
    naming it: starting the job afresh could hide a run that holds its progress.
    """
    if not entry.exists():
        return None
    try:
        data = json.loads(entry.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("run_dir"), str) or not data["run_dir"]:
            raise ValueError("not an object with a run_dir")
        if data.get("wandb_id") is not None and not isinstance(data["wandb_id"], str):
            raise ValueError("wandb_id is not a string")
        return data
    except (ValueError, OSError, UnicodeDecodeError) as error:
        raise OutputError(
            f"job index entry {entry} is damaged ({str(error).splitlines()[0][:80]}); allowed: the entry as "
            'metaplast wrote it ({"run_dir": ..., "wandb_id": ...}); restore it, or delete it to run '
            "the job afresh"
        ) from None


def finished_result(path: Path) -> dict | None:
    """``result.json`` of a finished run, or None when it is missing or damaged (logged)."""
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(result, dict) and all(key in result for key in RESULT_KEYS):
            return result
        raise ValueError(f"it lacks some of {', '.join(RESULT_KEYS)}")
    except (ValueError, OSError, UnicodeDecodeError) as error:
        log.warning("%s is damaged (%s); not taken as finished", path, str(error).splitlines()[0][:80])
        return None


def _copy(source: Path, target: Path) -> None:
    """Copy a file atomically (a crash leaves the old target or the complete copy)."""
    write_bytes(target, source.read_bytes())


def record(key: str, run_dir: Path, index_dir: Path, wandb_id: str | None) -> None:
    """Point job ``key``'s index entry at ``run_dir`` (call once it holds a checkpoint)."""
    entry = Path(index_dir) / f"{key}.json"
    current = read_entry(entry) if entry.exists() else None
    wanted = {"run_dir": str(Path(run_dir).resolve()), "wandb_id": wandb_id}
    if current != wanted:
        write_json(entry, wanted)


def claim(key: str, run_dir: Path, index_dir: Path) -> tuple[str, Path | None, str | None]:
    """Make ``run_dir`` the home of job ``key``, taking over an earlier run of the same job.

    Returns ``(state, path, wandb_id)``: ``("finished", result.json)`` when an earlier run
    finished (its results are copied into ``run_dir``), ``("resume", last.ckpt)`` when it left
    a checkpoint (its checkpoint and ``metrics.csv`` are copied into ``run_dir``, whose
    ``last.ckpt`` the run continues from; the index then points at ``run_dir``), else
    ``("new", None)``: the index is not touched until ``run_dir`` holds a checkpoint
    (:func:`record`). The W&B run id stays the same across resumptions. An earlier run still
    running (its directory is locked) is refused.
    """
    run_dir, index_dir = Path(run_dir).resolve(), Path(index_dir)
    entry = index_dir / f"{key}.json"
    previous = read_entry(entry)
    state, path, wandb_id = "new", None, None
    if previous is not None:
        old = Path(previous["run_dir"])
        wandb_id = previous.get("wandb_id")
        if old != run_dir and DirectoryLock.in_use(old):
            raise OutputError(
                f"job {key} is running in {old} (its directory is locked); allowed: one run of a job "
                "at a time (wait for it to end, or rerun with resume=false)"
            )
        if finished_result(old / RESULT) is not None:
            state, path = "finished", run_dir / RESULT
            names = ("checkpoints/last.ckpt", "metrics.csv", RESULT)  # result.json last: it marks done
        elif (old / "checkpoints" / "last.ckpt").is_file():
            state, path = "resume", run_dir / "checkpoints" / "last.ckpt"
            names = ("metrics.csv", "checkpoints/last.ckpt")
        if state != "new" and old != run_dir:
            for name in names:
                if (old / name).is_file():
                    _copy(old / name, run_dir / name)
            log.info("job %s: %s %s", key, {"finished": "finished in", "resume": "resumes"}[state], old)
    if wandb_id is None:
        wandb_id = f"{key[:12]}-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:6]}"
    if state == "resume":  # run_dir now holds the job's checkpoint: the index may point at it
        record(key, run_dir, index_dir, wandb_id)
    return state, path, wandb_id
