"""The runner as its users meet it (issue 13): resume=auto|true|false with the code version, the
console (start line, progress in episodes, end line, no third-party noise), W&B as its users expect
(read back from the offline run file), --help, and presets that need -m."""

import json
import logging
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY, run_cli
from metaplast import __version__
from metaplast.run import resume
from metaplast.run.callbacks import EpisodeProgress
from metaplast.run.config import ConfigError, validate
from metaplast.run.train import launch
from metaplast.safety import load_checkpoint
from wandb_file import offline_run_file, records, summary


def messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "metaplast")


def result_of(run_dir):
    return json.loads((Path(run_dir) / "result.json").read_text())


# --- 1. resume ---------------------------------------------------------------------------------------


def test_a_single_run_always_runs_sweeps_and_requeued_jobs_take_over(make_cfg, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="metaplast")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    cfg = make_cfg("rule=ehebb", "trainer.checkpoint_every=1")
    launch(cfg, tmp_path / "a")
    assert result_of(tmp_path / "a")["code_version"] == "0.0.0+tests"
    assert load_checkpoint(tmp_path / "a/checkpoints/last.ckpt")["metaplast_code_version"] == "0.0.0+tests"

    # A single run of a finished job runs again (not skipped), in full.
    caplog.clear()
    launch(cfg, tmp_path / "b")
    assert "skipped" not in messages(caplog)
    assert (tmp_path / "b/checkpoints/episode-3.ckpt").is_file()
    assert (tmp_path / "b/metrics.csv").read_text() == (tmp_path / "a/metrics.csv").read_text()

    # A requeued cluster job (or a sweep) skips it, in one loud line naming where it finished.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    caplog.clear()
    launch(cfg, tmp_path / "c")
    skipped = [m for m in messages(caplog).splitlines() if "skipped" in m]
    assert len(skipped) == 1 and "resume=auto: skipped: this job already finished in" in skipped[0]
    assert str(tmp_path / "b") in skipped[0] and "metaplast 0.0.0+tests" in skipped[0]
    assert result_of(tmp_path / "c")["theta"] == result_of(tmp_path / "b")["theta"]
    assert not list((tmp_path / "c/checkpoints").glob("episode-*.ckpt"))

    # Other code: refused, naming both versions and the options; nothing is lost or written.
    monkeypatch.setenv("METAPLAST_CODE_VERSION", "9.9.9+gdeadbeef")
    with pytest.raises(resume.VersionMismatch) as caught:
        launch(cfg, tmp_path / "d")
    message = str(caught.value)
    assert "was made by metaplast 0.0.0+tests, this is metaplast 9.9.9+gdeadbeef" in message
    assert "refusing to skip it and reuse its results" in message
    assert "resume=true (take it over with this code) or resume=false" in message
    assert not (tmp_path / "d/result.json").exists() and (tmp_path / "b/result.json").exists()
    # resume=true forces it; resume=false runs it afresh.
    caplog.clear()
    launch(make_cfg("rule=ehebb", "trainer.checkpoint_every=1", "resume=true"), tmp_path / "e")
    assert "resume=true: skipped: this job already finished" in messages(caplog)
    caplog.clear()
    launch(make_cfg("rule=ehebb", "trainer.checkpoint_every=1", "resume=false"), tmp_path / "f")
    assert "skipped" not in messages(caplog) and (tmp_path / "f/checkpoints/episode-3.ckpt").is_file()
    assert (
        load_checkpoint(tmp_path / "f/checkpoints/last.ckpt")["metaplast_code_version"] == "9.9.9+gdeadbeef"
    )


