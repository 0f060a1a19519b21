"""Statistics against scipy and exact values; the report writes every promised file; the rule text."""

import json
import re
from math import comb

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as scipy_stats

from metaplast.analysis.report import TABLE1_PAPER, main, rule_equation
from metaplast.analysis.stats import (
    bootstrap_ci,
    mann_whitney,
    mann_whitney_per_episode,
    moving_average,
    summarise,
)

SAMPLE = np.array([0.21, 0.25, 0.19, 0.30, 0.27, 0.22, 0.24, 0.26, 0.18, 0.29])


def test_bootstrap_ci_is_scipys_percentile_bootstrap_98_percent_500_resamples():
    ours = bootstrap_ci(SAMPLE, seed=3)
    theirs = scipy_stats.bootstrap(
        (SAMPLE,),
        np.mean,
        confidence_level=0.98,
        n_resamples=500,
        method="percentile",
        random_state=np.random.default_rng(3),
    ).confidence_interval
    assert ours == (theirs.low, theirs.high)
    assert ours[0] < SAMPLE.mean() < ours[1]


def test_bootstrap_ci_matches_the_normal_theory_interval_on_a_large_sample():
    values = np.random.default_rng(0).normal(1.0, 2.0, 4000)
    low, high = bootstrap_ci(values)
    half = scipy_stats.norm.ppf(0.99) * values.std(ddof=1) / np.sqrt(values.size)
    assert low == pytest.approx(values.mean() - half, abs=0.25 * half)
    assert high == pytest.approx(values.mean() + half, abs=0.25 * half)
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)


def test_mann_whitney_agrees_with_scipy_and_the_exact_null_distribution():
    a, b = SAMPLE[:5], SAMPLE[5:]
    assert mann_whitney(a, b) == scipy_stats.mannwhitneyu(a, b, alternative="greater").pvalue
    assert mann_whitney(a, b, "less") == scipy_stats.mannwhitneyu(a, b, alternative="less").pvalue
    # Completely separated samples of sizes 3 and 3: exactly one of C(6, 3) orderings is this extreme.
    assert mann_whitney([5, 6, 7], [1, 2, 3]) == pytest.approx(1 / comb(6, 3))
    with pytest.raises(ValueError, match="alternative='two-sided' is not allowed"):
        mann_whitney(a, b, "two-sided")


def test_mann_whitney_per_episode_compares_the_trials_of_each_episode():
    rng = np.random.default_rng(1)
    first = pd.DataFrame({"episode": np.repeat([0, 1], 6), "meta_acc": rng.random(12)})
    second = pd.DataFrame({"episode": np.repeat([0, 1, 2], 4), "meta_acc": rng.random(12)})
    table = mann_whitney_per_episode(first, second)
    assert list(table["episode"]) == [0, 1]
    for episode, p in zip(table["episode"], table["p"]):
        a = first.loc[first["episode"] == episode, "meta_acc"]
        b = second.loc[second["episode"] == episode, "meta_acc"]
        assert p == scipy_stats.mannwhitneyu(a, b, alternative="greater").pvalue


def test_moving_average_and_summary():
    values = np.arange(10.0)
    expected = np.convolve(values, np.ones(3) / 3, mode="valid")
    assert np.allclose(moving_average(values, 3)[2:], expected)
    assert moving_average(values, 3)[:2].tolist() == [0.0, 0.5]
    frame = pd.DataFrame({"episode": np.repeat([0, 1], 10), "x": np.concatenate([SAMPLE, SAMPLE + 1])})
    table = summarise(frame, "x")
    assert table["mean"].tolist() == pytest.approx([SAMPLE.mean(), SAMPLE.mean() + 1])
    assert (table["low"].iloc[0], table["high"].iloc[0]) == bootstrap_ci(SAMPLE)
    with pytest.raises(ValueError, match="window=0 is not allowed"):
        moving_average(values, 0)


def test_rule_text_of_table_s1_l1_keeps_theta_0_2_9():
    theta_l1 = {0: 0.978e-2, 1: 0.075e-2, 2: -2.361e-2, 3: 0.0, 4: 0.087e-2}
    theta_l1.update({5: 0.026e-2, 6: 0.019e-2, 7: 0.031e-2, 8: -0.064e-2, 9: 0.415e-2})
    assert rule_equation(theta_l1) == (
        "ΔW_{l-1,l} = 9.78e-03 (-e_l y_{l-1}^T) - 2.36e-02 (-e_l e_{l-1}^T)"
        " + 4.15e-03 (y_l y_{l-1}^T - y_l y_l^T W)"
    )
    assert rule_equation({0: -0.5, 3: 0.25}, keep=0.6) == "ΔW_{l-1,l} = - 5.00e-01 (-e_l y_{l-1}^T)"


# ---------------------------------------------------------------- a synthetic set of run directories


