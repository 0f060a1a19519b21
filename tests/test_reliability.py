"""Reliability (issue 6): divergence, data faults, interrupted writes, unsafe checkpoints, secrets."""

import csv
import gzip
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import CONF, TINY, fit, run_cli
from metaplast import safety
from metaplast.data import DataError, generate_glyphs, load_dataset, read_idx, write_idx
from metaplast.data.glyphs import glyphs_cache_path
from metaplast.run.tracking import EpisodeCSV, flag_diverged, logged_scalars
from metaplast.run.train import build_module, run
from metaplast.safety import CheckpointError, DivergenceError, load_checkpoint
from wandb_file import offline_run_file, summary

HUGE = 1e30  # θ of the e e^T term (ehebb): the weights overflow float32 within one episode


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def three_trials(make_cfg, run_dir, huge=None, max_diverged=10):
    run_dir.mkdir()
    module = build_module(
        make_cfg("rule=ehebb", "meta.trials=3", f"meta.max_diverged={max_diverged}"), run_dir
    )
    if huge is not None:
        with torch.no_grad():
            module.theta[1, module.rule.terms.index(2)] = huge
    return module


# --- 1. divergence --------------------------------------------------------------------------------


def test_diverging_trial_backtracks_is_flagged_and_the_others_are_unaffected(make_cfg, tmp_path):
    clean = three_trials(make_cfg, tmp_path / "clean")
    fit(clean, tmp_path / "clean", 3)
    module = three_trials(make_cfg, tmp_path / "huge", huge=HUGE)
    start_row = module.theta.detach().clone()[1]
    trainer = fit(module, tmp_path / "huge", 3)

    theta = module.theta.detach()
    # never finite: each episode backtracks half way to Θ = 0 (the rule that changes nothing)
    torch.testing.assert_close(theta[1], start_row * 0.5**3, rtol=1e-6, atol=0)
    adam = trainer.optimizers[0].state[module.theta]
    assert int(adam["step"]) == 3
    # trial 1 never had a finite meta-gradient: Adam saw finite surrogate gradients instead
    assert adam["exp_avg"][1].isfinite().all() and adam["exp_avg"][1].abs().sum() > 0
    assert torch.equal(theta[[0, 2]], clean.theta.detach()[[0, 2]])
    assert theta.isfinite().all()
    assert module.diverged_streak == [0, 3, 0]
    assert not module.anchored[1] and module.anchored[[0, 2]].all()

    rows, reference = (
        read_csv(tmp_path / "huge" / "metrics.csv"),
        read_csv(tmp_path / "clean" / "metrics.csv"),
    )
    assert len(rows) == len(reference) == 9
    for row, ref in zip(rows, reference):
        if row["trial"] == "1":
            assert row["meta_diverged"] == "1"
            assert row["meta_loss"] == row["meta_acc"] == row["angle_0"] == row["orth_3"] == "nan"
            # the Θ this episode ran with: halved after every diverged episode
            assert float(row["theta_2"]) == pytest.approx(HUGE * 0.5 ** int(row["episode"]), rel=1e-6)
        else:
            assert row == ref  # bit-identical text: the other trials never saw trial 1


class BlowUpAt(L.Callback):
    """Sets θ_2 of trial 1 to ``value`` just before episode ``episode``."""

    def __init__(self, episode, value):
        self.episode, self.value = episode, value

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.last = getattr(self, "current", None)
        self.current = module.theta.detach().clone()  # the Θ this episode runs with
        if trainer.global_step == self.episode:
            self.adam = {k: v.clone() for k, v in trainer.optimizers[0].state[module.theta].items()}
            with torch.no_grad():
                module.theta[1, module.rule.terms.index(2)] = self.value
                self.current = module.theta.detach().clone()


