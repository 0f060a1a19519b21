import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir

from metaplast.run.config import register

CONF = Path(__file__).resolve().parents[1] / "conf"
#: A run small enough for a test: synthetic glyphs, a 3-way task, a 2-hidden-layer net, no W&B.
TINY = [
    "dataset=glyphs",
    "dataset.per_class=12",
    "model.hidden=[16,12]",
    "meta.episodes=3",
    "meta.trials=2",
    "meta.M=3",
    "meta.K=4",
    "meta.Q=3",
    "logger=csv",
    "trainer.accelerator=cpu",
    "trainer.progress_bar=false",
]


def fit(module, run_dir, episodes, callbacks=()):
    """Meta-train ``module`` for ``episodes`` on the CPU with no logger, checkpoint or bar."""
    trainer = L.Trainer(
        max_steps=episodes,
        max_epochs=-1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        default_root_dir=str(run_dir),
    )
    trainer.fit(module)
    return trainer


@pytest.fixture(scope="session", autouse=True)
def data_root(tmp_path_factory):
    """Every test reads and caches its data in one temporary directory; nothing is downloaded."""
    root = tmp_path_factory.mktemp("data")
    os.environ["METAPLAST_DATA"] = str(root)
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ.pop("WANDB_API_KEY", None)
    # One code version for every run of the session: a commit by someone else between two runs of one
    # test must not make a resume refuse (tests of the version itself set or unset it).
    os.environ["METAPLAST_CODE_VERSION"] = "0.0.0+tests"
    return root


@pytest.fixture(autouse=True)
def job_index(tmp_path_factory, monkeypatch):
    """Each test its own job index (``resume``): runs of other tests, or of the user, are not found."""
    index = tmp_path_factory.mktemp("jobs")
    monkeypatch.setenv("METAPLAST_JOBS", str(index))
    return index


@pytest.fixture
def make_cfg():
    """Compose the real Hydra config with ``TINY`` plus the given overrides."""
    register()

    def make(*overrides):
        with initialize_config_dir(str(CONF), version_base="1.3"):
            return compose("config", overrides=[*TINY, *overrides])

    return make


def run_cli(*args, cwd, module="metaplast.train", check=True):
    """Run ``python -m <module> args`` in a fresh interpreter, as a user would."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result
