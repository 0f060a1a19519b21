"""Meta-training end to end: CLI, W&B, multirun, determinism, batching of trials, resume, validation."""

import csv
import re
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_cli
from metaplast.run.config import ConfigError, validate
from metaplast.run.train import build_module, run
from wandb_file import offline_run_file, summary


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def final_theta(run_dir):
    ckpt = torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    return ckpt["state_dict"]["meta.theta"]


def test_cli_run_writes_csv_checkpoint_and_offline_wandb_summary(tmp_path):
    run_dir = tmp_path / "run"
    run_cli(*TINY, "logger=wandb", "rule=bio", "reg=l1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    rows = read_csv(run_dir / "metrics.csv")
    assert len(rows) == 3 * 2
    assert [(r["episode"], r["trial"]) for r in rows[:2]] == [("0", "0"), ("0", "1")]
    assert {"meta_acc", "meta_loss", "theta_0", "theta_2", "theta_9", "angle_0", "angle_2", "orth_3"} <= set(
        rows[0]
    )
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    keys = summary(offline_run_file(run_dir))
    for key in ("theta/0", "theta/9", "trials/theta/2/trial_1", "angle/0", "angle/2", "meta/acc", "orth/1"):
        assert key in keys, key
    # The summary holds the final meta-accuracy: per trial the mean over its last (here all 3) episodes.
    mean_acc = sum(float(r["meta_acc"]) for r in rows) / len(rows)
    assert float(keys["meta/acc"]) == pytest.approx(mean_acc, rel=1e-6)


def test_multirun_2x2_produces_four_job_directories(tmp_path):
    run_cli("-m", *TINY, "meta.episodes=1", "reg=l1", "reg.lam=0,1e-3", "seed=0,1", cwd=tmp_path)
    jobs = [p for p in (tmp_path / "multirun").glob("*/*/*") if p.is_dir()]
    assert len(jobs) == 4
    for job in jobs:
        assert len(read_csv(job / "metrics.csv")) == 2
        assert (job / ".hydra" / "overrides.yaml").exists()


def test_same_seed_reproduces_csv_and_other_seed_changes_it(make_cfg, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        (tmp_path / name).mkdir()
        run(make_cfg("rule=ehebb", f"seed={seed}"), tmp_path / name)
    a, b, c = ((tmp_path / n / "metrics.csv").read_text() for n in "abc")
    assert a == b
    assert a != c


def test_batched_trials_equal_separate_runs(make_cfg, tmp_path):
    together = tmp_path / "together"
    together.mkdir()
    run(make_cfg("rule=pool", "reg=l1", "meta.trials=3", "trainer.precision=64-true"), together)
    rows = read_csv(together / "metrics.csv")
    for trial in range(3):
        alone = tmp_path / f"alone{trial}"
        alone.mkdir()
        cfg = make_cfg(
            "rule=pool", "reg=l1", "meta.trials=1", f"meta.first_trial={trial}", "trainer.precision=64-true"
        )
        run(cfg, alone)
        mine = [r for r in rows if r["trial"] == str(trial)]
        theirs = read_csv(alone / "metrics.csv")
        assert len(mine) == len(theirs) == 3
        for a, b in zip(mine, theirs):
            assert a.keys() == b.keys()
            for key in a:
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-9, abs=1e-12), key
        torch.testing.assert_close(
            final_theta(together)[trial], final_theta(alone)[0], rtol=1e-10, atol=1e-14
        )


def test_resumed_run_equals_uninterrupted_run(make_cfg, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    resumed.mkdir()
    run(make_cfg("rule=bio", "reg=l1", "meta.episodes=6", "trainer.checkpoint_every=3"), straight)
    run(make_cfg("rule=bio", "reg=l1", "meta.episodes=3", "trainer.checkpoint_every=3"), resumed)
    ckpt = resumed / "checkpoints" / "last.ckpt"
    run(make_cfg("rule=bio", "reg=l1", "meta.episodes=6", f"ckpt_path={ckpt}"), resumed)
    assert (resumed / "metrics.csv").read_text() == (straight / "metrics.csv").read_text()
    assert torch.equal(final_theta(resumed), final_theta(straight))
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == [
        "episode-3.ckpt",
        "episode-6.ckpt",
        "last.ckpt",
    ]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rule.terms=hebb"], "rule.terms: rule 'hebb' is unknown; allowed: f0, pool, bio, ehebb, oja"),
        (["rule=custom", "rule.terms=[0,12]"], r"rule.terms: rule terms \[0, 12\] are invalid"),
        (["rule=per_layer", "rule.per_layer=[f0,ehebb]"], "2 entries but the network has 3 layers"),
        (["reg=l1", "reg.lam=-0.1"], r"reg.lam=-0.1 is not allowed; allowed: a non-negative number"),
        (["meta.trials=0"], "meta.trials=0 is not allowed"),
        (["+meta.foo=1"], "meta.foo is not a known key; allowed keys here: episodes, M, K, Q, trials"),
        (["trainer.accelerator=tpu"], "trainer.accelerator='tpu' is not allowed; allowed: auto, cpu, gpu"),
    ],
)
def test_validation_errors_name_field_value_and_allowed(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(*overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["meta.M=48"], r"meta.M=48: must be <= 47, the number of classes present \(dataset 'glyphs'\)"),
        (["meta.K=10", "meta.Q=3"], r"meta.K\+Q=10\+3=13: must be <= 12"),
    ],
)
def test_validation_against_the_data(make_cfg, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_module(make_cfg(*overrides), tmp_path)
    assert not (tmp_path / "metrics.csv").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("meta.foo=1", "Could not override 'meta.foo'"),
        ("meta.M=five", "Value 'five' of type 'str' could not be converted to Integer"),
        (
            "feedback.kind=xfa",
            "Invalid value 'xfa', expected one of \\[bp, fa, dfa, sign, kolen_pollack, plastic, flp\\]",
        ),
        ("reg.kind=l3", "Invalid value 'l3', expected one of \\[none, l1, l2\\]"),
    ],
)
def test_schema_rejects_unknown_keys_and_wrong_types(make_cfg, override, message):
    with pytest.raises(Exception) as caught:
        make_cfg(override)
    chain = f"{caught.value} {caught.value.__cause__}"
    assert re.search(message, chain), chain


def test_cli_reports_a_bad_value_without_a_traceback(tmp_path):
    result = run_cli(
        *TINY, "reg=l1", "reg.lam=-1", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path, check=False
    )
    assert result.returncode == 2
    assert "metaplast: error: reg.lam=-1.0 is not allowed" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r" / "metrics.csv").exists()
