"""Bad inputs to ``metaplast.report`` and ``metaplast.sweep``: every one ends in a one-line message
naming the value and what is allowed, with exit code 2 — never a traceback, never silent nonsense.

Classes: options (values out of range, NaN, wrong types, output paths that are files, run
directories or cannot be created), run directories (missing, files, empty or garbage tables,
missing or non-numeric columns, out-of-range values, duplicated rows, garbage config, result.json,
checkpoint, theta.json), unreadable files, sweep directories and jobs; and a seeded fuzzer that
damages a valid metrics.csv at random.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from metaplast.analysis import report, sweep
from test_report import write_meta_run, write_online_run


def outcome(main, argv, capsys) -> tuple[int, list[str], str]:
    """Exit code, stderr lines and stdout of ``main(argv)`` run in this process."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.err.splitlines(), captured.out


def assert_clean_error(code, lines, prog="metaplast.report", *fragments):
    assert code == 2, lines
    errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, lines
    assert not any("Traceback" in line for line in lines), lines
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A small valid meta-training run and a valid online evaluation."""
    base = tmp_path_factory.mktemp("good")
    meta = write_meta_run(
        base / "meta", {"name": "f0", "terms": [0]}, "fa", "none", [90, 80], episodes=4, trials=2
    )
    online = write_online_run(base / "online", "fa")
    return meta, online


def copy_run(good, tmp_path, name="run"):
    path = tmp_path / name
    shutil.copytree(good[0], path)
    return path


# ---------------------------------------------------------------- options

OPTIONS = {
    "keep nan": (["--keep", "nan"], "--keep=nan is not allowed; allowed: a number in [0, 1]"),
    "keep inf": (["--keep", "inf"], "--keep=inf is not allowed"),
    "keep -inf": (["--keep=-inf"], "--keep=-inf is not allowed"),
    "keep negative": (["--keep", "-0.1"], "--keep=-0.1 is not allowed"),
    "keep above 1": (["--keep", "1.5"], "--keep=1.5 is not allowed"),
    "keep text": (["--keep", "all"], "argument --keep: invalid float value: 'all'"),
    "burn-in negative": (["--burn-in", "-5"], "--burn-in=-5 is not allowed; allowed: an integer in [0,"),
    "burn-in huge": (["--burn-in", str(10**30)], "--burn-in=1000000000000000000000000000000 is not allowed"),
    "burn-in float": (["--burn-in", "2.5"], "argument --burn-in: invalid int value: '2.5'"),
    "window zero": (["--window", "0"], "--window=0 is not allowed; allowed: an integer in [1,"),
    "window negative": (["--window", "-3"], "--window=-3 is not allowed"),
    "window huge": (["--window", str(10**20)], "--window=100000000000000000000 is not allowed"),
    "window nan": (["--window", "nan"], "argument --window: invalid int value: 'nan'"),
    "last zero": (["--last", "0"], "--last=0 is not allowed; allowed: an integer in [1,"),
    "last negative": (["--last", "-10"], "--last=-10 is not allowed"),
    "last text": (["--last", "ten"], "argument --last: invalid int value: 'ten'"),
    "unknown option": (["--colour", "red"], "unrecognized arguments: --colour red"),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_report_options_out_of_range(name, good, tmp_path, capsys):
    extra, message = OPTIONS[name]
    code, lines, _ = outcome(report.main, [good[0], "--out", tmp_path / "out", *extra], capsys)
    assert_clean_error(code, lines, "metaplast.report", message)
    assert not (tmp_path / "out" / "index.html").exists()


def out_paths(good, tmp_path):
    """Output paths a report must refuse, with what its message says."""
    (tmp_path / "a_file").write_text("not a directory")
    other = copy_run(good, tmp_path, "other_run")
    hydra_only = tmp_path / "hydra_job"
    (hydra_only / ".hydra").mkdir(parents=True)
    return {
        "an existing file": (tmp_path / "a_file", "exists and is not a directory"),
        "below a file": (tmp_path / "a_file" / "sub", "cannot be created: Not a directory"),
        "empty": ("", "--out is empty"),
        "blank": ("   ", "--out is empty"),
        "the run itself": (good[0], "is one of the run directories given"),
        "another run": (other, "is a run directory"),
        "a Hydra job": (hydra_only, "is a run directory"),
        "an online run": (good[1], "is a run directory"),
        "under /proc": ("/proc/metaplast-report", "cannot be created"),
    }


@pytest.mark.parametrize(
    "name",
    [
        "an existing file",
        "below a file",
        "empty",
        "blank",
        "the run itself",
        "another run",
        "a Hydra job",
        "an online run",
        "under /proc",
    ],
)
def test_report_refuses_an_output_path(name, good, tmp_path, capsys):
    out, message = out_paths(good, tmp_path)[name]
    before = {p: p.read_bytes() for p in good[0].rglob("*") if p.is_file()}
    code, lines, _ = outcome(report.main, [good[0], "--out", out], capsys)
    assert_clean_error(code, lines, "metaplast.report", message)
    assert {p: p.read_bytes() for p in good[0].rglob("*") if p.is_file()} == before  # nothing overwritten


# ---------------------------------------------------------------- run directories


def table(path, text: str | bytes):
    target = path / "metrics.csv"
    target.write_bytes(text if isinstance(text, bytes) else text.encode())


RUNS = {
    "empty metrics.csv": (lambda p: table(p, ""), "metrics.csv' is empty (not even a header line)"),
    "header only": (lambda p: table(p, "episode,trial,meta_acc\n"), "its metrics.csv has no rows yet"),
    "binary garbage": (
        lambda p: table(p, b"\xff\xfe\x00\x80\x81garbage\n\x00"),
        "is not a readable CSV table",
    ),
    "unterminated quote": (lambda p: table(p, 'a,b\n"open\n1,2\n'), "is not a readable CSV table"),
    "ragged rows": (lambda p: table(p, "episode,trial,meta_acc\n0,0,0.5\n1,0,0.5,9,9,9\n"), "not a readable"),
    "no episode column": (lambda p: table(p, "trial,meta_acc\n0,0.5\n"), "has no column 'episode'"),
    "no trial column": (lambda p: table(p, "episode,meta_acc\n0,0.5\n"), "has no column 'trial'"),
    "no meta_acc column": (lambda p: table(p, "episode,trial,theta_0\n0,0,0.1\n"), "has no meta_acc column"),
    "text accuracy": (
        lambda p: table(p, "episode,trial,meta_acc\n0,0,high\n"),
        "column 'meta_acc' holds 'high'",
    ),
    "text episode": (
        lambda p: table(p, "episode,trial,meta_acc\nfirst,0,0.5\n"),
        "column 'episode' holds 'first'",
    ),
    "negative episode": (lambda p: table(p, "episode,trial,meta_acc\n-1,0,0.5\n"), "'episode' holds -1"),
    "fractional trial": (lambda p: table(p, "episode,trial,meta_acc\n0,0.5,0.5\n"), "'trial' holds 0.5"),
    "empty trial": (lambda p: table(p, "episode,trial,meta_acc\n0,,0.5\n"), "'trial' holds nan"),
    "huge episode": (
        lambda p: table(p, "episode,trial,meta_acc\n1e20,0,0.5\n"),
        "allowed: integers in [0, 2^31)",
    ),
    "accuracy above 1": (lambda p: table(p, "episode,trial,meta_acc\n0,0,1.5\n"), "'meta_acc' holds 1.5"),
    "infinite accuracy": (lambda p: table(p, "episode,trial,meta_acc\n0,0,inf\n"), "'meta_acc' holds inf"),
    "negative accuracy": (lambda p: table(p, "episode,trial,meta_acc\n0,0,-0.1\n"), "'meta_acc' holds -0.1"),
    "angle of 400 degrees": (
        lambda p: table(p, "episode,trial,meta_acc,angle_0\n0,0,0.5,400\n"),
        "'angle_0' holds 400 (line 2); allowed: numbers in [0, 180]",
    ),
    "duplicated rows": (
        lambda p: table(p, "episode,trial,meta_acc\n0,0,0.5\n0,0,0.5\n"),
        "more than one row for episode 0, trial 0",
    ),
    "no Θ anywhere": (lambda p: table(p, "episode,trial,meta_acc\n0,0,0.5\n"), "has no final Θ"),
    "metrics.csv is a directory": (
        lambda p: ((p / "metrics.csv").unlink(), (p / "metrics.csv").mkdir()),
        "metrics.csv' is not a regular file",
    ),
    "garbage config.yaml": (
        lambda p: (p / ".hydra" / "config.yaml").write_text("a: [unclosed\n  - {"),
        "config.yaml' cannot be read as YAML",
    ),
    "config.yaml a list": (
        lambda p: (p / ".hydra" / "config.yaml").write_text("- 1\n"),
        "holds a list, not a dict",
    ),
    "garbage result.json": (
        lambda p: (p / "result.json").write_text("{nope"),
        "result.json' cannot be read as JSON",
    ),
    "result.json a list": (
        lambda p: (p / "result.json").write_text("[1]"),
        "holds a JSON list, not an object",
    ),
    "result.json without Θ": (lambda p: (p / "result.json").write_text("{}"), "has no readable Θ"),
    "result.json Θ of another shape": (
        lambda p: (p / "result.json").write_text(
            json.dumps({"theta": [[1, 2]], "terms": [0], "trials": [0, 1]})
        ),
        "does not match its 2 trials and 1 terms",
    ),
    "result.json Θ of text": (
        lambda p: (p / "result.json").write_text(json.dumps({"theta": "big", "terms": [0], "trials": [0]})),
        "has no readable Θ",
    ),
    "garbage last.ckpt": (
        lambda p: ((p / "checkpoints").mkdir(), (p / "checkpoints" / "last.ckpt").write_bytes(b"PK garbage")),
        "last.ckpt' cannot be read as a checkpoint",
    ),
    "empty last.ckpt": (
        lambda p: ((p / "checkpoints").mkdir(), (p / "checkpoints" / "last.ckpt").write_bytes(b"")),
        "last.ckpt' cannot be read as a checkpoint",
    ),
    "objective.last of 0 in the config": (
        lambda p: (p / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"objective": {"last": 0}})),
        "objective.last=0 in its config",
    ),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_report_on_a_damaged_run_directory(name, good, tmp_path, capsys):
    damage, message = RUNS[name]
    path = copy_run(good, tmp_path)
    damage(path)
    code, lines, _ = outcome(report.main, [path, "--out", tmp_path / "out"], capsys)
    assert_clean_error(code, lines, "metaplast.report", message)


ONLINE = {
    "garbage theta.json": (
        lambda p: (p / "theta.json").write_text("{"),
        "theta.json' cannot be read as JSON",
    ),
    "theta.json a number": (lambda p: (p / "theta.json").write_text("3"), "holds a JSON int, not an object"),
    "no acc column": (
        lambda p: (p / "online.csv").write_text("sample,trial,loss\n0,0,1\n"),
        "has no acc column",
    ),
    "no sample column": (
        lambda p: (p / "online.csv").write_text("trial,acc\n0,0.5\n"),
        "has no column 'sample'",
    ),
    "accuracy of 2": (lambda p: (p / "online.csv").write_text("sample,trial,acc\n0,0,2\n"), "'acc' holds 2"),
    "empty online.csv": (lambda p: (p / "online.csv").write_text(""), "online.csv' is empty"),
}


@pytest.mark.parametrize("name", list(ONLINE))
def test_report_on_a_damaged_online_evaluation(name, good, tmp_path, capsys):
    damage, message = ONLINE[name]
    path = tmp_path / "online"
    shutil.copytree(good[1], path)
    damage(path)
    code, lines, _ = outcome(report.main, [path, "--out", tmp_path / "out"], capsys)
    assert_clean_error(code, lines, "metaplast.report", message)


def where(tmp_path, name):
    """Paths that are not run directories."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    return {
        "missing": (tmp_path / "missing", "does not exist"),
        "a file": (tmp_path / "a_file", "is not a run directory"),
        "an empty directory": (tmp_path / "empty", "is not a run directory"),
        "a symlink loop": (tmp_path / "loop", "does not exist"),
        "a dangling symlink": (tmp_path / "dangling", "does not exist"),
    }[name]


