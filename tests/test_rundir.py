"""The one reader of run directories (metaplast.analysis.rundir): the report's final Θ is
result.json's, then the last checkpoint's, then the CSV's; multiruns, overrides, labels, rule names."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from metaplast.analysis import report, results, sweeps
from metaplast.analysis.report import rule_equation
from metaplast.analysis.rundir import RunDir, RunError, expand, hydra_jobs
from metaplast.core.rules import Rule
from metaplast.run.train import run as train


def report_theta(run_dir, out):
    """The report's final-Θ table (Table S1 style) and rules.txt for one run directory."""
    report.main([str(run_dir), "--out", str(out)])
    table = pd.read_csv(out / "theta_final.csv", float_precision="round_trip")
    return table, (out / "rules.txt").read_text()


def test_report_final_theta_is_result_json_theta_then_checkpoint_then_csv(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    cfg = make_cfg("rule=bio")
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # as the Hydra app does
    train(cfg, run_dir)
    result = json.loads((run_dir / "result.json").read_text())
    expected = {int(r): v for r, v in result["theta_mean"].items()}
    assert list(expected) == [0, 2, 9]

    table, rules = report_theta(run_dir, tmp_path / "finished")
    assert table["term"].tolist() == [0, 2, 9]
    assert table["mean"].tolist() == [expected[r] for r in (0, 2, 9)]  # the same numbers, bit for bit
    assert set(table["source"]) == {"result.json"}
    assert rules.splitlines()[0] == f"bio FA: {rule_equation(expected)}"
    # The CSV's last rows hold the Θ the last episode ran with, one Adam step (lr 1e-3) before.
    metrics = pd.read_csv(run_dir / "metrics.csv")
    before = metrics[metrics["episode"] == metrics["episode"].max()][["theta_0", "theta_2", "theta_9"]].mean()
    steps = [abs(expected[r] - before[f"theta_{r}"]) for r in (0, 2, 9)]
    assert max(steps) > 0 and max(steps) <= 1.001e-3

    # Not finished (no result.json): the last checkpoint, Θ after the same last Adam step.
    (run_dir / "result.json").unlink()
    table, _ = report_theta(run_dir, tmp_path / "checkpoint")
    assert table["mean"].tolist() == [expected[r] for r in (0, 2, 9)]
    assert set(table["source"]) == {"last.ckpt"}
    assert RunDir(run_dir).final_theta() == expected
    assert RunDir(run_dir).final_theta(trial=1) == dict(zip((0, 2, 9), result["theta"][1]))

    # Neither: the last episode's rows of metrics.csv.
    (run_dir / "checkpoints" / "last.ckpt").unlink()
    table, _ = report_theta(run_dir, tmp_path / "csv")
    assert table["mean"].tolist() == pytest.approx([before[f"theta_{r}"] for r in (0, 2, 9)], rel=1e-12)
    assert set(table["source"]) == {"metrics.csv"}


def write_job(job, cfg, overrides, rows=None, result=None):
    """A Hydra job directory: .hydra/config.yaml and overrides.yaml, a metrics.csv, a result.json."""
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, job / ".hydra" / "config.yaml")
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    if rows is not None:
        pd.DataFrame(rows).to_csv(job / "metrics.csv", index=False)
    if result is not None:
        results.write_json(job / "result.json", result)
    return job


def test_multirun_overrides_labels_and_rule_names_come_from_one_place(make_cfg, tmp_path):
    multirun = tmp_path / "multirun"
    per_layer = ["f0", "ehebb", "f0"]
    for number in (10, 2):  # Hydra numbers jobs; 2 comes before 10
        overrides = [f"rule.per_layer=[{','.join(per_layer)}]", "reg=l1", "reg.lam=0.001"]
        cfg = make_cfg(*overrides, "rule.share=layer")
        rows = [
            {"episode": e, "trial": t, "meta_acc": 0.5, "theta_layer0_0": 0.01 * t, "theta_layer2_2": e}
            for e in range(3)
            for t in range(2)
        ]
        write_job(multirun / str(number), cfg, [*overrides[:2], "+reg.lam=0.001", "~seed"], rows)
    assert [run.path.name for run in expand([multirun])] == ["2", "10"]
    (first, _) = expand([multirun])
    assert first.overrides == {"rule.per_layer": "[f0,ehebb,f0]", "reg": "l1", "reg.lam": "0.001", "seed": ""}
    assert first.rule == Rule.build(None, 3, per_layer)
    assert first.rule_label == Rule.build(None, 3, per_layer).label == "[f0,ehebb,f0]"
    assert first.label == "[f0,ehebb,f0] FA L1 λ=0.001"
    final = first.final()  # per-layer Θ from the CSV: (trials, layers, terms)
    assert (final.source, final.share, final.terms, final.trials) == ("csv", "layer", (0, 2), (0, 1))
    assert final.values.shape == (2, 2, 2) and final.values[1, 0, 0] == 0.01 and final.values[0, 1, 1] == 2
    with pytest.raises(RunError, match="Θ is not shared by all layers"):
        first.final_theta()
    with pytest.raises(RunError, match="is not a run directory"):
        expand([tmp_path / "multirun" / "2" / ".hydra"])
    with pytest.raises(RunError, match="no Hydra job directory"):
        hydra_jobs(first.path / ".hydra")

    # The sweep table names the rule as Rule.label does, and reads Θ from result.json.
    theta = [[1e-2, -2e-2], [3e-2, 0.0]]
    result = results.job_result(theta, [0, 2], [0, 1], [0.5, 0.7], 1e-3, None)
    write_job(
        multirun / "sweep" / "0", make_cfg("rule.per_layer=[f0,ehebb,f0]"), ["rule.per_layer=[f0,ehebb,f0]"]
    )
    results.write_json(multirun / "sweep" / "0" / "result.json", result)
    table = sweeps.report([multirun / "sweep"], tmp_path / "out")
    assert table["rule"].tolist() == ["[f0,ehebb,f0]"]
    assert (table.loc[0, "theta_0"], table.loc[0, "theta_2"]) == pytest.approx((2e-2, -1e-2))
    assert table.loc[0, "surviving_terms"] == "0 2"