def test_a_diverged_trial_steps_back_towards_its_last_finite_theta(make_cfg, tmp_path):
    """Θ ← Θ_a + ρ (Θ - Θ_a) with Θ_a the Θ of the last finite episode; Adam's first moment × ρ."""
    module = three_trials(make_cfg, tmp_path / "run")
    blow_up = BlowUpAt(episode=2, value=HUGE)
    trainer = fit(module, tmp_path / "run", 3, [blow_up])
    anchor, diverged = blow_up.last[1], blow_up.current[1]  # Θ of episode 1 (finite) and 2 (not)
    assert diverged[module.rule.terms.index(2)] == HUGE
    torch.testing.assert_close(module.theta.detach()[1], anchor + 0.5 * (diverged - anchor))
    torch.testing.assert_close(module.anchor[0][1], anchor)
    # Adam took a surrogate gradient g (the growth gradient or, where that is flat, the direction
    # back to Θ_a), finite and rescaled to the size of the trial's recent gradients √v̂
    adam, old = trainer.optimizers[0].state[module.theta], blow_up.adam
    g = (adam["exp_avg"][1] - 0.9 * old["exp_avg"][1]) / 0.1
    v_hat = old["exp_avg_sq"][1] / (1 - 0.999 ** int(old["step"]))
    assert g.isfinite().all()
    assert g.pow(2).mean().sqrt().item() == pytest.approx(v_hat.mean().sqrt().item(), rel=1e-4)
    assert module.diverged_streak == [0, 1, 0]


def test_backtracking_ends_a_divergence_streak_that_a_retry_of_the_same_theta_would_not(make_cfg, tmp_path):
    module = three_trials(make_cfg, tmp_path / "run", huge=1e6, max_diverged=100)
    fit(module, tmp_path / "run", 8)
    flags = [int(row["meta_diverged"]) for row in read_csv(tmp_path / "run" / "metrics.csv")][1::3]
    assert flags[0] == 1 and 0 in flags  # it diverged, then found a finite Θ again
    first_finite = flags.index(0)
    theta_2 = [float(row["theta_2"]) for row in read_csv(tmp_path / "run" / "metrics.csv")][1::3]
    for episode in range(first_finite):  # each diverged episode halved the distance to Θ = 0
        assert theta_2[episode + 1] == pytest.approx(theta_2[episode] / 2, rel=1e-6)


def test_logged_scalars_leave_out_diverged_results():
    record = {
        "meta/loss": torch.tensor([1.0, float("nan"), 3.0]),
        "theta/0": torch.tensor([0.1, 0.2, 0.3]),
    }
    scalars = logged_scalars(flag_diverged(record, torch.tensor([False, True, False])), [0, 1, 2])
    assert scalars["meta/loss"] == 2.0  # mean over the finite trials
    assert "trials/meta/loss/trial_1" not in scalars
    assert scalars["trials/theta/0/trial_1"] == pytest.approx(0.2)
    assert scalars["meta/diverged"] == pytest.approx(1 / 3)
    assert scalars["trials/meta/diverged/trial_1"] == 1.0
    assert all(math.isfinite(v) for v in scalars.values())
    everything = flag_diverged(record, torch.tensor([True, True, True]))
    assert set(logged_scalars(everything, [0, 1, 2])) >= {"theta/0", "meta/diverged"}
    assert "meta/loss" not in logged_scalars(everything, [0, 1, 2])


def test_a_streak_of_diverged_episodes_stops_the_run_naming_trial_episode_and_theta(make_cfg, tmp_path):
    module = three_trials(make_cfg, tmp_path / "run", huge=HUGE, max_diverged=2)
    with pytest.raises(DivergenceError) as caught:
        fit(module, tmp_path / "run", 5)
    message = str(caught.value)
    assert "trial 1 diverged" in message
    assert "in 2 consecutive episodes, the last being episode 1 (meta.max_diverged=2)" in message
    assert "it never had a finite episode; its last Θ: theta_0=0.0005, theta_2=5e+29" in message
    assert len(read_csv(tmp_path / "run" / "metrics.csv")) == 2 * 3  # both episodes were written


