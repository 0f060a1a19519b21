"""A non-editable install works from any directory.

The project is built into a wheel from a clean copy of its sources (so nothing lands in the
checkout) and installed with pip into a temporary directory; every check then runs from an empty
directory with only that install on ``PYTHONPATH``, so the installed copy, not ``src/``, is imported
and Hydra finds its configs inside the installed package (``metaplast/conf``), not in a checkout.
Nothing is downloaded: ``--no-deps --no-build-isolation --no-index`` (torch & co. come from the
running environment).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.resources import files
from pathlib import Path

import pytest

from conftest import CONF, TINY

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_CONF = ROOT / "src" / "metaplast" / "conf"
#: pyproject.toml's [project.scripts]: command -> entry point.
SCRIPTS = {
    "metaplast-train": "metaplast.run.train:main",
    "metaplast-evaluate": "metaplast.run.evaluate:main",
    "metaplast-report": "metaplast.analysis.report:main",
    "metaplast-sweep": "metaplast.analysis.sweep:main",
    "metaplast-bench": "metaplast.bench:main",
}


def yaml_files(directory: Path) -> dict[str, bytes]:
    """Relative path -> contents of every YAML file under ``directory`` (symlinks followed)."""
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*.yaml"))
        if "__pycache__" not in path.parts
    }


def pip(*args, cwd):
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"pip {' '.join(args)}\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel ``pip wheel .`` builds, from a copy of the sources without caches or build outputs."""
    pytest.importorskip("setuptools", minversion="77")  # the build backend, from this environment
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    shutil.copytree(ROOT / "src", source / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "LICENSE", "setup.cfg"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    offline = ("--no-deps", "--no-build-isolation", "--no-index", "-q")
    pip("wheel", *offline, "-w", str(root / "dist"), ".", cwd=source)
    (built,) = (root / "dist").glob("metaplast-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel) -> Path:
    """A non-editable ``pip install`` of the wheel into its own directory."""
    target = wheel.parent.parent / "site"
    offline = ("--no-deps", "--no-index", "--no-compile", "-q")
    pip("install", *offline, "--target", str(target), str(wheel), cwd=wheel.parent)
    assert (target / "metaplast" / "__init__.py").is_file()
    return target


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``python args`` from ``cwd`` with only the install at ``site`` on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore", "PYTHONNOUSERSITE": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


# --- the sources: one set of configs -----------------------------------------------------------


def test_top_level_conf_is_the_packaged_conf():
    """``conf/`` (what tests and users of a checkout read) and ``src/metaplast/conf`` are one directory."""
    assert CONF.resolve() == PACKAGE_CONF.resolve()
    assert Path(str(files("metaplast.conf"))).resolve() == PACKAGE_CONF.resolve()
    top, packaged = yaml_files(CONF), yaml_files(PACKAGE_CONF)
    assert "config.yaml" in top and "evaluate.yaml" in top
    assert set(top) - set(packaged) == set(), "in conf/ but not in the package"
    assert set(packaged) - set(top) == set(), "in the package but not in conf/"
    assert top == packaged


# --- the wheel ---------------------------------------------------------------------------------


def test_wheel_holds_every_config_and_the_console_scripts(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
        packaged = {
            name.removeprefix("metaplast/conf/"): archive.read(name)
            for name in names
            if name.startswith("metaplast/conf/") and name.endswith(".yaml")
        }
    source = yaml_files(PACKAGE_CONF)
    assert set(source) - set(packaged) == set(), "YAML files missing from the wheel"
    assert set(packaged) - set(source) == set(), "YAML files in the wheel that the sources lack"
    assert packaged == source
    for group in ("hydra/launcher", "hydra/sweeper", "experiment", "dataset", "rule", "meta", "logger"):
        assert any(name.startswith(group + "/") for name in packaged), group
    assert "metaplast/conf/__init__.py" in names
    assert not any(name.startswith(("tests/", "conf/", "src/")) for name in names)
    for command, target in SCRIPTS.items():
        assert f"{command} = {target}" in scripts


# --- the install, from an empty directory ------------------------------------------------------

#: Run by the installed copy: each console script's ``--help`` and every config group's options.
PROBE = r"""
import contextlib, io, json, sys
from importlib import metadata
from importlib.resources import files

import metaplast
dist = metadata.distribution("metaplast")
out = {"file": metaplast.__file__, "dist": str(dist.locate_file("")), "help": {}}
for ep in dist.entry_points.select(group="console_scripts"):
    sys.argv = [ep.name, "--help"]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            ep.load()()
            code = 0
        except SystemExit as exit:
            code = exit.code or 0
    out["help"][ep.name] = [ep.value, code, text.getvalue()]

from hydra import compose, initialize_config_module
from metaplast.run.config import register

register()
conf = files("metaplast.conf")
out["conf"] = str(conf)
composed = out["composed"] = []
with initialize_config_module("metaplast.conf", version_base="1.3"):
    groups = ("dataset", "model", "rule", "feedback", "reg", "meta", "logger", "trainer", "experiment")
    for group in (*groups, "eval_experiment"):
        for option in sorted(p.name[:-5] for p in conf.joinpath(group).iterdir() if p.name.endswith(".yaml")):
            online = group == "eval_experiment"  # presets of metaplast.evaluate
            plus = "+" if group.endswith("experiment") else ""
            compose("evaluate" if online else "config", overrides=[f"{plus}{group}={option}"])
            composed.append(f"{group}/{option}")
    for group in ("launcher", "sweeper", "help", "job_logging"):
        for option in sorted(p.name[:-5] for p in conf.joinpath("hydra", group).iterdir()):
            cfg = compose("config", overrides=[f"hydra/{group}={option}"], return_hydra_config=True)
            assert "_target_" in cfg.hydra[group] or group in ("help", "job_logging")
            composed.append(f"hydra/{group}/{option}")
print("PROBE" + json.dumps(out))
"""


def test_installed_console_scripts_and_configs(site, tmp_path):
    """Each console script's ``--help`` exits 0, and every config option composes, from an empty directory."""
    result = run_installed(site, tmp_path, "-c", PROBE)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    probe = json.loads(result.stdout.rpartition("PROBE")[2])

    assert Path(probe["file"]).resolve().is_relative_to(site.resolve()), probe["file"]
    assert Path(probe["dist"]).resolve() == site.resolve()
    assert Path(probe["conf"]).resolve().is_relative_to(site.resolve())

    assert {name: value for name, (value, _, _) in probe["help"].items()} == SCRIPTS
    for name, (_, code, text) in probe["help"].items():
        assert code == 0, f"{name} --help exited {code}\n{text}"
        assert text.strip(), f"{name} --help printed nothing"
    train_help = probe["help"]["metaplast-train"][2]
    assert "dataset: " in train_help and "glyphs" in train_help  # Hydra found the packaged groups

    expected = [
        path.removesuffix(".yaml")
        for path in yaml_files(PACKAGE_CONF)
        if "/" in path  # every option of every group; config.yaml and evaluate.yaml compose each time
    ]
    assert sorted(probe["composed"]) == sorted(expected)
    assert os.listdir(tmp_path) == []  # nothing written where it ran


def test_installed_training_run(site, tmp_path):
    """A tiny real run of the installed ``python -m metaplast.run.train``, from an empty directory."""
    assert os.environ.get("METAPLAST_DATA")  # conftest's glyph cache
    cwd, run_dir = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    result = run_installed(site, cwd, "-m", "metaplast.run.train", *TINY, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"

    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6  # meta.episodes=3 × meta.trials=2
    steps = [(int(row["episode"]), int(row["trial"])) for row in rows]
    assert steps == [(episode, trial) for episode in range(3) for trial in range(2)]
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "result.json").is_file()
    assert not (cwd / "outputs").exists()
