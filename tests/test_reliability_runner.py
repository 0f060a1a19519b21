"""Reliability, round two (issue 14), the runner's side: every input of train, evaluate and bench
checked up front with a message naming the value and what is allowed; checkpoints checked against
the config; output directories checked and locked; no way of losing a run; one line, exit code 2,
at the command line.

Classes (the issue's): 1. values that used to end in a traceback, 2. values silently accepted,
3. checkpoints, 4. output paths, 5. lost runs (the four paths, and last.ckpt), 6. the W&B history of
a stopped run, 7. the command line. Data faults are in tests/test_reliability.py.
"""

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import CONF, TINY, run_cli
from metaplast import bench, safety
from metaplast.run import resume
from metaplast.run.cli import describe, traceback_wanted
from metaplast.run.config import ConfigError, register, validate
from metaplast.run.evaluate import run as evaluate
from metaplast.run.evaluate import theta_from_run, validate_evaluate
from metaplast.run.memory import device_memory, episode_estimate, kept_weight_sets, weight_count
from metaplast.run.tracking import EpisodeCSV
from metaplast.run.train import run
from metaplast.safety import CheckpointError, DirectoryLock, DivergenceError, OutputError, load_checkpoint
from wandb_file import offline_run_file, records

HUGE = 1e30  # θ of the e e^T term (ehebb): the weights overflow float32 within one episode


def compose_train(*overrides):
    register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=[*TINY, *overrides])