def test_cli_divergence_exits_3_and_keeps_nan_and_the_api_key_out_of_every_file(tmp_path, monkeypatch):
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    run_dir = tmp_path / "run"
    result = run_cli(
        *TINY,
        "logger=wandb",
        "logger.mode=offline",
        "rule=ehebb",
        f"rule.theta_init={HUGE}",  # every trial diverges
        "meta.max_diverged=2",
        "trainer.checkpoint_every=1",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 3, result.stderr
    assert "metaplast: error: trial 0 diverged" in result.stderr
    assert "Traceback" not in result.stderr
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["state_dict"]["meta.theta"].isfinite().all()
    assert ckpt["metaplast_diverged_streak"] == [2, 2]
    keys = summary(offline_run_file(run_dir))
    assert float(keys["meta/diverged"]) == 1.0
    assert "meta/loss" not in keys and "meta/acc" not in keys  # no result, not a NaN result
    assert all(row["meta_loss"] == "nan" for row in read_csv(run_dir / "metrics.csv"))


# --- 2. data faults -------------------------------------------------------------------------------


def idx_dir(root, images=5, labels=5):
    root.mkdir()
    write_idx(root / "t10k-images-idx3-ubyte", torch.zeros(images, 4, 4, dtype=torch.uint8))
    write_idx(root / "t10k-labels-idx1-ubyte", torch.arange(labels, dtype=torch.uint8) % 2)
    return root


def truncate(path, cut=10):
    path.write_bytes(path.read_bytes()[:-cut])


def pad(path, extra=3):
    path.write_bytes(path.read_bytes() + b"\0" * extra)


def bad_magic(path):
    path.write_bytes(b"\x08\x08" + path.read_bytes()[2:])


def corrupt_gzip(path):
    data = gzip.compress(path.read_bytes())
    path.unlink()
    path.with_name(path.name + ".gz").write_bytes(data[: len(data) // 2])


def swap_labels_for_images(path):
    write_idx(path, torch.zeros(5, 4, 4, dtype=torch.uint8))


@pytest.mark.parametrize(
    "fault, file, message",
    [
        (
            truncate,
            "images",
            r"t10k-images-idx3-ubyte: shape \(5, 4, 4\) of uint8 needs 80 payload bytes, found 70",
        ),
        (pad, "labels", r"t10k-labels-idx1-ubyte: shape \(5,\) of uint8 needs 5 payload bytes, found 8"),
        (bad_magic, "images", r"t10k-images-idx3-ubyte: bad magic number 0x08080803; expected 0x0000TTDD"),
        (corrupt_gzip, "images", r"t10k-images-idx3-ubyte.gz: cannot decompress"),
        (
            Path.unlink,
            "labels",
            r"t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte \(optionally .gz\) not found",
        ),
        (
            swap_labels_for_images,
            "labels",
            r"label file .*t10k-labels-idx1-ubyte: expected 1 dimension, found 3",
        ),
    ],
)
def test_each_data_fault_names_the_file_and_what_was_expected(make_cfg, tmp_path, fault, file, message):
    root = idx_dir(tmp_path / "data")
    fault(root / f"t10k-{file}-idx{3 if file == 'images' else 1}-ubyte")
    with pytest.raises(DataError, match=message):
        build_module(
            make_cfg("dataset=idx", f"dataset.root={root}", "meta.M=2", "meta.K=1", "meta.Q=1"), tmp_path
        )
    assert not (tmp_path / "metrics.csv").exists()


def test_image_and_label_counts_must_agree(tmp_path):
    root = idx_dir(tmp_path / "data", images=5, labels=4)
    with pytest.raises(DataError, match=r"5 images in .*t10k-images-idx3-ubyte but 4 labels in .*labels"):
        load_dataset("idx", root)


def test_concurrent_jobs_build_one_glyph_cache_and_a_corrupt_cache_is_rebuilt(tmp_path):
    code = "import sys; from metaplast.data import load_glyphs; load_glyphs(sys.argv[1], per_class=1, seed=7)"
    jobs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)]) for _ in range(2)]
    assert [job.wait(timeout=120) for job in jobs] == [0, 0]
    expected = generate_glyphs(1, seed=7)
    path = glyphs_cache_path(tmp_path, 1, 7)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    cached = torch.load(path, weights_only=True)
    assert torch.equal(cached["images"], expected[0])
    truncate(path, 100)  # a job killed while writing by hand, or a bad disk
    assert torch.equal(load_dataset("glyphs", tmp_path, seed=7, per_class=1).labels, expected[1])
    assert torch.equal(torch.load(path, weights_only=True)["images"], expected[0])


# --- 3. interrupted writes ------------------------------------------------------------------------

