"""Statistics against scipy and exact values; the report writes every promised file, its figures
carry what a talk needs (mathtext, chance and 90° lines, small multiples, captions) and the rule
reads as an equation."""

import json
import re
from math import comb

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.mathtext import MathTextParser
from scipy import stats as scipy_stats

from metaplast.analysis import report
from metaplast.analysis.report import TABLE1_PAPER, main, rule_equation, term_key
from metaplast.analysis.stats import (
    bootstrap_ci,
    bootstrap_ci_rows,
    mann_whitney,
    mann_whitney_per_episode,
    moving_average,
    summarise,
    trial_curves,
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


def test_bootstrap_ci_rows_is_bootstrap_ci_of_each_rows_finite_values():
    rng = np.random.default_rng(4)
    rows = rng.random((40, 12))
    rows[rng.random(rows.shape) < 0.15] = np.nan  # diverged trial-episodes
    rows[3] = 0.5  # no spread
    rows[5, 0], rows[5, 1:] = 0.3, np.nan  # one value
    rows[7] = np.nan  # none
    low, high = bootstrap_ci_rows(rows)
    for row, lo, hi in zip(rows, low, high):
        values = row[np.isfinite(row)]
        if values.size == 0:
            assert np.isnan(lo) and np.isnan(hi)
        else:
            assert (lo, hi) == pytest.approx(bootstrap_ci(values), rel=1e-12, abs=1e-15)
    assert (low[3], high[3]) == (0.5, 0.5) and low[5] == high[5] == rows[5, 0]


def test_moving_average_and_summary():
    values = np.arange(10.0)
    expected = np.convolve(values, np.ones(3) / 3, mode="valid")
    assert np.allclose(moving_average(values, 3)[2:], expected)
    assert moving_average(values, 3)[:2].tolist() == [0.0, 0.5]
    frame = pd.DataFrame({"episode": np.repeat([0, 1], 10), "x": np.concatenate([SAMPLE, SAMPLE + 1])})
    table = summarise(frame, "x")
    assert table["mean"].tolist() == pytest.approx([SAMPLE.mean(), SAMPLE.mean() + 1])
    assert (table["low"].iloc[0], table["high"].iloc[0]) == pytest.approx(bootstrap_ci(SAMPLE), rel=1e-12)
    with pytest.raises(ValueError, match="window=0 is not allowed"):
        moving_average(values, 0)
    with pytest.raises(ValueError, match="needs a 'trial' column"):
        summarise(frame, "x", window=2)


def test_the_ci_is_computed_on_the_smoothed_per_trial_curves_not_smoothed_afterwards():
    rng = np.random.default_rng(2)
    episodes, trials, window = 15, 6, 4
    frame = pd.DataFrame(
        [
            {"episode": e, "trial": t, "x": rng.normal(t * 0.1, 1.0)}
            for e in range(episodes)
            for t in range(trials)
        ]
    )
    frame.loc[(frame["episode"] == 9) & (frame["trial"] == 2), "x"] = np.nan  # a diverged episode
    table = summarise(frame, "x", window=window)
    curves = {
        t: np.array(moving_average(g.sort_values("episode")["x"], window)) for t, g in frame.groupby("trial")
    }
    curves[2][9] = np.nan  # no value where the trial diverged
    for episode in range(episodes):
        values = np.array([curves[t][episode] for t in range(trials)])
        values = values[np.isfinite(values)]
        row = table.iloc[episode]
        assert row["n"] == values.size == (5 if episode == 9 else 6)
        assert row["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert (row["low"], row["high"]) == pytest.approx(bootstrap_ci(values), rel=1e-12)
    # Smoothing the bounds afterwards (the old way) gives other, narrower-looking bands.
    raw = summarise(frame, "x", window=1)
    assert not np.allclose(moving_average(raw["low"], window), table["low"])
    assert trial_curves(frame, "x", window=window).shape == (episodes, trials)


def test_rule_reads_as_an_equation_with_readable_coefficients():
    theta_l1 = {0: 0.978e-2, 1: 0.075e-2, 2: -2.361e-2, 3: 0.0, 4: 0.087e-2}
    theta_l1.update({5: 0.026e-2, 6: 0.019e-2, 7: 0.031e-2, 8: -0.064e-2, 9: 0.415e-2})
    assert rule_equation(theta_l1) == "ΔW = 0.0098 F⁰ − 0.0236 F² + 0.0042 F⁹"  # Table S1, L1
    assert rule_equation({0: -0.5, 3: 0.25}, keep=0.6) == "ΔW = −0.500 F⁰"
    assert rule_equation({0: 3e-6, 2: -1e-6}) == "ΔW = 10⁻⁶ × (3.00 F⁰ − 1.00 F²)"
    assert rule_equation({0: 0.0, 2: 0.0}) == "ΔW = 0"
    assert rule_equation({0: float("nan"), 2: 0.1}).startswith("ΔW = ? (non-finite Θ")
    assert rule_equation({10: 0.02}) == "ΔW = 0.0200 F¹⁰"
    assert term_key([9, 0, 2]) == [
        "F⁰ = −e_ℓ y_{ℓ−1}ᵀ",
        "F² = −e_ℓ e_{ℓ−1}ᵀ",
        "F⁹ = y_ℓ y_{ℓ−1}ᵀ − y_ℓ y_ℓᵀ W",
    ]


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
        "meta": {"M": 5, "K": 50, "Q": 10, "trials": trials, "episodes": episodes},
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
    theta = {"terms": [0], "layer_terms": [[0], [0]], "theta": [0.01], "feedback": kind, "dataset": "mnist"}
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


@pytest.fixture
def figures(monkeypatch):
    """What each saved figure shows: per file name, its visible axes' titles, lines and legend labels."""
    seen = {}
    real = report.save_figure

    def record(fig, path, **kwargs):
        axes = [ax for ax in fig.axes if ax.get_visible()]
        seen[path.name] = {
            "panels": len(axes),
            "suptitle": fig._suptitle.get_text() if fig._suptitle else "",
            "titles": [ax.get_title() for ax in axes],
            "ylabels": [ax.get_ylabel() for ax in axes]
            + ([fig._supylabel.get_text()] if fig._supylabel else []),
            "hlines": [
                {
                    float(y[0])
                    for line in ax.get_lines()
                    if len(y := list(line.get_ydata())) == 2 and y[0] == y[1]
                }
                for ax in axes
            ],
            "labels": [t.get_text() for ax in axes if ax.get_legend() for t in ax.get_legend().get_texts()],
        }
        real(fig, path, **kwargs)

    monkeypatch.setattr(report, "save_figure", record)
    return seen


def test_report_writes_every_promised_file_and_index_links_only_existing_ones(runs, tmp_path, capsys):
    out = tmp_path / "report"
    fa, bp, sweep, *online = runs
    chosen = [fa, bp, sweep / "0", sweep / "6", *online]  # two Table 1 jobs keep the test short
    main([*map(str, chosen), "--out", str(out), "--window", "3", "--burn-in", "4", "--last", "5"])
    assert "index.html" in capsys.readouterr().out
    written = {p.name for p in out.iterdir()}
    promised = {"index.html", "meta_acc.png", "meta_loss.png", "summary.csv", "summary.md", "rules.txt"}
    promised |= {"theta_final.csv", "theta_final.md", "mann_whitney.png", "mann_whitney.csv"}
    promised |= {"table1.csv", "table1.md", "online_acc.png", "online_accuracy.csv", "online_accuracy.md"}
    assert promised <= written
    for prefix in ("theta_", "angle_", "orth_"):
        assert sum(n.startswith(prefix) and n.endswith(".png") for n in written) == 4  # one per meta run
    assert sum(n.startswith("online_angle_") for n in written) == 2
    page = (out / "index.html").read_text()
    linked = set(re.findall(r"(?:src|href)='([^'#]+)'", page))
    assert linked and linked <= written
    assert {n for n in written if n.endswith(".png")} <= linked


def test_a_report_of_online_runs_can_be_rerun_into_its_own_directory(runs, tmp_path):
    """The report's own tables never look like a run (an online run's table is online.csv)."""
    out = tmp_path / "report"
    online = [str(r) for r in runs[4:]]
    main([*online, "--out", str(out)])
    first = (out / "online_accuracy.csv").read_text()
    main([*online, "--out", str(out)])  # again, into the same directory
    assert (out / "online_accuracy.csv").read_text() == first and not (out / "online.csv").exists()


def test_index_has_a_header_and_a_caption_for_every_figure(runs, tmp_path):
    out = tmp_path / "report"
    fa, bp = runs[:2]
    argv = [str(fa), str(bp), str(runs[3]), "--out", str(out), "--window", "3"]
    main(argv)
    page = (out / "index.html").read_text()
    header = page.split("</header>")[0]
    assert "python -m metaplast.report " + " ".join(argv).replace(str(tmp_path), str(tmp_path)) in header
    for path in (fa, bp, runs[3]):
        assert str(path) in header
    assert "glyphs (SYNTHETIC)" in header and "mnist" in header
    assert "5-way, K = 50, Q = 10, 12 episodes" in header and "online, one pass over 1000" in header
    figures = re.findall(r"<figure><img src='([^']+)'[^>]*><figcaption>([^<]+)</figcaption></figure>", page)
    assert {name for name, _ in figures} == {p.name for p in out.glob("*.png")}
    for name, caption in figures:
        if name.startswith(("meta_", "theta_", "angle_", "orth_")):
            assert "5-way, K = 50, Q = 10" in caption and "glyphs (SYNTHETIC)" in caption, name
            assert "n = 4 trials" in caption, name
            assert "98 % bootstrap CI of the mean (500 resamples)" in caption, name
            assert "moving average over 3 episodes (the CI is computed after smoothing)" in caption, name
    captions = dict(figures)
    assert "Dashed: chance, 1/M (M = 5)" in captions["meta_acc.png"]
    assert (
        "Dashed: chance, 1/10" in captions["online_acc.png"] and "n = 3 trials" in captions["online_acc.png"]
    )
    assert page.count("<table") == 3 + 1  # header, summary, final Θ; online
    assert "ΔW = 0.0111 F⁰" in page and "F⁰ = −e_ℓ y_{ℓ−1}ᵀ" in page


PREFIXES = ("theta_", "angle_", "orth_", "online_angle_")


def test_figures_have_mathtext_chance_and_90_degree_lines(runs, tmp_path, figures):
    fa, bp = runs[:2]
    main([str(fa), str(bp), str(runs[3]), "--out", str(tmp_path / "report")])
    parser = MathTextParser("path")
    accuracy = figures["meta_acc.png"]
    assert accuracy["panels"] == 1 and {0.2} in accuracy["hlines"]  # chance, 1/M with M = 5
    assert "chance (1/5)" in accuracy["labels"]
    assert "n = 4 trials per run" in accuracy["titles"][0] and "5-way" in accuracy["titles"][0]
    assert {0.1} in figures["online_acc.png"]["hlines"]  # 10 classes
    assert not any(figures["meta_loss.png"]["hlines"][0])
    first = {prefix: next(v for k, v in figures.items() if k.startswith(prefix)) for prefix in PREFIXES}
    theta = first["theta_"]
    assert theta["ylabels"] == [r"$\theta_r$"] and theta["labels"] == [r"$\theta_{0}$"]
    angle = first["angle_"]
    assert {90.0} in angle["hlines"] and angle["ylabels"] == [r"$\alpha_\ell$ (degrees)"]
    assert angle["labels"][0] == r"$\alpha_{0}$ (input layer)"
    assert angle["labels"][4] == r"$\alpha_{4}$ (last hidden layer)"
    assert {90.0} in first["online_angle_"]["hlines"]
    orth = first["orth_"]
    assert (
        orth["labels"][0] == r"$E_{W,1}$ (input side)" and orth["labels"][-1] == r"$E_{W,5}$ (output layer)"
    )
    for figure in figures.values():
        for text in figure["ylabels"] + figure["labels"]:
            if "$" in text:
                parser.parse(text)  # valid mathtext, rendered as math


def test_more_than_three_runs_are_small_multiples(runs, tmp_path, figures):
    sweep = runs[2]
    main([str(sweep / str(job)) for job in range(5)] + ["--out", str(tmp_path / "report"), "--burn-in", "2"])
    accuracy = figures["meta_acc.png"]
    assert accuracy["panels"] == 5  # one per run; the sixth cell of the 2 × 3 grid is hidden
    assert all(0.2 in lines for lines in accuracy["hlines"])
    assert (
        accuracy["titles"][:2] == ["f0 FA", "[f0,ehebb,f0] FA"]
        and "n = 4 trials per run" in accuracy["suptitle"]
    )
    assert figures["mann_whitney.png"]["panels"] == 4  # four comparisons with the first run
    assert figures["meta_loss.png"]["panels"] == 5
    few = {**figures}
    figures.clear()
    main([str(sweep / str(job)) for job in range(3)] + ["--out", str(tmp_path / "few"), "--burn-in", "2"])
    assert figures["meta_acc.png"]["panels"] == 1 and few["meta_acc.png"]["panels"] == 5


def test_a_run_whose_every_trial_diverged_is_reported_without_numbers(runs, tmp_path):
    frame = pd.read_csv(runs[0] / "metrics.csv")
    for column in ("meta_acc", "meta_loss", "meta_loss_total", "angle_0", "orth_1"):
        frame[column] = np.nan
    frame["meta_diverged"] = 1
    frame.to_csv(runs[0] / "metrics.csv", index=False)
    out = tmp_path / "report"
    main([str(runs[0]), str(runs[1]), "--out", str(out)])
    summary = pd.read_csv(out / "summary.csv")
    assert summary.loc[0, "trials scored"] == 0 and np.isnan(summary.loc[0, "meta_acc"])
    assert summary.loc[0, "trials ever diverged"] == 4
    assert summary.loc[1, "trials scored"] == 4
    assert (out / "meta_acc.png").stat().st_size > 1000


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


def test_summary_is_the_mean_over_each_trials_last_n_episodes(runs, tmp_path):
    out = tmp_path / "report"
    main([str(runs[0]), "--out", str(out), "--last", "4"])
    summary = pd.read_csv(out / "summary.csv")
    frame = pd.read_csv(runs[0] / "metrics.csv")
    per_trial = frame[frame["episode"] >= 8].groupby("trial")["meta_acc"].mean()
    assert summary.loc[0, "last"] == 4 and summary.loc[0, "meta_acc"] == pytest.approx(per_trial.mean())
    assert (summary.loc[0, "meta_acc_low"], summary.loc[0, "meta_acc_high"]) == pytest.approx(
        bootstrap_ci(per_trial.to_numpy())
    )
    main([str(runs[0]), "--out", str(tmp_path / "default")])  # the run's objective.last: 10 by default
    assert pd.read_csv(tmp_path / "default" / "summary.csv").loc[0, "last"] == 10


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
    rules = (out / "rules.txt").read_text().splitlines()
    assert rules[0].startswith("f0 FA: ΔW = ") and rules[-2:] == ["where", "F⁰ = −e_ℓ y_{ℓ−1}ᵀ"]


def test_report_names_a_directory_that_is_not_a_run(tmp_path, capsys):
    for extra in ([], ["--window", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main([str(tmp_path), "--out", str(tmp_path / "out"), *extra])
        assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert "is not a run directory" in lines[0] and "--window=0 is not allowed" in lines[1]