def test_an_online_evaluation_is_read_with_its_theta_json(tmp_path):
    path = tmp_path / "online"
    path.mkdir()
    table = pd.DataFrame({"sample": [0, 10], "trial": [0, 0], "acc": [0.3, 0.5]})
    table.to_csv(path / "online.csv", index=False)
    theta = {"terms": [0, 2], "layer_terms": [[0], [0, 2]], "theta": [0.01, -0.02], "feedback": "bp"}
    (path / "theta.json").write_text(json.dumps(theta))
    (run,) = expand([path])
    assert run.kind == "online" and run.trials == [0]
    assert run.rule == Rule((0, 2), ((0,), (0, 2)))
    assert run.label == "[f0,ehebb] BP"
    with pytest.raises(RunError, match="has no final Θ"):
        run.final()


def test_analysis_imports_nothing_of_the_runner():
    code = (
        "import sys\n"
        "import metaplast.analysis.report, metaplast.analysis.sweep, metaplast.analysis.rundir\n"
        "print(sorted(m for m in sys.modules if m.startswith('metaplast.run')))\n"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"


def test_rescoring_keeps_what_else_result_json_holds():
    result = results.job_result([[1e-2, 5e-4]], [0, 2], [0], [0.4], 1e-3, None)
    result.update(theta_share="layer", term_scale={"0": 1.0, "2": 45.0})
    again = results.rescore(result, 1e-4, None)
    assert again["surviving_terms"] == [0, 2] and result["surviving_terms"] == [0]
    assert (again["theta_share"], again["term_scale"]) == ("layer", {"0": 1.0, "2": 45.0})


def test_result_json_report_sweep_and_objective_agree_on_the_final_accuracy_and_theta(make_cfg, tmp_path):
    """One definition each: the final accuracy (per trial the mean over the last objective.last
    episodes) and the final Θ (after the last Adam step) are the same numbers everywhere."""
    sweep_dir = tmp_path / "multirun"
    job = sweep_dir / "0"
    (job / ".hydra").mkdir(parents=True)
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    overrides = ["rule=bio", "meta.episodes=6", "objective.last=4"]
    cfg = make_cfg(*overrides)
    OmegaConf.save(cfg, job / ".hydra" / "config.yaml")
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    train(cfg, job)
    result = json.loads((job / "result.json").read_text())
    metrics = pd.read_csv(job / "metrics.csv")
    per_trial = metrics[metrics["episode"] >= 2].groupby("trial")["meta_acc"].mean()
    assert result["last"] == 4 and result["meta_acc"] == pytest.approx(per_trial.tolist(), rel=1e-12)
    assert result["final_meta_acc"] == pytest.approx(per_trial.mean(), rel=1e-12)
    assert result["objective"] == result["final_meta_acc"]
    assert RunDir(job).final_accuracy() == result["meta_acc"]

    out = tmp_path / "report"
    report.main([str(sweep_dir), "--out", str(out)])
    summary = pd.read_csv(out / "summary.csv", float_precision="round_trip")
    assert summary.loc[0, "last"] == 4
    assert summary.loc[0, "meta_acc"] == result["final_meta_acc"]
    assert [summary.loc[0, "meta_acc_low"], summary.loc[0, "meta_acc_high"]] == result["final_meta_acc_ci"]
    table = pd.read_csv(out / "sweep" / "sweep.csv", float_precision="round_trip")
    assert table.loc[0, "acc"] == result["final_meta_acc"] and table.loc[0, "last"] == 4
    assert [table.loc[0, "acc_lo"], table.loc[0, "acc_hi"]] == result["final_meta_acc_ci"]
    theta = pd.read_csv(out / "theta_final.csv", float_precision="round_trip")
    assert theta["mean"].tolist() == [result["theta_mean"][str(r)] for r in (0, 2, 9)]
    checkpoint = RunDir(job).final(("checkpoint",))
    assert checkpoint.values.tolist() == result["theta"]  # last.ckpt holds the same Θ

    # Without metrics.csv the result comes from the run's own episode record: the same numbers.
    no_csv = tmp_path / "no_csv"
    no_csv.mkdir()
    train(make_cfg(*overrides, "logger.csv=false"), no_csv)
    assert not (no_csv / "metrics.csv").exists()
    again = json.loads((no_csv / "result.json").read_text())
    assert again["meta_acc"] == pytest.approx(result["meta_acc"], rel=1e-12)
    assert again["theta"] == result["theta"]
    # Resumed from the checkpoint of its last episode with result.json lost, a run trains nothing
    # and takes the accuracy from the checkpoint's own episode record: the same numbers again.
    (no_csv / "result.json").unlink()
    train(
        make_cfg(*overrides, "logger.csv=false", f"ckpt_path={no_csv / 'checkpoints' / 'last.ckpt'}"), no_csv
    )
    resumed = json.loads((no_csv / "result.json").read_text())
    assert resumed["meta_acc"] == again["meta_acc"] and resumed["theta"] == again["theta"]