def test_a_killed_job_is_continued_by_a_requeued_job_and_named_by_a_single_run(
    make_cfg, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="metaplast")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    cfg = make_cfg("rule=bio", "reg=l1", "trainer.checkpoint_every=1")
    launch(cfg, tmp_path / "straight")
    killed = tmp_path / "killed"  # the same job, as if killed after episode 2 of 3
    shutil.copytree(tmp_path / "straight", killed)
    (killed / "result.json").unlink()
    shutil.copy(killed / "checkpoints/episode-2.ckpt", killed / "checkpoints/last.ckpt")
    resume.record(resume.job_key(cfg), killed, resume.index_dir(), "id-1", "0.0.0+tests")

    caplog.clear()
    launch(cfg, tmp_path / "single")  # not taken over: said once, and run afresh
    lines = [m for m in messages(caplog).splitlines() if "unfinished" in m]
    assert lines == [
        f"an unfinished run of this job stopped at episode 2 in {killed}; this run starts afresh "
        "(resume=true continues that one instead)"
    ]
    assert (tmp_path / "single/checkpoints/episode-1.ckpt").is_file()

    resume.record(resume.job_key(cfg), killed, resume.index_dir(), "id-1", "0.0.0+tests")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.setenv("METAPLAST_CODE_VERSION", "0.2.0")
    with pytest.raises(resume.VersionMismatch, match="refusing to continue it with other code"):
        launch(cfg, tmp_path / "other")
    assert not (tmp_path / "other/checkpoints").exists()  # nothing copied before the refusal
    monkeypatch.setenv("METAPLAST_CODE_VERSION", "0.0.0+tests")
    caplog.clear()
    launch(cfg, tmp_path / "requeued")
    assert f"resume=auto: continuing this job from episode 2/3 of {killed}" in messages(caplog)
    assert (tmp_path / "requeued/metrics.csv").read_text() == (tmp_path / "straight/metrics.csv").read_text()
    assert result_of(tmp_path / "requeued")["theta"] == result_of(tmp_path / "straight")["theta"]


def test_the_job_index_does_not_depend_on_the_launch_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("METAPLAST_JOBS")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    seen = set()
    for cwd in (tmp_path, tmp_path / "elsewhere"):
        cwd.mkdir(exist_ok=True)
        monkeypatch.chdir(cwd)
        seen.add(resume.index_dir())
    assert seen == {tmp_path / "state" / "metaplast" / "jobs"}
    monkeypatch.setenv("METAPLAST_JOBS", "relative/jobs")  # resolved once, absolute
    assert resume.index_dir() == tmp_path / "elsewhere" / "relative" / "jobs"
    assert resume.index_dir(str(tmp_path / "mine")) == tmp_path / "mine"  # jobs_dir=...


def test_the_code_version_is_the_package_version_and_git_commit(monkeypatch):
    monkeypatch.delenv("METAPLAST_CODE_VERSION")
    resume._git_commit.cache_clear()
    root = Path(resume.__file__).resolve().parents[3]
    head = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert resume.code_version() == (f"{__version__}+g{head}" if head else __version__)


@pytest.mark.parametrize("value, mode", [("auto", "auto"), (True, "true"), ("False", "false")])
def test_resume_takes_auto_true_false(make_cfg, value, mode):
    assert resume.resume_mode(value) == mode
    with pytest.raises(ConfigError, match="resume='maybe' is not allowed; allowed: auto"):
        validate(make_cfg("resume=maybe"))


# --- 2 and 3. the console and W&B ---------------------------------------------------------------------


