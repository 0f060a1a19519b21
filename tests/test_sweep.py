"""Sweeps: real Hydra launchers and sweeper, W&B grouping, aggregation, kill-and-resume."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import TINY, run_cli
from metaplast.analysis import results, sweep, sweeps
from metaplast.run.train import run
from wandb_file import offline_run_file, records, summary


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Parallel jobs on a shared 2-core machine: one torch thread each."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def jobs_of(sweep_dir):
    return sorted((p.parent.parent for p in Path(sweep_dir).rglob(".hydra/overrides.yaml")), key=str)


def result_of(job):
    return json.loads((Path(job) / "result.json").read_text())


def final_theta(job):
    return torch.load(Path(job) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]["meta.theta"]


def test_joblib_2x2_makes_four_complete_jobs_and_a_rerun_skips_them(tmp_path):
    args = ["-m", *TINY, "meta.episodes=2", "reg=l1", "reg.lam=0,1e-3", "seed=0,1", "hydra/launcher=parallel"]
    args.append(f"hydra.sweep.dir={tmp_path / 'first'}")
    run_cli(*args, cwd=tmp_path)
    jobs = jobs_of(tmp_path / "first")
    assert len(jobs) == 4
    seen = set()
    for job in jobs:
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra/overrides.yaml").read_text()))
        seen.add((overrides["reg.lam"], overrides["seed"]))
        result = result_of(job)
        assert len((job / "metrics.csv").read_text().splitlines()) == 1 + 2 * 2
        assert (job / "checkpoints" / "last.ckpt").exists()
        torch.testing.assert_close(
            torch.tensor(result["theta"], dtype=torch.float64), final_theta(job).double()
        )
    assert {(float(lam), seed) for lam, seed in seen} == {(0, "0"), (0, "1"), (1e-3, "0"), (1e-3, "1")}

    # The same sweep again (into another directory; the basic launcher, as skipping does not depend
    # on the launcher): every job is found finished and skipped.
    again_args = [a for a in args[:-1] if not a.startswith("hydra/launcher")]
    run_cli(*again_args, f"hydra.sweep.dir={tmp_path / 'again'}", cwd=tmp_path)
    again = jobs_of(tmp_path / "again")
    assert len(again) == 4
    for old, new in zip(jobs, again):
        assert "skipped: this job already finished" in (new / "train.log").read_text()
        assert result_of(new) == result_of(old)
        assert (new / "metrics.csv").read_text() == (old / "metrics.csv").read_text()
        assert not list((new / "checkpoints").glob("episode-*.ckpt"))


def test_submitit_local_job_completes_and_its_results_are_read_back(tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_cli(
        "-m",
        *TINY,
        "logger=wandb",
        "rule=ehebb",
        "reg=l1",
        "reg.lam=1e-3",
        "logger.tags=[mine]",
        "hydra/launcher=local",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )
    (job,) = jobs_of(sweep_dir)
    result = result_of(job)
    # submitit's own record of the job: the task function's return value, the objective.
    (pickled,) = sweep_dir.glob(".submitit/*/*_result.pkl")
    status, job_return = pickle.loads(pickled.read_bytes())
    assert status == "success"
    assert job_return.return_value == pytest.approx(result["objective"])
    assert result["objective"] == pytest.approx(np.mean(result["meta_acc"]))
    # W&B: the sweep's group, tags, and the final result in the summary.
    (run,) = [r.run for r in records(offline_run_file(job)) if r.WhichOneof("record_type") == "run"]
    assert run.run_group == "sweep"
    assert set(run.tags) == {"mine", "rule:ehebb", "feedback:fa", "reg:l1", "dataset:glyphs"}
    assert run.display_name == "glyphs-ehebb-l1"  # nothing varies: the chosen groups' options
    assert run.job_type == "train"
    keys = summary(offline_run_file(job))
    assert float(keys["final/meta_acc"]) == pytest.approx(result["final_meta_acc"])
    assert int(keys["final/surviving_terms"]) == result["surviving"]
    for trial, row in zip(result["trials"], result["theta"]):
        for term, value in zip(result["terms"], row):
            assert float(keys[f"trials/final/theta/{term}/trial_{trial}"]) == pytest.approx(value, rel=1e-12)


def test_optuna_preset_runs_two_trials_and_keeps_the_best(tmp_path):
    sweep_dir = tmp_path / "optuna"
    run_cli(
        "-m",
        *TINY,
        "meta.episodes=2",
        "rule=bio",
        "reg=l1",
        "objective.max_terms=1",
        "hydra/sweeper=lam_search",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )
    jobs = jobs_of(sweep_dir)
    assert len(jobs) == 2
    lams = [float(OmegaConf.load(job / ".hydra/config.yaml").reg.lam) for job in jobs]
    assert all(1e-5 <= lam <= 1e-1 for lam in lams) and lams[0] != lams[1]
    objectives = []
    for job in jobs:
        result = result_of(job)
        # objective = accuracy, minus one per surviving term beyond objective.max_terms
        excess = max(0, result["surviving"] - 1)
        assert result["objective"] == pytest.approx(np.mean(result["meta_acc"]) - excess)
        objectives.append(result["objective"])
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert best.best_value == pytest.approx(max(objectives))
    assert best.best_params["reg.lam"] == pytest.approx(lams[int(np.argmax(objectives))])


def test_sigterm_then_the_same_command_resumes_to_the_uninterrupted_theta(make_cfg, tmp_path, monkeypatch):
    """Bit for bit, so on one thread: with two, MKL's threaded products differ in the last bits
    from process to process (meta/grad_norm of a few episodes by 1e-7; measured 2026-11-27)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sigterm_then_resume(make_cfg, tmp_path)
    finally:
        torch.set_num_threads(threads)