def compose_eval(*overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


#: A tiny online evaluation on the glyphs.
EVAL = [
    "dataset=glyphs",
    "dataset.per_class=12",
    "model.hidden=[16,12]",
    "online.trials=2",
    "online.samples=20",
    "online.every=10",
]


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --- 1. values that used to end in a traceback, and 2. values silently accepted (train) --------------

TRAIN_CASES = [
    # seeds: 32-bit
    ("seed=-1", "seed=-1 is not allowed; allowed: an integer in 0..4294967295"),
    ("seed=4294967296", "seed=4294967296 is not allowed; allowed: an integer in 0..4294967295"),
    ("seed=100000000000000000000", "seed=100000000000000000000 is not allowed"),
    ("dataset.seed=-3", "dataset.seed=-3 is not allowed; allowed: an integer in 0..4294967295"),
    # values that overflow float32, or int counts beyond a C int
    ("meta.lr=1e300", "meta.lr=1e+300 is not allowed; allowed: a finite number within float32's range"),
    ("rule.theta_init=1e300", "rule.theta_init=1e+300 is not allowed; allowed: a finite number within"),
    ("rule.theta0_init=-1e39", "rule.theta0_init=-1e+39 is not allowed; allowed: a finite number within"),
    ("reg.lam=1e200", "reg.lam=1e+200 is not allowed; allowed: a finite number within float32's range"),
    ("model.beta=1e300", "model.beta=1e+300 is not allowed; allowed: a finite number within"),
    ("meta.backtrack=nan", "meta.backtrack=nan is not allowed; allowed: a finite number"),
    ("objective.survive_threshold=inf", "objective.survive_threshold=inf is not allowed; allowed: a finite"),
    ("objective.survive_threshold=nan", "objective.survive_threshold=nan is not allowed"),
    ("meta.K=1000000000000000000000000000000", "meta.K=1000000000000000000000000000000 is not allowed"),
    ("meta.episodes=9999999999999", "meta.episodes=9999999999999 is not allowed; allowed: an integer in 1"),
    ("trainer.checkpoint_every=99999999999", "trainer.checkpoint_every=99999999999 is not allowed"),
    ("meta.first_trial=99999999999", "meta.first_trial=99999999999 is not allowed"),
    ("objective.max_terms=-1", "objective.max_terms=-1 is not allowed; allowed: null or an integer >= 0"),
    ("meta.truncate=0", "meta.truncate=0 is not allowed; allowed: null or an integer >= 1"),
    # rules
    ("rule.terms=null", "rule.terms=None is not allowed; allowed: a named rule"),
    ("rule.terms=[[0]]", "rule.terms=[[0]] is not allowed; allowed: a named rule or a flat list"),
    ("rule.terms=1.5", "rule.terms=1.5 is not allowed; allowed: a named rule"),
    ("rule.terms={a:1}", "rule.terms={'a': 1} is not allowed; allowed: a named rule"),
    # empty or missing paths and names
    ("ckpt_path=", "ckpt_path='' is not allowed; allowed: null (start afresh or auto-resume) or the path"),
    ("ckpt_path=' '", "ckpt_path=' ' is not allowed"),
    ("dataset.root=''", "dataset.root='' is not allowed"),
    ("dataset.name=cifar", "dataset.name='cifar' is not allowed; allowed: emnist, mnist, fashion_mnist, idx"),
    ("dataset.split=val", "dataset.split='val' is not allowed; allowed: test, train"),
    # the machine: accelerator, devices
    ("trainer.devices=0", "trainer.devices=0 is not allowed; allowed: 1 (a run's trials are batched"),
    ("trainer.devices=3", "trainer.devices=3 is not allowed; allowed: 1"),
    ("trainer.devices=-1", "trainer.devices=-1 is not allowed; allowed: 1"),
    ("trainer.accelerator=tpu", "trainer.accelerator='tpu' is not allowed; allowed: auto, cpu, gpu"),
    # W&B's own limits
    ("logger.project=a/b", "logger.project='a/b' is not allowed; allowed: 1 to 128 characters, none of"),
    ("logger.project='x#y'", "logger.project='x#y' is not allowed"),
    ("logger.project=''", "logger.project='' is not allowed"),
    (f"logger.project={'p' * 129}", f"logger.project='{'p' * 129}' is not allowed"),
    ("logger.entity='me:you'", "logger.entity='me:you' is not allowed"),
    ("logger.tags=['']", "logger.tags=[''] is not allowed; allowed: tags of 1 to 64 characters each"),
    (f"logger.tags=[{'t' * 65}]", "is not allowed; allowed: tags of 1 to 64 characters each"),
    ("logger.group=''", "logger.group='' is not allowed; allowed: null or 1 to 128 characters"),
    (
        ("logger=wandb", "logger.mode=online"),
        "logger.mode='online' is not allowed; allowed: auto, offline or",
    ),
    # interpolations that do not resolve
    ("rule.terms=${foo}", "rule.terms: Interpolation key 'foo' not found; allowed: a value, or an interp"),
    ("meta.M=${meta.nothing}", "meta.M: Interpolation key 'meta.nothing' not found"),
    (
        "logger.name=${oc.env:METAPLAST_NO_SUCH_VARIABLE}",
        'logger.name: KeyError raised while resolving interpolation: "Environment variable',
    ),
    # ranges
    ("feedback.decay=-0.5", "feedback.decay=-0.5 is not allowed; allowed: a number in [0, 1]"),
    ("feedback.decay=2", "feedback.decay=2.0 is not allowed; allowed: a number in [0, 1]"),
    ("model.init_std=-1", "model.init_std=-1.0 is not allowed; allowed: null or a standard deviation > 0"),
    ("model.init_std=nan", "model.init_std=nan is not allowed; allowed: a finite number"),
    ("feedback.lr=0", "feedback.lr=0.0 is not allowed; allowed: a positive learning rate or null"),
    ("model.init_lam=-1", "model.init_lam=-1.0 is not allowed; allowed: a non-negative number"),
    ("model.learn_init=[0,0]", "model.learn_init=[0, 0] is not allowed; allowed: null or distinct layer"),
    ("rule.term_scale={0:1e300}", "rule.term_scale.0=1e+300 is not allowed; allowed: a finite number within"),
    ("objective.last=0", "objective.last=0 is not allowed; allowed: an integer >= 1"),
    # allocations that cannot fit, naming the sizes
    ("meta.trials=100000000", "an episode needs at least"),
    ("model.hidden=[1000000000]", "weights of the 1-1000000000-1 network"),
    ("model.hidden=[100000,100000]", "but this machine has"),
    ("dataset.per_class=1000000000", "dataset.per_class=1000000000 needs at least"),
]


@pytest.mark.parametrize("override, message", TRAIN_CASES, ids=[str(c[0])[:40] for c in TRAIN_CASES])
def test_each_bad_train_value_is_refused_by_name(make_cfg, override, message):
    with pytest.raises(ConfigError) as caught:
        validate(make_cfg(*([override] if isinstance(override, str) else override)))
    assert message in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_memory_estimate_counts_what_an_episode_keeps():
    sizes = [784, 170, 130, 100, 70, 47]
    assert weight_count(sizes) == 784 * 170 + 170 * 130 + 130 * 100 + 100 * 70 + 70 * 47
    assert kept_weight_sets(250, "autograd", 16) == 251
    assert kept_weight_sets(250, "auto", 16) == 16 + 1  # ceil(250/16) segment starts + the adapted W
    assert kept_weight_sets(250, "auto", 0) == 251
    estimate = episode_estimate(sizes, 20, 250, 50, "auto", 16)
    assert estimate.bytes == 20 * ((17 + 1) * weight_count(sizes) + 300 * 784) * 4
    assert estimate.bytes < 2**30 < device_memory("cpu")  # the paper's run fits (well) in any machine
    assert "20 trial(s)" in estimate.detail and "784-170-130-100-70-47" in estimate.detail


def test_the_paper_presets_pass_the_checks():
    for overrides in ([], ["+experiment=fig4"], ["meta=table1", "model=table1"], ["rule=pool", "reg=l1"]):
        register()
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        validate(cfg)


# --- 2. evaluate validates its whole config -----------------------------------------------------------

EVAL_CASES = [
    ("theta={0:nan}", "theta.0=nan is not allowed; allowed: a finite number"),
    ("theta={0:inf}", "theta.0=inf is not allowed"),
    ("theta={0:-inf}", "theta.0=-inf is not allowed"),
    ("theta={0:1e300}", "theta.0=1e+300 is not allowed; allowed: a finite number within float32's range"),
    ("theta={0:abc}", "theta.0='abc' is not allowed; allowed: a finite number"),
    ("theta={a:0.1}", "theta has the key 'a'; allowed: term ids 0.."),
    ("theta={12:0.1}", "term ids [12]"),
    ("theta=[0.1]", "theta=[0.1] is not allowed; allowed: a mapping term id -> θ"),
    ("model.beta=nan", "model.beta=nan is not allowed; allowed: a finite number"),
    ("model.beta=-1", "model.beta=-1.0 is not allowed; allowed: a positive number"),
    ("model.beta=0", "model.beta=0.0 is not allowed; allowed: a positive number"),
    ("model.hidden=[0]", "model.hidden=[0] is not allowed"),
    ("rule.theta_init=nan", "rule.theta_init=nan is not allowed"),
    ("rule.terms=null", "rule.terms=None is not allowed"),
    ("rule.share=layer", "rule.share='layer' is not allowed here; allowed: all"),
    ("online.test_per_class=-1", "online.test_per_class=-1 is not allowed; allowed: null or an integer >= 1"),
    ("online.test_per_class=0", "online.test_per_class=0 is not allowed"),
    ("online.trials=0", "online.trials=0 is not allowed; allowed: an integer >= 1"),
    ("online.every=-5", "online.every=-5 is not allowed"),
    ("online.samples=0", "online.samples=0 is not allowed; allowed: null or an integer >= 1"),
    ("online.stream_split=val", "online.stream_split='val' is not allowed; allowed: test, train"),
    ("online.trials=100000000", "online evaluation needs at least"),
    ("+online.foo=1", "online.foo is not a known key; allowed keys here: trials, samples, every"),
    ("+bogus=1", "bogus is not a known key"),
    ("seed=-1", "seed=-1 is not allowed"),
    ("feedback=plastic", "feedback.kind='plastic' is not allowed here"),
    ("feedback.learn=true", "feedback.learn=True is not allowed here"),
    ("model.learn_init=[0]", "model.learn_init=[0] is not allowed here"),
    ("from_trial=0", "from_trial=0 is not allowed without from_run"),
    ("from_run=''", "from_run='' is not allowed"),
    ("from_run=/nonexistent/run", "from_run='/nonexistent/run' is not a directory"),
    ("dataset.per_class=0", "dataset.per_class=0 is not allowed"),
    ("feedback.decay=nan", "feedback.decay=nan is not allowed"),
    ("rule.terms=${nothing}", "rule.terms: Interpolation key 'nothing' not found"),
]


@pytest.mark.parametrize("override, message", EVAL_CASES, ids=[c[0][:40] for c in EVAL_CASES])
def test_each_bad_evaluate_value_is_refused_by_name(tmp_path, override, message):
    cfg = compose_eval(*EVAL, override)
    with pytest.raises(ConfigError) as caught:
        validate_evaluate(cfg)
        evaluate(cfg, tmp_path / "out")
    assert message in str(caught.value), str(caught.value)
    assert not (tmp_path / "out" / "online.csv").exists()


class NaNAfter:
    """core.inner_loop.adapt, but trial ``trial``'s weights become NaN after ``samples`` samples."""

    def __init__(self, adapt, trial, samples):
        self.adapt, self.trial, self.samples, self.seen = adapt, trial, samples, 0

    def __call__(self, learner, state, meta, x, y, *args):
        state = self.adapt(learner, state, meta, x, y, *args)
        self.seen += x.shape[1]
        if self.seen >= self.samples:
            state.weights[0][self.trial] = float("nan")
        return state


def test_a_network_that_diverges_online_is_flagged_not_scored(tmp_path, monkeypatch):
    import metaplast.run.evaluate as module

    monkeypatch.setattr(module, "adapt", NaNAfter(module.adapt, trial=1, samples=20))
    table = evaluate(compose_eval(*EVAL, "online.trials=3", "online.samples=40", "theta={0:0.01}"), tmp_path)
    rows = read_csv(tmp_path / "online.csv")
    assert len(table) == len(rows) == 3 * 5
    for row in rows:
        flagged = row["trial"] == "1" and int(row["sample"]) >= 20
        assert row["diverged"] == str(int(flagged))
        if flagged:  # no result, not a chance-level "accuracy"
            assert row["acc"] == row["loss"] == row["angle_0"] == row["orth_1"] == ""
        else:
            assert math.isfinite(float(row["acc"])) and math.isfinite(float(row["loss"]))


def test_an_online_evaluation_where_every_network_diverges_stops_with_exit_3(tmp_path):
    cfg = compose_eval(*EVAL, "rule=ehebb", f"theta={{2:{HUGE}}}", "online.samples=60")
    with pytest.raises(
        DivergenceError, match=r"every trial diverged during online evaluation .* at sample \d+"
    ):
        evaluate(cfg, tmp_path)
    rows = read_csv(tmp_path / "online.csv")
    assert rows and rows[-1]["diverged"] == "1"
    assert all(row["acc"] == "" for row in rows if row["diverged"] == "1")
    assert int(rows[-1]["sample"]) < 60  # stopped early: nothing left to score


# --- 3. checkpoints: structure and compatibility with the config ------------------------------------

BASE = ["rule=bio", "meta.episodes=2", "trainer.checkpoint_every=1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-episode run of bio (checkpoints at episodes 1 and 2)."""
    run_dir = tmp_path_factory.mktemp("finished")
    run(compose_train(*BASE), run_dir)
    return run_dir


def damaged(path: Path, how: str, tmp_path: Path) -> Path:
    """A copy of the checkpoint ``path`` damaged in one way."""
    target = tmp_path / f"{how}.ckpt"
    ckpt = load_checkpoint(path)
    if how == "empty":
        target.write_bytes(b"")
        return target
    if how == "garbage":
        target.write_bytes(b"not a checkpoint at all" * 10)
        return target
    if how == "half":
        target.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return target
    if how == "directory":
        target.mkdir()
        return target
    if how == "tensor":
        torch.save(torch.ones(3), target)
        return target
    if how == "list":
        torch.save([1, 2, 3], target)
        return target
    if how.startswith("without_"):
        del ckpt[how.removeprefix("without_")]
    elif how == "nan_theta":
        ckpt["state_dict"]["meta.theta"][0, 0] = float("nan")
    elif how == "inf_anchor":
        ckpt["metaplast_backtrack"]["anchor"][0][1, 0] = float("inf")
    elif how == "theta_shape":
        ckpt["state_dict"]["meta.theta"] = torch.zeros(2, 5)
    elif how == "extra_key":
        ckpt["state_dict"]["meta.other"] = torch.zeros(1)
    elif how == "past_the_end":
        ckpt["global_step"] = 40
    elif how == "one_stream":
        ckpt["metaplast_streams"]["tasks"] = ckpt["metaplast_streams"]["tasks"][:1]
    elif how == "adam_shape":
        ckpt["optimizer_states"][0]["state"][0]["exp_avg"] = torch.zeros(7)
    elif how == "two_optimizers":
        ckpt["optimizer_states"] = ckpt["optimizer_states"] * 2
    elif how == "step_is_text":
        ckpt["global_step"] = "2"
    torch.save(ckpt, target)
    return target


CHECKPOINT_CASES = [
    ("empty", "is empty (0 bytes)"),
    ("garbage", "is truncated or corrupt (not a torch.save archive"),
    ("half", "is truncated or corrupt"),
    ("directory", "is a directory; allowed: a checkpoint file"),
    ("tensor", "holds a Tensor, not a checkpoint"),
    ("list", "holds a list, not a checkpoint"),
    ("without_state_dict", "state_dict is missing"),
    ("without_optimizer_states", "optimizer_states is missing"),
    ("without_metaplast_streams", "metaplast_streams is missing"),
    ("without_loops", "loops is missing"),
    ("step_is_text", "global_step is str"),
    ("nan_theta", "meta.theta hold NaN or infinite values; allowed: finite meta-parameters"),
    ("inf_anchor", "backtrack.anchor.0 hold NaN or infinite values"),
    ("theta_shape", "meta.theta has shape (2, 5), this run's (2, 3)"),
    ("extra_key", "its state_dict lacks [] and has ['meta.other']"),
    ("past_the_end", "it is at episode 40, past meta.episodes=4; allowed: meta.episodes >= 40"),
    ("one_stream", "its random streams (tasks) are not one per trial"),
    ("adam_shape", "its Adam exp_avg of parameter 0 has shape (7,)"),
    ("two_optimizers", "it holds 2 optimizer states; allowed: one (Adam's)"),
]


@pytest.mark.parametrize("how, message", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_a_damaged_checkpoint_is_refused_naming_the_problem(finished, tmp_path, how, message):
    bad = damaged(finished / "checkpoints" / "last.ckpt", how, tmp_path)
    run_dir = tmp_path / "run"
    with pytest.raises(CheckpointError) as caught:
        run(compose_train("rule=bio", "meta.episodes=4", f"ckpt_path={bad}"), run_dir)
    assert message in str(caught.value), str(caught.value)
    assert str(bad) in str(caught.value)
    assert not (run_dir / "metrics.csv").exists()


MISMATCH_CASES = [
    ("meta.trials=3", "it was made with meta.trials=2, this run has meta.trials=3"),
    ("meta.K=3", "it was made with meta.K=4, this run has meta.K=3"),
    ("meta.M=2", "it was made with meta.M=3, this run has meta.M=2"),
    ("meta.Q=2", "it was made with meta.Q=3, this run has meta.Q=2"),
    ("meta.first_trial=1", "it was made with meta.first_trial=0, this run has meta.first_trial=1"),
    ("seed=5", "it was made with seed=0, this run has seed=5"),
    ("rule=ehebb", "it was made with the rule bio (terms per layer"),
    ("rule=custom rule.terms=[0,2,3]", "it was made with the rule bio"),
    ("model.hidden=[16,11]", "its network has hidden widths [16, 12], this run's [16, 11]"),
    ("model.hidden=[16]", "its network has hidden widths [16, 12], this run's [16]"),
    ("feedback=bp", "it was made with feedback.kind='fa', this run has feedback.kind='bp'"),
    ("dataset.per_class=11", "it was made with dataset.per_class=12"),
    ("model.activation=relu", "it was made with model.activation='softplus'"),
    ("trainer.precision=64-true", "it was made with trainer.precision='32-true'"),
    ("meta.sampling=authors", "it was made with meta.sampling='fresh'"),
]


@pytest.mark.parametrize("override, message", MISMATCH_CASES, ids=[c[0] for c in MISMATCH_CASES])
def test_a_checkpoint_of_another_config_is_refused_naming_the_difference(
    finished, tmp_path, override, message
):
    ckpt = finished / "checkpoints" / "last.ckpt"
    cfg = compose_train(*BASE[:1], "meta.episodes=4", *override.split(), f"ckpt_path={ckpt}")
    with pytest.raises(CheckpointError) as caught:
        run(cfg, tmp_path / "run")
    assert message in str(caught.value), str(caught.value)


def test_a_checkpoint_of_the_same_config_resumes_with_other_lr_and_episodes(finished, tmp_path):
    ckpt = finished / "checkpoints" / "episode-1.ckpt"
    run(compose_train(*BASE[:1], "meta.episodes=3", "meta.lr=0.01", f"ckpt_path={ckpt}"), tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 3


@pytest.mark.parametrize(
    "how, message",
    [
        ("empty", "is empty"),
        ("garbage", "is truncated or corrupt"),
        ("tensor", "holds a Tensor"),
        ("without_state_dict", "holds no state_dict"),
        ("nan_theta", "its final Θ holds non-finite values"),
    ],
)
def test_evaluate_from_a_run_with_a_bad_last_checkpoint_is_refused(finished, tmp_path, how, message):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "result.json").unlink()
    bad = damaged(finished / "checkpoints" / "last.ckpt", how, tmp_path)
    shutil.copy(bad, run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        theta_from_run(run_dir)
    assert f"from_run={str(run_dir)!r}" in str(caught.value)


# --- 4. output paths ------------------------------------------------------------------------------


def _a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return tmp_path / "file"


OUTPUT_CASES = [
    (lambda t: _a_file(t), "is a file; allowed: a writable directory"),
    (lambda t: _a_file(t) / "sub", "is a file; allowed: a writable directory"),
    (lambda t: Path("/proc/metaplast-no-such/dir"), "cannot be written"),
    (lambda t: Path("/sys/kernel/metaplast"), "cannot be written"),
    (lambda t: Path("/dev/null/run"), "is a file; allowed: a writable directory"),
]


@pytest.mark.parametrize("where, message", OUTPUT_CASES)
def test_an_unusable_output_directory_is_refused(tmp_path, where, message):
    path = where(tmp_path)
    with pytest.raises(OutputError, match=re.escape(message)):
        safety.check_output_dir(path, "hydra.run.dir")
    with pytest.raises(OutputError, match=re.escape(message)):
        run(compose_train(), path)


def test_a_read_only_directory_is_refused(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(safety.tempfile, "mkstemp", read_only)
    with pytest.raises(OutputError, match="cannot be written \\(Permission denied\\); allowed: a writable"):
        safety.check_output_dir(tmp_path / "out", "hydra.run.dir")


HOLD = """
import sys, time
from metaplast.safety import DirectoryLock
lock = DirectoryLock(sys.argv[1]); lock.acquire(); print("locked", flush=True); time.sleep(600)
"""


@pytest.fixture
def held(tmp_path):
    """A directory locked by another process (killed at the end)."""
    directory = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    yield directory, holder
    holder.kill()
    holder.wait()


def test_a_directory_in_use_is_refused_and_freed_when_its_holder_dies(held, make_cfg):
    directory, holder = held
    with pytest.raises(OutputError, match=rf"is in use by another run \(pid {holder.pid}\)"):
        run(make_cfg(), directory)
    with pytest.raises(OutputError, match="in use"):
        evaluate(compose_eval(*EVAL), directory)
    assert DirectoryLock.in_use(directory)
    holder.send_signal(signal.SIGKILL)  # however it ends, the lock goes with it
    holder.wait()
    assert not DirectoryLock.in_use(directory)
    with DirectoryLock(directory), DirectoryLock(directory):  # re-entrant within a process
        assert not DirectoryLock.in_use(directory)


def test_a_job_still_running_elsewhere_is_not_taken_over(held, tmp_path):
    directory, _ = held
    index = tmp_path / "index"
    resume.record("k", directory, index, "id")
    with pytest.raises(OutputError, match=r"job k is running in .*busy \(its directory is locked\)"):
        resume.claim("k", tmp_path / "new", index)


# --- 5. no lost runs --------------------------------------------------------------------------------


def test_the_index_points_at_a_directory_only_once_it_holds_a_checkpoint(finished, tmp_path):
    index = tmp_path / "index"
    # a new job: nothing is written until its first checkpoint
    state, path, _ = resume.claim("job", tmp_path / "a", index)
    assert (state, path) == ("new", None) and not (index / "job.json").exists()
    shutil.copytree(finished / "checkpoints", tmp_path / "a" / "checkpoints")
    shutil.copy(finished / "metrics.csv", tmp_path / "a" / "metrics.csv")
    resume.record("job", tmp_path / "a", index, "wandb-1")
    # a rerun in b takes over a's checkpoint (copied first), then the index points at b ...
    state, path, wandb_id = resume.claim("job", tmp_path / "b", index)
    assert (state, wandb_id) == ("resume", "wandb-1")
    assert path == (tmp_path / "b" / "checkpoints" / "last.ckpt").resolve() and path.is_file()
    assert json.loads((index / "job.json").read_text())["run_dir"] == str((tmp_path / "b").resolve())
    # ... and b is killed before its first checkpoint of its own (or fails): c still resumes
    state, path, _ = resume.claim("job", tmp_path / "c", index)
    assert state == "resume" and load_checkpoint(path)["global_step"] == 2
    assert (tmp_path / "c" / "metrics.csv").read_bytes() == (finished / "metrics.csv").read_bytes()


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is damaged"),
        ("{", "is damaged"),
        ("[1, 2]", "not an object with a run_dir"),
        ('{"x": 1}', "run_dir"),
        ('{"run_dir": ""}', "run_dir"),
        ('{"run_dir": "/x", "wandb_id": 3}', "wandb_id is not a string"),
        ("\xff\xfe", "is damaged"),
    ],
)
def test_a_damaged_index_entry_is_refused_naming_it(tmp_path, content, message):
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "job.json").write_text(content)
    with pytest.raises(OutputError, match=re.escape(message)) as caught:
        resume.claim("job", tmp_path / "run", tmp_path / "index")
    assert "job.json" in str(caught.value) and "delete it to run the job afresh" in str(caught.value)


@pytest.mark.parametrize("content", ["", "{not json", '{"terms": [0]}', "[]"])
def test_a_damaged_result_json_is_not_taken_as_finished(finished, tmp_path, content):
    old = tmp_path / "old"
    shutil.copytree(finished, old)
    (old / "result.json").write_text(content)
    resume.record("job", old, tmp_path / "index", None)
    state, path, _ = resume.claim("job", tmp_path / "new", tmp_path / "index")
    assert state == "resume"  # its last.ckpt is the final state: the rerun rewrites result.json
    assert load_checkpoint(path)["global_step"] == 2


@pytest.mark.parametrize("devices", [0, 2, 3, -1])
def test_more_than_one_device_is_refused(make_cfg, devices):
    with pytest.raises(ConfigError, match=rf"trainer.devices={devices} is not allowed; allowed: 1 "):
        validate(make_cfg(f"trainer.devices={devices}"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A 4-episode run of bio straight through, and a 2-episode one to resume from."""
    base = tmp_path_factory.mktemp("straight")
    run(compose_train("rule=bio", "meta.episodes=4", "trainer.checkpoint_every=2"), base / "four")
    run(compose_train("rule=bio", "meta.episodes=2", "trainer.checkpoint_every=2"), base / "two")
    return base


def _rename_header(text):
    return text.replace("meta_acc", "accuracy", 1)


DAMAGE = {
    "renamed header": _rename_header,
    "dropped row": lambda text: "\r\n".join(text.splitlines()[:2] + text.splitlines()[3:]) + "\r\n",
    "edited value": lambda text: text.replace(text.splitlines()[1].split(",")[3], "0.123", 1),
    "half a line": lambda text: text[: len(text) - 20],
    "empty": lambda text: "",
    "garbage rows": lambda text: text + "x,y,z\r\n1,2\r\n",
    "binary junk": lambda text: "\x00\xff\x00" * 10,
    "deleted": None,
    "later rows": lambda text: text + text.splitlines()[-1].replace("1,", "7,", 1) + "\r\n",
    "lf line ends": lambda text: text.replace("\r\n", "\n"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_metrics_csv_is_rebuilt_from_the_checkpoint_on_resume(straight, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(straight / "two", run_dir)
    (run_dir / "result.json").unlink()
    table = run_dir / "metrics.csv"
    if DAMAGE[damage] is None:
        table.unlink()
    else:
        with open(table, newline="") as handle:
            text = handle.read()
        with open(table, "w", newline="") as handle:
            handle.write(DAMAGE[damage](text))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    run(
        compose_train("rule=bio", "meta.episodes=4", "trainer.checkpoint_every=2", f"ckpt_path={ckpt}"),
        run_dir,
    )
    assert table.read_bytes() == (straight / "four" / "metrics.csv").read_bytes()
    assert json.loads((run_dir / "result.json").read_text()) == json.loads(
        (straight / "four" / "result.json").read_text()
    )


def test_the_table_renders_exactly_what_it_wrote(straight):
    saved = load_checkpoint(straight / "four" / "checkpoints" / "last.ckpt")["metaplast_metrics"]
    table = EpisodeCSV(None)
    table.restore(saved, 4)
    assert table.render().encode() == (straight / "four" / "metrics.csv").read_bytes()
    assert saved["rows"].shape[0] == 4 * 2  # episodes x trials, all of them


def test_a_resumed_table_that_logs_new_columns_widens_instead_of_failing(tmp_path):
    """A checkpoint of an older version holds fewer columns (metaplast once failed there with
    torch's 'expected sequence of length 26 at dim 1 (got 36)'): the table gains the new columns,
    earlier rows read NaN there, the file is rewritten with the new header, and the checkpoint's
    record stays rectangular."""
    old = EpisodeCSV(None)
    for episode in range(2):
        old.append(
            episode,
            [0, 1],
            {"meta/diverged": torch.tensor([0.0, 1.0]), "meta/loss": torch.tensor([1.5, 2.5])},
        )
    path = tmp_path / "metrics.csv"
    table = EpisodeCSV(path)
    table.restore(old.state_dict(), 2)
    record = {
        "meta/diverged": torch.tensor([0.0, 0.0]),
        "meta/loss": torch.tensor([0.5, 0.25]),
        "cos/0": torch.tensor([0.75, -0.5]),
    }
    table.append(2, [0, 1], record)
    table.append(3, [0, 1], record)
    lines = path.read_text().splitlines()
    assert lines[0] == "episode,trial,meta_diverged,meta_loss,cos_0"
    assert lines[1:] == [
        "0,0,0,1.5,nan",
        "0,1,1,nan,nan",
        "1,0,0,1.5,nan",
        "1,1,1,nan,nan",
        "2,0,0,0.5,0.75",
        "2,1,0,0.25,-0.5",
        "3,0,0,0.5,0.75",
        "3,1,0,0.25,-0.5",
    ]
    assert table.state_dict()["rows"].shape == (8, 5)
    assert table.render().encode() == path.read_bytes()


@pytest.mark.parametrize("episodes, every", [(5, 3), (3, 2), (2, 5), (4, 2), (1, 50)])
def test_last_ckpt_is_the_final_state_whatever_checkpoint_every(make_cfg, tmp_path, episodes, every):
    run(make_cfg("rule=bio", f"meta.episodes={episodes}", f"trainer.checkpoint_every={every}"), tmp_path)
    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == episodes
    result = json.loads((tmp_path / "result.json").read_text())
    final = last["state_dict"]["meta.theta"].double()
    assert final.flatten().tolist() == pytest.approx(
        torch.tensor(result["theta"]).flatten().tolist(), rel=1e-7
    )
    periodic = sorted(int(p.stem.split("-")[1]) for p in (tmp_path / "checkpoints").glob("episode-*.ckpt"))
    assert periodic == list(range(every, episodes + 1, every))
    _, values = theta_from_run(tmp_path)  # evaluate from_run: the Θ of result.json
    assert [values[r] for r in result["terms"]] == pytest.approx(
        list(result["theta_mean"].values()), rel=1e-6
    )


# --- 6. the W&B history of a run stopped by divergence ----------------------------------------------


def history(path) -> list[dict]:
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            )
    return rows


def test_the_wandb_history_holds_the_episode_that_stopped_the_run(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_train(
        "logger=wandb", "logger.mode=offline", "rule=ehebb", "meta.max_diverged=2", f"rule.theta_init={HUGE}"
    )
    with pytest.raises(DivergenceError, match="the last being episode 1"):
        run(cfg, run_dir)
    steps = history(offline_run_file(run_dir))
    episodes = [json.loads(row["episode"]) for row in steps if "meta/diverged" in row]
    assert episodes == [0, 1]  # the episode that stopped the run is there
    assert all(json.loads(row["meta/diverged"]) == 1.0 for row in steps if "meta/diverged" in row)


# --- 7. the command line: one line, exit code 2, no traceback ----------------------------------------


CLI_CASES = [
    ("metaplast.train", ["seed=-1"], "seed=-1 is not allowed"),
    ("metaplast.train", ["meta.M=five"], "meta.M: Value 'five' of type 'str' could not be converted"),
    ("metaplast.train", ["hydra.run.dir=/dev/null/run"], "cannot use '/dev/null/run'"),
    ("metaplast.evaluate", [*EVAL, "theta={0:nan}"], "theta.0=nan is not allowed"),
    ("metaplast.bench", ["--trials", "0"], "--trials 0 is not allowed"),
]


@pytest.mark.parametrize("module, args, message", CLI_CASES, ids=[f"{c[0]}:{c[1][-1]}" for c in CLI_CASES])
def test_the_command_line_prints_one_line_and_exits_2(tmp_path, module, args, message):
    if module != "metaplast.bench" and not any(a.startswith("hydra.run.dir") for a in args):
        args = [*args, f"hydra.run.dir={tmp_path / 'out'}"]
    if module == "metaplast.train":
        args = [*TINY, *args]
    result = run_cli(*args, cwd=tmp_path, module=module, check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("metaplast: error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_verbose_shows_the_traceback(tmp_path):
    result = run_cli(*TINY, "seed=-1", "verbose=true", f"hydra.run.dir={tmp_path}", cwd=tmp_path, check=False)
    assert (
        result.returncode != 0 and "Traceback" in result.stderr and "seed=-1 is not allowed" in result.stderr
    )


@pytest.mark.parametrize(
    "argv, wanted",
    [
        ([], False),
        (["verbose=true"], True),
        (["+verbose=True"], True),
        (["verbose=false"], False),
        (["meta.verbose=true"], False),
    ],
)
def test_traceback_wanted_only_when_asked(argv, wanted, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    assert traceback_wanted(argv=argv) is wanted
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    assert traceback_wanted(argv=argv) is True


@pytest.mark.parametrize(
    "error, line",
    [
        (ConfigError("seed=-1 is not allowed; allowed: x"), "seed=-1 is not allowed; allowed: x"),
        (PermissionError(13, "Permission denied", "/ro/run"), "cannot use '/ro/run': Permission denied"),
        (OSError(28, "No space left on device", "/full/metrics.csv"), "No space left on device"),
        (KeyError("state_dict"), "KeyError: 'state_dict' (HYDRA_FULL_ERROR=1 or verbose=true shows where)"),
        (RuntimeError("a\nb\nc"), "RuntimeError: a (HYDRA_FULL_ERROR=1"),
    ],
)
def test_describe_is_one_line_naming_the_problem(error, line):
    text = describe(error)
    assert line in text and "\n" not in text


BENCH_CASES = [
    (["--sizes", "5"], "--sizes 5 is not allowed; allowed: two or more widths >= 1"),
    (["--sizes", "784", "0", "10"], "--sizes 784 0 10 is not allowed"),
    (["--trials", "0"], "--trials 0 is not allowed; allowed: integers >= 1"),
    (["--recompute", "-1"], "--recompute -1 is not allowed; allowed: integers >= 0"),
    (["--steps", "0"], "--steps 0 is not allowed; allowed: an integer >= 1"),
    (["--query", "0"], "--query 0 is not allowed"),
    (["--threads", "0"], "--threads 0 is not allowed"),
    (["--baseline-trials", "0"], "--baseline-trials 0 is not allowed"),
    (["--repeats", "0"], "--repeats 0 is not allowed; allowed: an integer >= 1"),
    (["--tolerance", "nan"], "--tolerance nan is not allowed; allowed: a finite number >= 0"),
    (["--tolerance", "-1"], "--tolerance -1.0 is not allowed"),
    (["--rule", "hebb"], "--rule 'hebb': rule 'hebb' is unknown"),
    (["--device", "foo"], "--device 'foo' is not a device; allowed: cpu, cuda, cuda:<index>"),
    (["--device", "meta"], "--device 'meta' is not allowed"),
    (["--json", "/proc/metaplast/x.json"], "is not a writable directory"),
    (["--trials", "100000000"], "a benchmark episode needs at least"),
    (["--sizes", "784", "100000000", "10"], "784-100000000-10 network"),
    (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
]


@pytest.mark.parametrize("argv, message", BENCH_CASES, ids=[" ".join(c[0])[:30] for c in BENCH_CASES])
def test_each_bad_bench_argument_is_one_line_with_exit_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as caught:
        bench.parse_args([*argv, "--no-memory"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("metaplast: error: ") and message in err, err


def test_bench_json_into_a_directory_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--json", str(tmp_path)])
    assert "is a directory" in capsys.readouterr().err


def test_glyph_cache_files_are_readable_by_others(tmp_path):
    from metaplast.data import load_glyphs
    from metaplast.data.glyphs import glyphs_cache_path

    old = os.umask(0o077)  # even a strict umask: the cache is shared data
    try:
        load_glyphs(tmp_path, per_class=1, seed=3)
    finally:
        os.umask(old)
    assert oct(glyphs_cache_path(tmp_path, 1, 3).stat().st_mode & 0o777) == "0o644"