def run_in_terminal(*args, cwd):
    """Run the CLI with stderr on a pseudo-terminal (where the progress bar draws), stdout piped."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "PYTHONWARNINGS")}
    env["COLUMNS"] = "160"
    process = subprocess.Popen(
        [sys.executable, "-m", "metaplast.train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    terminal = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        terminal += chunk
    stdout = process.communicate(timeout=300)[0].decode()
    os.close(master)
    assert process.returncode == 0, terminal.decode(errors="replace")
    return stdout, terminal.decode(errors="replace")


@pytest.fixture(scope="module")
def console_run(tmp_path_factory):
    """One tiny run with W&B (offline) and 4 trials, as a user at a terminal sees it."""
    tmp = tmp_path_factory.mktemp("console")
    run_dir = tmp / "run"
    args = [a for a in TINY if a != "trainer.progress_bar=false"]
    args = [*args, "meta.trials=4", "logger=wandb", "rule=ehebb", "reg=l1", f"hydra.run.dir={run_dir}"]
    stdout, terminal = run_in_terminal(*args, cwd=tmp)
    return run_dir, stdout, terminal


def test_the_console_is_one_start_line_a_progress_bar_and_one_end_line(console_run):
    run_dir, stdout, terminal = console_run
    lines = stdout.splitlines()
    assert len(lines) == 2, stdout
    start, end = lines
    assert start.startswith("metaplast 0.0.0+tests: meta-training rule ehebb (F^0, F^2), feedback fa, reg l1")
    assert (
        "4 trials x 3 episodes" in start and "data glyphs (564 samples, 47 classes; 3-way, K=4, Q=3)" in start
    )
    assert "device cpu" in start and "W&B offline (wandb sync run/wandb/offline-run-*)" in start
    assert start.endswith("run dir run")  # relative to the launch directory
    result = result_of(run_dir)
    low, high = result["final_meta_acc_ci"]
    theta = " ".join(f"θ_{r}={v:.3g}" for r, v in result["theta_mean"].items())
    assert end == (
        f"meta-accuracy {result['final_meta_acc']:.3f} (98 % CI {low:.3f}-{high:.3f}, 4 trials, mean of the "
        f"last 3 episodes); final Θ {theta}; run dir run; next: python -m metaplast.report run"
    )
    # The bar counts episodes, with s/episode, the time left and the mean meta-accuracy over trials.
    assert "episode 3/3 |" in terminal and "s/episode, ETA 00:00" in terminal
    assert "meta-acc" in terminal and "(4 trials)" in terminal
    for noise in (
        "Epoch 0",
        "v_num",
        "GPU available",
        "TPU available",
        "litlogger",
        "wandb:",
        "_pytree",
        "LeafSpec",
    ):
        assert noise not in terminal + stdout, noise
    # train.log holds the same lines
    logged = [line.split(" - ", 1)[1] for line in (run_dir / "train.log").read_text().splitlines()]
    assert logged == lines


def test_verbose_brings_third_party_messages_back(tmp_path):
    result = run_cli(*TINY, "verbose=true", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert "GPU available: False" in result.stdout + result.stderr


def test_the_non_terminal_progress_line():
    progress = EpisodeProgress()
    progress.total, progress.first, progress._started = 600, 100, 0.0
    import time

    progress._started = time.monotonic() - 50.0  # 50 episodes in 50 s
    line = progress.line(150, "meta-acc 0.412 (4 trials)")
    assert line.startswith("episode 150/600 (25 %), 1.00 s/episode, ETA 7:3")
    assert line.endswith(", meta-acc 0.412 (4 trials)")


def history(path):
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            )
    return rows


def test_wandb_nested_config_episode_axis_trials_section_summary_and_artifact(console_run):
    run_dir, _, _ = console_run
    path = offline_run_file(run_dir)
    every = records(path)
    (run,) = [r.run for r in every if r.WhichOneof("record_type") == "run"]
    assert run.job_type == "train" and run.display_name == "glyphs-ehebb-l1"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["feedback"]["kind"] == "fa" and config["reg"] == {"kind": "l1", "lam": 0.001}
    assert config["code_version"] == "0.0.0+tests"
    # no later config record overwrites it with Lightning's flat copy
    assert not [r for r in every if r.WhichOneof("record_type") == "config" and r.config.update]
    metrics = [r.metric for r in every if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "*" and m.step_metric == "episode" for m in metrics)
    rows = history(path)
    assert [row["episode"] for row in rows] == [0, 1, 2]
    table = pd.read_csv(run_dir / "metrics.csv")
    for row in rows:
        assert "trainer/global_step" not in row and "epoch" not in row
        means = [k for k in row if not k.startswith(("trials/", "_")) and k != "episode"]
        assert all(not k.split("/")[-1].startswith("trial_") for k in means)
        per_trial = [k for k in row if k.startswith("trials/")]
        assert len(per_trial) == 4 * len(means)  # each mean, for each of the 4 trials
        episode = table[table.episode == row["episode"]]
        assert row["meta/acc"] == pytest.approx(episode.meta_acc.mean())
        assert row["trials/meta/acc/trial_3"] == pytest.approx(episode[episode.trial == 3].meta_acc.item())
    result = result_of(run_dir)
    final = summary(path)
    assert float(final["meta/acc"]) == pytest.approx(result["final_meta_acc"])
    assert float(final["theta/2"]) == pytest.approx(result["theta_mean"]["2"])  # final Θ, not the last row's
    late_angle = table.groupby("trial").angle_0.mean().mean()  # all 3 episodes are the last 10
    assert float(final["angle/0"]) == pytest.approx(late_angle)
    (artifact,) = [r.artifact for r in every if r.WhichOneof("record_type") == "artifact"]
    assert artifact.type == "train"
    assert sorted(c.path for c in artifact.manifest.contents) == [
        "checkpoints/last.ckpt",
        "metrics.csv",
        "result.json",
    ]


def test_evaluate_logs_its_online_pass_to_wandb(tmp_path):
    run_dir = tmp_path / "eval"
    run_cli(
        "dataset=glyphs",
        "dataset.per_class=12",
        "model.hidden=[16,12]",
        "rule=ehebb",
        "theta={0:0.01,2:-0.02}",
        "online.trials=3",
        "online.samples=40",
        "online.every=20",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        module="metaplast.evaluate",
    )
    path = offline_run_file(run_dir)
    every = records(path)
    (run,) = [r.run for r in every if r.WhichOneof("record_type") == "run"]
    assert run.job_type == "evaluate"
    table = pd.read_csv(run_dir / "online.csv")
    rows = history(path)
    assert [row["sample"] for row in rows] == [0, 20, 40]
    for row in rows:
        at = table[table["sample"] == row["sample"]]
        assert row["online/acc"] == pytest.approx(at.acc.mean())
        assert row["trials/online/acc/trial_2"] == pytest.approx(at[at.trial == 2].acc.item())
        assert row["angle/1"] == pytest.approx(at.angle_1.mean())
    assert float(summary(path)["final/test_acc"]) == pytest.approx(table[table["sample"] == 40].acc.mean())
    (artifact,) = [r.artifact for r in every if r.WhichOneof("record_type") == "artifact"]
    assert {c.path for c in artifact.manifest.contents} >= {"online.csv", "theta.json"}


def test_short_run_names():
    from metaplast.run.tracking import run_name

    overrides = ["dataset=glyphs", "rule=ehebb", "reg=l1", "reg.lam=0.001", "seed=1", "logger=wandb"]
    assert run_name(overrides) == "glyphs-ehebb-l1-seed1"
    assert run_name(overrides, {"reg.lam", "seed"}) == "reg.lam=0.001,seed=1"


# --- 7. help and presets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, preset_group", [("metaplast.train", "experiment"), ("metaplast.evaluate", "eval_experiment")]
)
def test_help_explains_the_groups_and_shows_three_examples(tmp_path, module, preset_group):
    text = run_cli("--help", cwd=tmp_path, module=module).stdout
    examples = text.split("== Examples ==")[1].split("==")[0]
    assert (
        len([line for line in examples.splitlines() if line.strip().startswith(f"python -m {module}")]) == 3
    )
    for group in ("dataset", "model", "rule", "feedback", preset_group):
        assert f"\n  {group} " in text, group
    assert f"+{preset_group}=<name>" in text and "Powered by Hydra" not in text


def test_online_presets_belong_to_evaluate_and_a_sweeping_preset_needs_m(tmp_path):
    wrong = run_cli(
        *TINY, "+experiment=fig1_online", f"hydra.run.dir={tmp_path}/a", cwd=tmp_path, check=False
    )
    assert wrong.returncode == 2 and "experiment/fig1_online" in wrong.stderr
    one = run_cli(*TINY, "+experiment=fig3", f"hydra.run.dir={tmp_path}/b", cwd=tmp_path, check=False)
    assert one.returncode == 2, one.stdout
    (line,) = [l for l in one.stderr.splitlines() if l.startswith("metaplast: error:")]
    assert "+experiment=fig3 sweeps feedback: fa,bp, which needs -m" in line
    assert "allowed: python -m metaplast.train -m " in line and "+experiment=fig3" in line
    assert not (tmp_path / "b" / "metrics.csv").exists()
    online = run_cli(
        "+eval_experiment=s6_online",
        f"hydra.run.dir={tmp_path}/c",
        cwd=tmp_path,
        module="metaplast.evaluate",
        check=False,
    )
    assert (
        online.returncode == 2
        and "+eval_experiment=s6_online sweeps rule: f0,bio, which needs -m" in online.stderr
    )
    assert "python -m metaplast.evaluate -m +eval_experiment=s6_online" in online.stderr


def test_a_sweeps_varying_keys_come_from_its_multirun_record(tmp_path):
    from omegaconf import OmegaConf

    from metaplast.run.tracking import sweep_varying

    task = ["rule=bio", "reg=l1", "reg.lam=0,1e-3", "seed=range(0,3)", "meta.M=choice(3,5)"]
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": task}}}), tmp_path / "multirun.yaml")
    assert sweep_varying(tmp_path, {"feedback": "fa,bp"}) == {"reg.lam", "seed", "meta.M", "feedback"}
    assert sweep_varying(tmp_path / "none", None) == set()