def sigterm_then_resume(make_cfg, tmp_path):
    overrides = ["rule=bio", "reg=l1", "meta.episodes=30", "trainer.checkpoint_every=1000"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "metaplast.train", *TINY, *overrides]
    job = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and job.poll() is None:
        csvs = list(tmp_path.glob("outputs/*/*/metrics.csv"))
        if csvs and len(csvs[0].read_text().splitlines()) > 3 * 2:  # three episodes of two trials
            break
        time.sleep(0.02)
    job.send_signal(signal.SIGTERM)
    stderr = job.communicate(timeout=120)[1].decode()
    assert job.returncode == 143, stderr
    (killed,) = tmp_path.glob("outputs/*/*")
    assert (killed / "checkpoints/last.ckpt").exists(), stderr
    stopped_at = torch.load(killed / "checkpoints/last.ckpt", weights_only=False)["global_step"]
    assert 3 <= stopped_at < 30
    assert not (killed / "result.json").exists()

    time.sleep(1.1)  # a new timestamped run directory
    assert "the same command with resume=true continues it" in stderr
    run_cli(*TINY, *overrides, "resume=true", cwd=tmp_path)
    resumed = max(tmp_path.glob("outputs/*/*"))
    assert resumed != killed

    straight = tmp_path / "straight"
    straight.mkdir()
    run(make_cfg(*overrides), straight)
    assert torch.equal(final_theta(resumed), final_theta(straight))
    assert (resumed / "metrics.csv").read_text() == (straight / "metrics.csv").read_text()
    assert result_of(resumed)["theta"] == result_of(straight)["theta"]


