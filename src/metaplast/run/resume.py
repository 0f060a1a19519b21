"""Auto-resume of killed jobs: a job's identity, the index of its runs, its code version, its W&B group.

``resume`` (:func:`takes_over`): ``auto`` (the default) continues a killed job and skips a finished
one only in a sweep (``-m``) or a requeued cluster job (``SLURM_RESTART_COUNT`` > 0); a single run
always runs. ``true`` takes over an earlier run of the same job always, ``false`` never.

The index (:func:`index_dir`) is one per user, wherever a job is launched from:
``$METAPLAST_JOBS``, else ``$XDG_STATE_HOME/metaplast/jobs`` (``~/.local/state/metaplast/jobs``);
``jobs_dir=<dir>`` in the config chooses another. Its entries hold absolute run directories.

Every job records its code version (:func:`code_version`: the package version and, in a git
checkout, the commit) in its checkpoints, ``result.json`` and index entry; an earlier run made by
other code is not taken over without ``resume=true`` (:class:`VersionMismatch`).

No run is ever lost: the index entry of a job (``<index>/<key>.json``) points at a run directory
only once that directory holds a checkpoint
(:func:`record`, called when a checkpoint is complete on disk), and a run that takes over an
earlier one first copies that run's checkpoint and table into its own directory. A run killed
at any moment — before its first checkpoint, during a failed resume — leaves the index at the
last directory that holds the job's progress.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path

from omegaconf import OmegaConf

from metaplast.analysis.results import RESULT, write_json
from metaplast.safety import DirectoryLock, OutputError, write_bytes

log = logging.getLogger("metaplast")

#: Config keys that do not change Θ or the metrics: two runs differing only here are the same job.
NOT_IDENTITY = (
    "ckpt_path",
    "resume",
    "jobs_dir",
    "verbose",
    "objective",
    "trainer.progress_bar",
    "trainer.checkpoint_every",
)
#: What a finished result.json must hold to be taken as finished.
RESULT_KEYS = ("terms", "trials", "theta", "meta_acc", "objective")


#: ``resume``'s values: take over an earlier run automatically (sweeps, requeued jobs), always, never.
RESUME_MODES = ("auto", "true", "false")
#: Overrides the detected code version (e.g. in a container without the git checkout).
VERSION_ENV = "METAPLAST_CODE_VERSION"


class VersionMismatch(OutputError):
    """An earlier run of a job was made by other code: not skipped or continued without ``resume=true``."""


def resume_mode(value) -> str:
    """``resume`` as ``auto``, ``true`` or ``false`` (a bool or its spelling), else a ValueError."""
    text = str(value).strip().lower()
    if text not in RESUME_MODES:
        raise ValueError(f"resume={value!r} is not allowed; allowed: auto, true, false")
    return text


def requeued() -> bool:
    """Whether this is a cluster job started again by its scheduler (SLURM's ``SLURM_RESTART_COUNT``)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


def multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def takes_over(mode: str) -> bool:
    """Whether a job takes over (continues or skips) an earlier run of itself under ``resume=mode``."""
    return mode == "true" or (mode == "auto" and (multirun() or requeued()))


def index_dir(configured: str | None = None) -> Path:
    """The job index: ``jobs_dir`` when set, else ``$METAPLAST_JOBS``, else the user's state directory."""
    if configured:
        return Path(configured).expanduser().resolve()
    if os.environ.get("METAPLAST_JOBS"):
        return Path(os.environ["METAPLAST_JOBS"]).expanduser().resolve()
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state).expanduser().resolve() / "metaplast" / "jobs"


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[3]  # src/metaplast/run/resume.py -> the checkout
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def code_version() -> str:
    """This code's version: ``$METAPLAST_CODE_VERSION``, else the package version plus, in a git
    checkout, ``+g<commit>`` (e.g. ``0.1.0+g7c6b354a1b2c``)."""
    if os.environ.get(VERSION_ENV):
        return os.environ[VERSION_ENV]
    from metaplast import __version__

    commit = _git_commit()
    return f"{__version__}+g{commit}" if commit else __version__


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
        if data.get("code_version") is not None and not isinstance(data["code_version"], str):
            raise ValueError("code_version is not a string")
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