def write_meta_run(path, rule, feedback, reg, angles, episodes=12, trials=4, acc=0.3, seed=0):
    """A run directory shaped like metaplast.train's: metrics.csv and .hydra/config.yaml."""
    rng = np.random.default_rng(seed)
    depth = len(angles)
    rows = []
    for episode in range(episodes):
        for trial in range(trials):
            row = {"episode": episode, "trial": trial, "meta_loss": 1.5 - episode * 0.01}
            row["meta_loss_total"] = row["meta_loss"] + 0.001
            row["meta_acc"] = acc + 0.01 * episode + 0.02 * rng.random()
            terms = rule["terms"] if "terms" in rule else [0, 2]
            row.update({f"theta_{r}": (0.01 if r == 0 else -0.02) + 1e-4 * episode for r in terms})
            row.update({f"angle_{l}": a + rng.random() for l, a in enumerate(angles)})
            row.update({f"orth_{l + 1}": 100.0 / (l + 1) + rng.random() for l in range(depth)})
            rows.append(row)
    path.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(path / "metrics.csv", index=False)
    (path / ".hydra").mkdir()
    config = {
        "dataset": {"name": "glyphs"},
        "rule": {"terms": rule.get("name"), "per_layer": rule.get("per_layer")},
        "feedback": {"kind": feedback, "init": "xavier_uniform"},
        "reg": {"kind": reg, "lam": 0.001 if reg != "none" else 0.0},
    }
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def write_online_run(path, kind):
    rows = [
        {
            "sample": s,
            "trial": t,
            "acc": 0.1 + s / 2000 + 0.01 * t,
            "loss": 2.0,
            "angle_0": 80.0,
            "angle_1": 70.0,
        }
        for s in range(0, 1001, 100)
        for t in range(3)
    ]
    path.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(path / "online.csv", index=False)
    theta = {"terms": [0], "layer_terms": [[0], [0]], "theta": [0.01], "feedback": kind}
    (path / "theta.json").write_text(json.dumps(theta))
    return path


@pytest.fixture
def runs(tmp_path):
    fa = write_meta_run(tmp_path / "fa", {"name": "f0", "terms": [0]}, "fa", "none", [90, 80, 80, 80, 70])
    bp = write_meta_run(tmp_path / "bp", {"name": "f0", "terms": [0]}, "bp", "none", [0] * 5, acc=0.6)
    sweep = tmp_path / "multirun"
    for job, uses in enumerate(TABLE1_PAPER):
        per_layer = ["ehebb" if u else "f0" for u in uses]
        angles = [10.0 * job, 20.0 + job, 30.0 + job]
        write_meta_run(sweep / str(job), {"per_layer": per_layer}, "fa", "none", angles, seed=job)
    online = [write_online_run(tmp_path / f"online_{k}", k) for k in ("fa", "bp")]
    return [fa, bp, sweep, *online]


def test_report_writes_every_promised_file_and_index_links_only_existing_ones(runs, tmp_path, capsys):
    out = tmp_path / "report"
    fa, bp, sweep, *online = runs
    chosen = [fa, bp, sweep / "0", sweep / "6", *online]  # two Table 1 jobs keep the test short
    main([*map(str, chosen), "--out", str(out), "--window", "3", "--burn-in", "4", "--last", "5"])
    assert "index.html" in capsys.readouterr().out
    written = {p.name for p in out.iterdir()}
    promised = {"index.html", "meta_acc.png", "meta_loss.png", "summary.csv", "summary.md", "rules.txt"}
    promised |= {"theta_final.csv", "theta_final.md", "mann_whitney.png", "mann_whitney.csv"}
    promised |= {"table1.csv", "table1.md", "online_acc.png", "online.csv", "online.md"}
    assert promised <= written
    for prefix in ("theta_", "angle_", "orth_"):
        assert sum(n.startswith(prefix) and n.endswith(".png") for n in written) == 4  # one per meta run
    assert sum(n.startswith("online_angle_") for n in written) == 2
    page = (out / "index.html").read_text()
    linked = set(re.findall(r"(?:src|href)='([^']+)'", page))
    assert linked and linked <= written
    assert {n for n in written if n.endswith(".png")} <= linked


def test_table1_averages_angles_after_the_burn_in_next_to_the_papers(runs, tmp_path):
    out = tmp_path / "report"
    main([str(runs[2]), "--out", str(out), "--burn-in", "4"])
    table = pd.read_csv(out / "table1.csv")
    assert len(table) == 7
    assert table["eHebb in"].tolist()[:3] == ["none", "W1,2", "W2,3"]
    for job, uses in enumerate(TABLE1_PAPER):
        frame = pd.read_csv(runs[2] / str(job) / "metrics.csv")
        row = table.iloc[job]
        assert row["α_1"] == pytest.approx(frame.loc[frame["episode"] >= 4, "angle_1"].mean())
        assert (row["paper α_0"], row["paper α_1"], row["paper α_2"]) == TABLE1_PAPER[uses]


def test_final_theta_table_and_mann_whitney_csv(runs, tmp_path):
    out = tmp_path / "report"
    main([str(runs[0]), str(runs[1]), "--out", str(out)])
    theta = pd.read_csv(out / "theta_final.csv")
    last = pd.read_csv(runs[0] / "metrics.csv").query("episode == 11")
    assert theta.loc[0, "mean"] == pytest.approx(last["theta_0"].mean())
    p = pd.read_csv(out / "mann_whitney.csv")
    fa, bp = (pd.read_csv(r / "metrics.csv") for r in runs[:2])
    expected = scipy_stats.mannwhitneyu(
        bp.query("episode == 5")["meta_acc"], fa.query("episode == 5")["meta_acc"], alternative="greater"
    ).pvalue
    assert p.loc[p["episode"] == 5, "p"].item() == pytest.approx(expected)


def test_report_names_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(SystemExit, match="is not a run directory"):
        main([str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="--window=0 is not allowed"):
        main([str(tmp_path), "--out", str(tmp_path / "out"), "--window", "0"])