def write_job(job: Path, cfg, overrides, theta, accuracy):
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, job / ".hydra/config.yaml")
    (job / ".hydra/overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    terms = [0, 2, 9]
    result = results.job_result(theta, terms, list(range(len(accuracy))), accuracy, 1e-3, None)
    results.write_json(job / "result.json", result)


def test_aggregation_of_known_jobs(make_cfg, tmp_path):
    """Two λ × two seeds × three trials of `bio`, one unfinished job; expected values by hand."""
    rng = np.random.default_rng(1)
    sweep_dir = tmp_path / "multirun" / "2026-01-01" / "00-00-00"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    data = {}
    for number, (lam, seed) in enumerate([(0.0, 0), (0.0, 1), (1e-3, 0), (1e-3, 1)]):
        cfg = make_cfg("rule=bio", "reg=l1", f"reg.lam={lam}", f"seed={seed}")
        theta = np.array([[1e-2, 5e-4 if lam else 4e-3, -2e-3]] * 3) + rng.normal(0, 1e-5, (3, 3))
        accuracy = rng.uniform(0.2, 0.6, 3)
        write_job(
            sweep_dir / str(number),
            cfg,
            ["rule=bio", "reg=l1", f"reg.lam={lam}", f"seed={seed}"],
            theta,
            accuracy,
        )
        data.setdefault(lam, []).append((theta, accuracy))
    (sweep_dir / "4" / ".hydra").mkdir(parents=True)  # unfinished: no result.json
    (sweep_dir / "4" / ".hydra/overrides.yaml").write_text("- reg.lam=1\n")

    out = tmp_path / "out"
    table = sweeps.report([sweep_dir], out)
    assert list(table["lam"]) == [0.0, 1e-3]
    assert list(table["rule"]) == ["bio", "bio"]
    for row, lam in zip(table.itertuples(), [0.0, 1e-3]):
        accuracy = np.concatenate([a for _, a in data[lam]])
        theta = np.concatenate([t for t, _ in data[lam]]).mean(axis=0)
        assert (row.jobs, row.trials) == (2, 6)
        assert row.acc == pytest.approx(accuracy.mean())
        assert (row.theta_0, row.theta_2, row.theta_9) == pytest.approx(tuple(theta))
        # a percentile bootstrap of the mean, computed here with numpy and many more resamples
        means = rng.choice(accuracy, (20000, len(accuracy))).mean(axis=1)
        low, high = np.percentile(means, [1, 99])
        assert row.acc_lo == pytest.approx(low, abs=0.02) and row.acc_hi == pytest.approx(high, abs=0.02)
        assert row.acc_lo < row.acc < row.acc_hi
    assert list(table["surviving"]) == [3, 2]  # |θ_2| = 5e-4 is below the 1e-3 threshold
    assert list(table["surviving_terms"]) == ["0 2 9", "0 9"]
    assert "reg.lam" not in table and "seed" not in table  # shown as `lam`, pooled

    assert pd.read_csv(out / "sweep.csv")["acc"].tolist() == pytest.approx(table["acc"].tolist())
    assert len(pd.read_csv(out / "trials.csv")) == 12
    markdown = (out / "sweep.md").read_text()
    header = [column.strip() for column in markdown.splitlines()[0].strip("|").split("|")]
    assert header == [
        "rule",
        "lam",
        "jobs",
        "trials",
        "acc (98% CI)",
        "θ_0",
        "θ_2",
        "θ_9",
        "surviving",
        "surviving_terms",
    ]
    assert f"{table.acc[0]:.3f} [{table.acc_lo[0]:.3f}, {table.acc_hi[0]:.3f}]" in markdown
    for name in ("lambda_accuracy.png", "lambda_surviving.png"):
        assert (out / name).stat().st_size > 1000


def test_aggregation_cli_names_a_directory_without_jobs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main([str(tmp_path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"metaplast.sweep: error: no Hydra job directory (with .hydra/) under {tmp_path}\n"
    )


def test_report_command_adds_the_sweep_table_for_a_multirun_directory(make_cfg, tmp_path):
    from metaplast.analysis import report

    sweep_dir = tmp_path / "multirun"
    sweep_dir.mkdir()
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    for number, lam in enumerate([0.0, 1e-2]):
        overrides = ["rule=ehebb", "reg=l1", f"reg.lam={lam}", "meta.episodes=2"]
        job = sweep_dir / str(number)
        (job / ".hydra").mkdir(parents=True)
        cfg = make_cfg(*overrides)
        OmegaConf.save(cfg, job / ".hydra/config.yaml")
        (job / ".hydra/overrides.yaml").write_text(yaml.safe_dump(overrides))
        run(cfg, job)
    report.main([str(sweep_dir), "--out", str(tmp_path / "out")])
    table = pd.read_csv(tmp_path / "out" / "sweep" / "sweep.csv")
    assert table["lam"].tolist() == [0.0, 1e-2]
    for row, number in zip(table.itertuples(), range(2)):
        result = result_of(sweep_dir / str(number))
        assert row.acc == pytest.approx(np.mean(result["meta_acc"]))
        assert row.theta_2 == pytest.approx(result["theta_mean"]["2"])


def test_the_final_accuracy_is_each_trials_mean_over_its_last_n_episodes(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "episode,trial,meta_acc\n0,0,0.5\n0,1,0.5\n1,0,0.25\n1,1,\n2,0,0.75\n2,1,\n3,0,0.5\n3,1,\n"
    )
    assert results.final_accuracy(path, [0, 1], last=2) == [0.625, pytest.approx(np.nan, nan_ok=True)]
    assert results.final_accuracy(path, [0, 1], last=4) == [0.5, 0.5]  # a diverged episode is left out
    last = results.final_accuracy(path, [0, 1], last=1)
    assert last[0] == 0.5 and np.isnan(last[1])  # diverged in every one of its last episodes: none
    result = results.job_result([[1e-2, 0.0], [2e-2, 0.0]], [0, 2], [0, 1], last, 1e-3, None, last=1)
    assert result["final_meta_acc"] == 0.5 and result["surviving_terms"] == [0]  # left out of the mean
    assert result["last"] == 1 and result["final_meta_acc_ci"] == [0.5, 0.5]
    assert results.final_accuracy(tmp_path / "none.csv", [0]) is None
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="is not allowed; allowed: an integer >= 1"):
            results.final_accuracy(path, [0], last=bad)
    # rescoring keeps the accuracies and says over how many episodes they were (1 before "last" existed)
    old = {k: v for k, v in result.items() if k != "last"}
    assert results.rescore(old, 1e-3, None)["last"] == 1