def record(
    key: str, run_dir: Path, index_dir: Path, wandb_id: str | None, version: str | None = None
) -> None:
    """Point job ``key``'s index entry at ``run_dir`` (call once it holds a checkpoint)."""
    entry = Path(index_dir) / f"{key}.json"
    current = read_entry(entry) if entry.exists() else None
    wanted = {"run_dir": str(Path(run_dir).resolve()), "wandb_id": wandb_id}
    if version is not None:
        wanted["code_version"] = version
    if current != wanted:
        write_json(entry, wanted)


def earlier_version(state: str, path: Path) -> str | None:
    """The code version an earlier run recorded: in its ``result.json`` (finished) or ``last.ckpt``."""
    if state == "finished":
        return (finished_result(path) or {}).get("code_version")
    from metaplast.safety import load_checkpoint

    return load_checkpoint(path).get(CHECKPOINT_VERSION)


#: The checkpoint entry holding the code version (:class:`metaplast.run.callbacks.RecordVersion`).
CHECKPOINT_VERSION = "metaplast_code_version"


def check_version(key: str, old: Path, state: str, found: str | None, version: str) -> None:
    """Refuse to take over an earlier run made by other code (:class:`VersionMismatch`)."""
    if found == version:
        return
    made = f"metaplast {found}" if found else "a metaplast that recorded no version"
    what = "skip it and reuse its results" if state == "finished" else "continue it"
    raise VersionMismatch(
        f"job {key} in {old} was made by {made}, this is metaplast {version}: refusing to {what} "
        "with other code; allowed: resume=true (take it over with this code) or resume=false (run the "
        f"job afresh; {old} is kept)"
    )


def claim(
    key: str, run_dir: Path, index_dir: Path, version: str | None = None, force: bool = False
) -> tuple[str, Path | None, str | None]:
    """Make ``run_dir`` the home of job ``key``, taking over an earlier run of the same job.

    Returns ``(state, path, wandb_id)``: ``("finished", result.json)`` when an earlier run
    finished (its results are copied into ``run_dir``), ``("resume", last.ckpt)`` when it left
    a checkpoint (its checkpoint and ``metrics.csv`` are copied into ``run_dir``, whose
    ``last.ckpt`` the run continues from; the index then points at ``run_dir``), else
    ``("new", None)``: the index is not touched until ``run_dir`` holds a checkpoint
    (:func:`record`). The W&B run id stays the same across resumptions. An earlier run still
    running (its directory is locked) is refused. Given this code's ``version``, an earlier run
    made by another is refused (:class:`VersionMismatch`, before anything is copied) unless
    ``force``.
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
        if state != "new" and version is not None and not force:
            source = old / (RESULT if state == "finished" else "checkpoints/last.ckpt")
            check_version(key, old, state, earlier_version(state, source), version)
        if state != "new" and old != run_dir:
            for name in names:
                if (old / name).is_file():
                    _copy(old / name, run_dir / name)
            log.debug("job %s: %s %s", key, {"finished": "finished in", "resume": "resumes"}[state], old)
    if wandb_id is None:
        wandb_id = f"{key[:12]}-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:6]}"
    if state == "resume":  # run_dir now holds the job's checkpoint: the index may point at it
        record(key, run_dir, index_dir, wandb_id, version)
    return state, path, wandb_id


def peek(key: str, index_dir: Path) -> tuple[str, Path, int | None] | None:
    """An earlier run of job ``key`` that a new run does not take over: ``("finished" or "stopped",
    its directory, the episodes its last checkpoint holds)``, or None. Reads only."""
    try:
        previous = read_entry(Path(index_dir) / f"{key}.json")
    except OutputError:
        return None
    if previous is None:
        return None
    old = Path(previous["run_dir"])
    if finished_result(old / RESULT) is not None:
        return "finished", old, None
    checkpoint = old / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        return None
    from metaplast.safety import CheckpointError, load_checkpoint

    try:
        return "stopped", old, int(load_checkpoint(checkpoint).get("global_step", 0))
    except (CheckpointError, TypeError, ValueError):
        return "stopped", old, None
