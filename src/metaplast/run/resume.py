"""Auto-resume of killed jobs: a job's identity, the index of its runs, its W&B group."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from metaplast.analysis.results import RESULT, write_json

log = logging.getLogger("metaplast")

#: Config keys that do not change Θ or the metrics: two runs differing only here are the same job.
NOT_IDENTITY = ("ckpt_path", "resume", "objective", "trainer.progress_bar", "trainer.checkpoint_every")


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


def claim(key: str, run_dir: Path, index_dir: Path) -> tuple[str, Path | None, str | None]:
    """Make ``run_dir`` the home of job ``key``, taking over an earlier run of the same job.

    Returns ``(state, path, wandb_id)``: ``("finished", result.json)`` when an earlier run
    finished (its results are copied into ``run_dir``), ``("resume", last.ckpt)`` when it left
    a checkpoint (its ``metrics.csv`` is copied; the run continues from the checkpoint), else
    ``("new", None)``. The W&B run id stays the same across resumptions.
    """
    run_dir, index_dir = Path(run_dir).resolve(), Path(index_dir)
    entry = index_dir / f"{key}.json"
    previous = json.loads(entry.read_text()) if entry.exists() else None
    state, path, wandb_id = "new", None, None
    if previous is not None:
        old = Path(previous["run_dir"])
        wandb_id = previous.get("wandb_id")
        if (old / RESULT).exists():
            state, path = "finished", run_dir / RESULT
            names = (RESULT, "metrics.csv", "checkpoints/last.ckpt")
        elif (old / "checkpoints" / "last.ckpt").exists():
            state, path = "resume", old / "checkpoints" / "last.ckpt"
            names = ("metrics.csv",)
        if state != "new" and old != run_dir:
            for name in names:
                if (old / name).exists():
                    (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(old / name, run_dir / name)
            log.info("job %s: %s %s", key, {"finished": "finished in", "resume": "resumes"}[state], old)
    if wandb_id is None:
        wandb_id = f"{key[:12]}-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:6]}"
    if state != "finished":
        index_dir.mkdir(parents=True, exist_ok=True)
        write_json(entry, {"run_dir": str(run_dir), "wandb_id": wandb_id})
    return state, path, wandb_id