KILLER = """
import io, os, signal, sys, torch
sys.path.insert(0, {tests!r})
from conftest import TINY
from hydra import compose, initialize_config_dir
from metaplast import safety
from metaplast.run.config import register
from metaplast.run.train import run
from pathlib import Path

original, calls = safety.save_torch, [0]

def dying_save(obj, path):
    calls[0] += 1
    if calls[0] == 4:  # episode-3, last (episode 3), episode-6, then last.ckpt of episode 6
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        with safety.atomic_write(path) as handle:
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    original(obj, path)

safety.save_torch = dying_save
register()
with initialize_config_dir({conf!r}, version_base="1.3"):
    cfg = compose("config", overrides=[*TINY, *{overrides!r}])
run(cfg, Path({run_dir!r}))
"""


def test_a_checkpoint_write_killed_midway_leaves_a_resumable_run(make_cfg, tmp_path):
    overrides = ["rule=bio", "meta.episodes=6", "trainer.checkpoint_every=3"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    straight.mkdir()
    crashed.mkdir()
    run(make_cfg(*overrides), straight)
    script = KILLER.format(
        tests=str(Path(__file__).parent), conf=str(CONF), overrides=overrides, run_dir=str(crashed)
    )
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    checkpoints = crashed / "checkpoints"
    leftovers = [p.name for p in checkpoints.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.")  # the torn write
    last = load_checkpoint(checkpoints / "last.ckpt")  # still the complete episode-3 version
    assert last["global_step"] == 3
    with pytest.raises(CheckpointError, match=r"\.tmp is truncated or corrupt"):
        load_checkpoint(checkpoints / leftovers[0])

    run(make_cfg(*overrides, f"ckpt_path={checkpoints / 'last.ckpt'}"), crashed)
    assert (crashed / "metrics.csv").read_text() == (straight / "metrics.csv").read_text()
    final = [
        load_checkpoint(d / "checkpoints" / "last.ckpt")["state_dict"]["meta.theta"]
        for d in (straight, crashed)
    ]
    assert torch.equal(*final)


def test_a_failed_csv_write_leaves_the_previous_complete_file(tmp_path, monkeypatch):
    table = EpisodeCSV(tmp_path / "metrics.csv")
    record = flag_diverged({"meta/loss": torch.tensor([0.5, 0.25])}, torch.tensor([False, True]))
    table.append(0, [0, 1], record)
    before = (tmp_path / "metrics.csv").read_bytes()
    assert before == b"episode,trial,meta_diverged,meta_loss\r\n0,0,0,0.5\r\n0,1,1,nan\r\n"

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safety.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        table.append(1, [0, 1], record)
    assert (tmp_path / "metrics.csv").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


# --- 5. security ----------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_a_checkpoint_holding_a_pickled_object_is_refused(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run(make_cfg("meta.episodes=1", "trainer.checkpoint_every=1"), run_dir)
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # our own checkpoints are plain data
    marker = tmp_path / "pwned"
    ckpt["hyper_parameters"]["extra"] = Payload(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    with pytest.raises(
        CheckpointError, match=r"evil.ckpt holds something other than tensors.*weights_only=True"
    ):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        run(make_cfg("meta.episodes=2", f"ckpt_path={evil}"), run_dir)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.read_text() == "pwned"


def test_missing_and_truncated_checkpoints_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing.ckpt does not exist"):
        load_checkpoint(tmp_path / "nothing.ckpt")
    safety.save_torch({"theta": torch.ones(2)}, tmp_path / "a.ckpt")
    assert json.dumps(load_checkpoint(tmp_path / "a.ckpt")["theta"].tolist()) == "[1.0, 1.0]"
    truncate(tmp_path / "a.ckpt", 50)
    with pytest.raises(CheckpointError, match=r"a.ckpt is truncated or corrupt"):
        load_checkpoint(tmp_path / "a.ckpt")
    assert oct(os.stat(tmp_path / "a.ckpt").st_mode & 0o777) == "0o644"


def test_a_report_figure_that_fails_midway_leaves_the_previous_file(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp_path / "curve.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    safety.save_figure(fig, path, dpi=50)
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    class Broken:
        def savefig(self, handle, **kwargs):
            handle.write(b"half a png")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        safety.save_figure(Broken(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"]
    plt.close(fig)


def test_growth_gradient_is_the_gradient_of_the_log_weight_norm_before_the_blow_up():
    """growth_gradients against a direct autograd computation on the diverged trial alone."""
    from core_helpers import learner_for
    from metaplast.core.learner import State
    from metaplast.run.module import growth_gradients

    sizes = [6, 5, 4, 3]
    learner = learner_for("fa", sizes, "ehebb")
    gens = [torch.Generator().manual_seed(t) for t in range(2)]
    state = learner.init_state(gens)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(2, 8, 6, generator=g), torch.randint(0, 3, (2, 8), generator=g)
    theta = torch.nn.Parameter(torch.tensor([[0.05, -0.02], [10.0, -1e20]]))  # trial 1 blows up
    diverged = torch.tensor([False, True])
    grads = growth_gradients(learner, state, {"theta": theta}, [theta], x, y, 1, diverged)[0]
    assert torch.equal(grads[0], torch.zeros(2))  # the finite trial gets nothing
    # trial 1 alone: the last step with finite weights, then d log Σ‖W‖² / dΘ
    one = State([w[1:] for w in state.weights], [b[1:] for b in state.feedback])
    row = theta.detach()[1:].clone().requires_grad_()
    finite, probe = 0, one
    with torch.no_grad():
        for i in range(8):
            probe = learner.step(probe, {"theta": row}, x[1:, i : i + 1], y[1:, i : i + 1])
            if not all(w.isfinite().all() for w in probe.weights):
                break
            finite = i + 1
    assert 0 < finite < 8
    grown = one
    for i in range(finite):
        grown = learner.step(grown, {"theta": row}, x[1:, i : i + 1], y[1:, i : i + 1])
    (expected,) = torch.autograd.grad(torch.log(sum(w.double().pow(2).sum() for w in grown.weights)), row)
    torch.testing.assert_close(grads[1], expected[0].to(grads.dtype), rtol=1e-3, atol=0)


def test_growth_gradient_of_a_finite_spiking_trial_is_the_same_with_the_fused_and_autograd_estimators():
    """A trial known finite (meta.spike_limit) skips the search for the last finite step; its
    d log Σ‖W‖² / dΘ over the whole episode is the fused backward's and autograd's alike (float64)."""
    from core_helpers import learner_for
    from metaplast.run.module import growth_gradients

    learner = learner_for("fa", [6, 5, 4, 3], "pool")
    state = learner.init_state(
        [torch.Generator().manual_seed(t) for t in range(3)], like=torch.zeros((), dtype=torch.float64)
    )
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 9, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 9), generator=g)
    theta = torch.nn.Parameter(torch.rand(3, 10, generator=g, dtype=torch.float64) * 1e-2)
    spiking, finite = torch.tensor([True, False, True]), torch.ones(3, dtype=torch.bool)
    found = {
        estimator: growth_gradients(
            learner, state, {"theta": theta}, [theta], x, y, 1, spiking, finite, estimator
        )[0]
        for estimator in ("fused", "autograd")
    }
    assert torch.equal(found["fused"][1], torch.zeros(10)) and found["fused"][[0, 2]].abs().min() > 0
    assert (found["fused"] - found["autograd"]).norm() <= 1e-10 * found["autograd"].norm()


def test_growth_gradients_of_several_trials_batched_equal_each_trial_alone():
    """The diverged and spiking trials run batched (grouped by their last finite step): each row
    equals growth_gradients of that trial alone (float64), whatever the mix — two spiking trials
    known finite, trials blowing up after 1 and 2 steps, one diverged with finite weights, one
    blowing up at its first step (zeros) and two healthy trials (zeros)."""
    from core_helpers import learner_for
    from metaplast.run.module import growth_gradients

    learner = learner_for("fa", [6, 5, 4, 3], "ehebb")
    rows = [[0.05, -0.02], [10.0, -1e150], [0.04, 0.01], [1.0, -1e100], [0.02, 0.01], [float("inf"), 0.0]]
    rows += [[0.03, -0.01], [0.01, 0.02]]
    trials = len(rows)
    double = torch.zeros((), dtype=torch.float64)
    state = learner.init_state([torch.Generator().manual_seed(t) for t in range(trials)], like=double)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(trials, 12, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (trials, 12), generator=g)
    theta = torch.nn.Parameter(torch.tensor(rows, dtype=torch.float64))
    bad = torch.tensor([True, True, False, True, True, True, True, False])
    finite = torch.tensor([True, False, True, False, False, False, True, True])  # 0, 6: spikes

    def growth(diverged):
        return growth_gradients(learner, state, {"theta": theta}, [theta], x, y, 1, diverged, finite)[0]

    batched = growth(bad)
    alone = torch.stack([growth(torch.arange(trials) == t)[t] for t in bad.nonzero().flatten()])
    assert torch.equal(batched[~bad], torch.zeros(2, 2)) and torch.equal(batched[5], torch.zeros(2))
    assert batched[[0, 1, 3, 4, 6]].abs().amin(1).gt(0).all()  # every other bad trial has a gradient
    assert (batched[bad] - alone).norm() <= 1e-12 * alone.norm()


# --- 6. data faults, round two (issue 14): values, shapes, label ids, sizes before decompressing ---


def idx_pair(root, images, labels, gz=False):
    """An IDX data set (the t10k split) of the given tensors in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write_idx(root / f"t10k-images-idx3-ubyte{suffix}", images)
    write_idx(root / f"t10k-labels-idx1-ubyte{suffix}", labels)
    return root


def _pixels(value):
    images = torch.rand(4, 3, 3)
    images[2, 1, 1] = value
    return images, torch.tensor([0, 1, 0, 1], dtype=torch.uint8)


def header_only(path, shape, code=0x08):
    """An IDX file whose header declares ``shape`` but holds (almost) no payload."""
    import struct

    header = struct.pack(f">HBB{len(shape)}I", 0, code, len(shape), *shape)
    path.write_bytes(gzip.compress(header + b"\0" * 16) if path.suffix == ".gz" else header + b"\0" * 16)


DATA_CASES = {
    "NaN pixel": (lambda: _pixels(float("nan")), "1 pixel values are NaN or infinite (the first in image 2)"),
    "inf pixel": (lambda: _pixels(float("inf")), "pixel values are NaN or infinite"),
    "-inf pixel": (lambda: _pixels(float("-inf")), "pixel values are NaN or infinite"),
    "pixel above 1": (lambda: _pixels(2.0), "pixel values must lie in [0, 1]"),
    "negative pixel": (lambda: _pixels(-0.5), "pixel values must lie in [0, 1]"),
    "zero-size images": (
        lambda: (torch.zeros(4, 0, 0, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8)),
        "images of shape (4, 0, 0); allowed: N >= 1 images of H x W >= 1 x 1 pixels",
    ),
    "zero-width images": (
        lambda: (torch.zeros(4, 3, 0, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8)),
        "images of shape (4, 3, 0)",
    ),
    "no images": (
        lambda: (torch.zeros(0, 3, 3, dtype=torch.uint8), torch.zeros(0, dtype=torch.uint8)),
        "no labels",
    ),
    "flat images": (
        lambda: (torch.zeros(4, 9, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8)),
        "expected images of shape (N, H, W), found (4, 9)",
    ),
    "float labels": (
        lambda: (torch.zeros(4, 3, 3, dtype=torch.uint8), torch.tensor([0.0, 1.5, 2.0, 1.0])),
        "labels of type torch.float32 (IDX type 0D/0E); allowed: integer class ids",
    ),
    "float64 labels": (
        lambda: (
            torch.zeros(4, 3, 3, dtype=torch.uint8),
            torch.tensor([0.0, 1.0, 2.0, 1.0], dtype=torch.float64),
        ),
        "labels of type torch.float64",
    ),
    "label 10^6": (
        lambda: (torch.zeros(4, 3, 3, dtype=torch.uint8), torch.tensor([0, 1, 10**6, 1], dtype=torch.int32)),
        "label id 1000000 is out of range; allowed: class ids 0..999; at most 1000 classes",
    ),
    "label 1000": (
        lambda: (torch.zeros(4, 3, 3, dtype=torch.uint8), torch.tensor([0, 1000, 1, 1], dtype=torch.int16)),
        "label id 1000 is out of range",
    ),
    "negative label": (
        lambda: (torch.zeros(4, 3, 3, dtype=torch.uint8), torch.tensor([0, -1, 1, 1], dtype=torch.int8)),
        "label id -1 is out of range",
    ),
    "2-d labels": (
        lambda: (torch.zeros(4, 3, 3, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.uint8)),
        "expected 1 dimension, found 2",
    ),
}


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("case", list(DATA_CASES))
def test_each_bad_data_set_is_refused_naming_the_file_and_the_value(make_cfg, tmp_path, case, gz):
    make, message = DATA_CASES[case]
    root = idx_pair(tmp_path / "data", *make(), gz=gz)
    with pytest.raises(DataError) as caught:
        load_dataset("idx", root)
    assert message in str(caught.value), str(caught.value)
    assert str(root) in str(caught.value)
    with pytest.raises(DataError):  # and a training run stops before any work
        build_module(
            make_cfg("dataset=idx", f"dataset.root={root}", "meta.M=2", "meta.K=1", "meta.Q=1"), tmp_path
        )
    assert not (tmp_path / "metrics.csv").exists()


def test_a_label_beyond_the_declared_classes_is_refused(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    idx_pair(raw, torch.zeros(3, 28, 28, dtype=torch.uint8), torch.tensor([0, 10, 3], dtype=torch.uint8))
    with pytest.raises(
        DataError, match=r"label id 10 is out of range; allowed: class ids 0..9 \(the dataset's declared"
    ):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "shape, code",
    [((100_000, 1000, 1000), 0x08), ((2**31, 2**31), 0x08), ((10**9,), 0x0E), ((60000, 28, 28, 1000), 0x0D)],
)
def test_an_idx_file_declaring_more_than_it_may_is_refused_before_decompressing(
    tmp_path, monkeypatch, suffix, shape, code
):
    from metaplast.data import idx

    path = tmp_path / f"bomb-idx{suffix}"
    header_only(path, shape, code)
    read = []
    original = idx._read
    monkeypatch.setattr(idx, "_read", lambda stream, n, p: read.append(n) or original(stream, n, p))
    with pytest.raises(
        DataError, match=r"its header declares shape .* bytes.*allowed: at most 4,294,967,296 bytes"
    ):
        read_idx(path)
    assert max(read) <= 4 * len(shape)  # only the header was ever read


def test_a_gzip_bomb_behind_a_small_header_stops_at_the_declared_size(tmp_path, monkeypatch):
    from metaplast.data import idx

    path = tmp_path / "bomb-idx1-ubyte.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(bytes([0, 0, 8, 1, 0, 0, 0, 4]) + b"\0" * 4)
        for _ in range(64):  # 64 MiB of zeros, a few hundred KB compressed
            handle.write(b"\0" * 2**20)
    assert path.stat().st_size < 2**20
    read = []
    original = idx._read
    monkeypatch.setattr(idx, "_read", lambda stream, n, p: read.append(n) or original(stream, n, p))
    with pytest.raises(DataError, match=r"needs 4 payload bytes, found more than 4"):
        read_idx(path)
    assert sum(read) <= 16  # never decompressed beyond the declared size + 1


def test_an_idx_path_that_is_a_directory_is_refused(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").mkdir()
    with pytest.raises(DataError, match="is a directory"):
        read_idx(tmp_path / "t10k-images-idx3-ubyte")


def test_a_glyph_cache_path_that_is_a_directory_or_a_root_that_is_a_file_is_refused(tmp_path):
    glyphs_cache_path(tmp_path, 1, 5).mkdir(parents=True)
    with pytest.raises(DataError, match=r"glyph cache: .* is a directory, not a cache file"):
        load_dataset("glyphs", tmp_path, seed=5, per_class=1)
    (tmp_path / "file").write_text("x")
    for root in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(DataError, match=r"glyph cache: the data root .* is not a directory"):
            load_dataset("glyphs", root, seed=5, per_class=1)


def test_an_unwritable_glyph_cache_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    from metaplast.data import glyphs

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(glyphs.tempfile, "mkstemp", read_only)
    data = load_dataset("glyphs", tmp_path, seed=6, per_class=1)
    assert torch.equal(data.labels, generate_glyphs(1, seed=6)[1])
    assert "not written (Permission denied" in caplog.text
    assert not glyphs_cache_path(tmp_path, 1, 6).exists()


def test_a_glyph_cache_holding_a_pickled_object_is_rebuilt_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = glyphs_cache_path(tmp_path, 1, 7)
    torch.save({"images": Payload(marker)}, path)
    data = load_dataset("glyphs", tmp_path, seed=7, per_class=1)
    assert torch.equal(data.labels, generate_glyphs(1, seed=7)[1]) and not marker.exists()
    assert oct(path.stat().st_mode & 0o777) == "0o644"