@pytest.mark.parametrize(
    "name", ["missing", "a file", "an empty directory", "a symlink loop", "a dangling symlink"]
)
def test_report_on_a_path_that_is_not_a_run(name, tmp_path, capsys):
    path, message = where(tmp_path, name)
    code, lines, _ = outcome(report.main, [path, "--out", tmp_path / "out"], capsys)
    assert_clean_error(code, lines, "metaplast.report", message)


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(13, "Permission denied", "metrics.csv"),
        OSError(5, "Input/output error", "metrics.csv"),
    ],
    ids=["permission denied", "I/O error"],
)
def test_an_unreadable_table_is_one_line(error, good, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(pd, "read_csv", refuse)
    code, lines, _ = outcome(report.main, [good[0], "--out", tmp_path / "out"], capsys)
    assert_clean_error(code, lines, "metaplast.report", error.strerror)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_a_table_without_read_permission_is_one_line(good, tmp_path, capsys):
    path = copy_run(good, tmp_path)
    (path / "metrics.csv").chmod(0)
    code, lines, _ = outcome(report.main, [path, "--out", tmp_path / "out"], capsys)
    assert_clean_error(code, lines, "metaplast.report", "Permission denied")


def test_an_unexpected_failure_is_one_line_unless_verbose(good, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(report, "summary_table", broken)
    code, lines, _ = outcome(report.main, [good[0], "--out", tmp_path / "out"], capsys)
    assert_clean_error(code, lines, "metaplast.report", "unexpected RuntimeError: a bug", "--verbose")
    with pytest.raises(RuntimeError, match="a bug"):
        report.main([str(good[0]), "--out", str(tmp_path / "out"), "--verbose"])


# ---------------------------------------------------------------- runs that are odd but valid


def test_a_run_whose_every_trial_diverged(good, tmp_path, capsys):
    path = copy_run(good, tmp_path)
    frame = pd.read_csv(path / "metrics.csv")
    for column in [c for c in frame if c not in ("episode", "trial") and not c.startswith("theta_")]:
        frame[column] = np.nan
    frame["meta_diverged"] = 1
    frame.to_csv(path / "metrics.csv", index=False)
    code, lines, out = outcome(report.main, [path, "--out", tmp_path / "out"], capsys)
    assert code == 0 and not lines, lines
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert summary.loc[0, "trials scored"] == 0 and summary.loc[0, "trials ever diverged"] == 2


def test_a_run_with_one_episode_and_one_trial(tmp_path, capsys):
    path = write_meta_run(
        tmp_path / "tiny", {"name": "f0", "terms": [0]}, "fa", "none", [90], episodes=1, trials=1
    )
    code, lines, _ = outcome(report.main, [path, "--out", tmp_path / "out", "--window", "50"], capsys)
    assert code == 0 and not lines, lines


# ---------------------------------------------------------------- sweeps


def write_job(directory, result="valid", config=None, overrides=("reg.lam=0",)):
    (directory / ".hydra").mkdir(parents=True)
    (directory / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config or {"meta": {"M": 5}}))
    (directory / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    if result == "valid":
        result = json.dumps({"theta": [[0.01]], "terms": [0], "trials": [0], "meta_acc": [0.5], "last": 10})
    if result is not None:
        (directory / "result.json").write_text(result)
    return directory


SWEEP_OPTIONS = {
    "threshold nan": (["--threshold", "nan"], "--threshold=nan is not allowed; allowed: a number >= 0"),
    "threshold inf": (["--threshold", "inf"], "--threshold=inf is not allowed"),
    "threshold negative": (["--threshold=-1e-3"], "--threshold=-0.001 is not allowed"),
    "threshold text": (["--threshold", "small"], "argument --threshold: invalid float value: 'small'"),
    "last zero": (["--last", "0"], "--last=0 is not allowed; allowed: an integer >= 1"),
    "last float": (["--last", "1.5"], "argument --last: invalid int value: '1.5'"),
    "unknown option": (["--best"], "unrecognized arguments: --best"),
}


@pytest.mark.parametrize("name", list(SWEEP_OPTIONS))
def test_sweep_options_out_of_range(name, tmp_path, capsys):
    write_job(tmp_path / "sweep" / "0")
    extra, message = SWEEP_OPTIONS[name]
    code, lines, _ = outcome(sweep.main, [tmp_path / "sweep", "--out", tmp_path / "out", *extra], capsys)
    assert_clean_error(code, lines, "metaplast.sweep", message)


SWEEP_DIRS = {
    "missing": (lambda t: t / "missing", "is not a directory"),
    "a file": (lambda t: (t / "f").write_text("x") or t / "f", "is not a directory"),
    "no jobs": (lambda t: (t / "e").mkdir() or t / "e", "no Hydra job directory (with .hydra/) under"),
    "only unfinished jobs": (
        lambda t: write_job(t / "s" / "0", result=None).parent,
        "no finished, readable job",
    ),
    "only a garbage result.json": (
        lambda t: write_job(t / "s" / "0", "{").parent,
        "no finished, readable job",
    ),
    "only a result.json list": (
        lambda t: write_job(t / "s" / "0", "[]").parent,
        "(1 left out, see the warnings)",
    ),
    "only a result.json without accuracy": (
        lambda t: (
            write_job(t / "s" / "0", json.dumps({"theta": [[1.0]], "terms": [0], "trials": [0]})).parent
        ),
        "no finished, readable job",
    ),
    "only a garbage config.yaml": (
        lambda t: (
            (job := write_job(t / "s" / "0"), (job / ".hydra" / "config.yaml").write_text("{[")) and t / "s"
        ),
        "no finished, readable job",
    ),
    "only a garbage overrides.yaml": (
        lambda t: (
            (job := write_job(t / "s" / "0"), (job / ".hydra" / "overrides.yaml").write_text("{["))
            and t / "s"
        ),
        "no finished, readable job",
    ),
}


@pytest.mark.parametrize("name", list(SWEEP_DIRS))
def test_sweep_on_directories_without_usable_jobs(name, tmp_path, capsys):
    make, message = SWEEP_DIRS[name]
    directory = make(tmp_path)
    code, lines, _ = outcome(sweep.main, [directory, "--out", tmp_path / "out"], capsys)
    assert_clean_error(code, lines, "metaplast.sweep", message)


def test_sweep_refuses_an_output_file_and_skips_an_unreadable_job_by_name(tmp_path, capsys, caplog):
    write_job(tmp_path / "s" / "0")
    write_job(tmp_path / "s" / "1", "{")  # garbage: left out, named in a warning
    (tmp_path / "file").write_text("x")
    code, lines, _ = outcome(sweep.main, [tmp_path / "s", "--out", tmp_path / "file"], capsys)
    assert_clean_error(code, lines, "metaplast.sweep", "exists and is not a directory")
    code, lines, out = outcome(sweep.main, [tmp_path / "s", "--out", tmp_path / "out"], capsys)
    assert code == 0 and "| 0.5" in out.replace("0.500", "0.5")
    assert any(
        "skipped job" in r.message and "result.json' cannot be read as JSON" in r.message
        for r in caplog.records
    )
    assert pd.read_csv(tmp_path / "out" / "sweep.csv")["jobs"].tolist() == [1]


def test_report_of_a_multirun_with_only_garbage_jobs_is_one_line(good, tmp_path, capsys):
    multirun = tmp_path / "multirun"
    (multirun).mkdir()
    (multirun / "multirun.yaml").write_text("hydra: {}\n")
    job = copy_run(good, multirun, "0")
    (job / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    (job / "result.json").write_text("{")
    code, lines, _ = outcome(report.main, [multirun, "--out", tmp_path / "out"], capsys)
    assert_clean_error(code, lines, "metaplast.report", "result.json' cannot be read as JSON")


# ---------------------------------------------------------------- a fuzzer


def mutations(text: str, rng: np.random.Generator) -> str:
    """One random kind of damage to a CSV's text."""
    lines = text.splitlines(keepends=True)
    kind = rng.integers(7)
    if kind == 0:  # truncated at a random byte
        return text[: rng.integers(len(text))]
    if kind == 1:  # a random cell replaced by junk
        row = rng.integers(len(lines))
        cells = lines[row].rstrip("\n").split(",")
        cells[rng.integers(len(cells))] = str(rng.choice(["x", "", "nan", "-inf", "1e400", "-7", "0x1", "ü"]))
        lines[row] = ",".join(cells) + "\n"
        return "".join(lines)
    if kind == 2:  # a column dropped from the header only
        cells = lines[0].rstrip("\n").split(",")
        del cells[rng.integers(len(cells))]
        lines[0] = ",".join(cells) + "\n"
        return "".join(lines)
    if kind == 3:  # rows shuffled and one repeated
        body = lines[1:]
        rng.shuffle(body)
        return "".join([lines[0], *body, body[0]])
    if kind == 4:  # random bytes spliced in
        at = rng.integers(len(text))
        junk = "".join(chr(c) for c in rng.integers(0, 0x3000, 8))
        return text[:at] + junk + text[at:]
    if kind == 5:  # a row cut short
        row = rng.integers(1, len(lines))
        lines[row] = lines[row][: rng.integers(1, len(lines[row]))] + "\n"
        return "".join(lines)
    return "".join(lines[:1])  # header only


@pytest.mark.parametrize("seed", range(24))
def test_fuzzed_metrics_csv_ends_in_a_report_or_one_line(seed, good, tmp_path, capsys):
    path = copy_run(good, tmp_path)
    text = (path / "metrics.csv").read_text()
    rng = np.random.default_rng(seed)
    (path / "metrics.csv").write_text(mutations(text, rng), encoding="utf-8", errors="replace")
    code, lines, _ = outcome(report.main, [path, "--out", tmp_path / "out"], capsys)
    if code == 0:
        assert (tmp_path / "out" / "index.html").exists() and not lines, lines
    else:
        message = assert_clean_error(code, lines, "metaplast.report")
        assert "unexpected" not in message, message  # every damage found is named, not a bug's text


# ---------------------------------------------------------------- the real command lines


@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("metaplast.report", ["{run}", "--out", "{tmp}/out", "--keep", "nan"], "--keep=nan is not allowed"),
        (
            "metaplast.report",
            ["{run}", "--out", "{tmp}/out", "--burn-in", "-5"],
            "--burn-in=-5 is not allowed",
        ),
        ("metaplast.report", ["{tmp}/garbage", "--out", "{tmp}/out"], "is not a readable CSV table"),
        ("metaplast.report", ["{run}", "--out", "{tmp}/file"], "exists and is not a directory"),
        ("metaplast.sweep", ["{tmp}", "--threshold", "nan"], "--threshold=nan is not allowed"),
        ("metaplast.sweep", ["{tmp}/missing"], "is not a directory"),
    ],
    ids=["keep nan", "burn-in -5", "garbage metrics.csv", "out is a file", "threshold nan", "missing dir"],
)
def test_command_lines_print_one_line_and_exit_2(module, argv, message, good, tmp_path):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "metrics.csv").write_bytes(b"\x00\xff" * 50)
    (tmp_path / "file").write_text("x")
    args = [a.format(run=good[0], tmp=tmp_path) for a in argv]
    done = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"{module}: error: "), done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
