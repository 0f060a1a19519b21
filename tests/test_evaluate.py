"""Online evaluation of a fixed rule: learning on a separable stream, θ = 0, Θ from a run, bad input."""

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import CONF, run_cli
from metaplast.data import write_idx
from metaplast.run.config import ConfigError
from metaplast.run.evaluate import run, theta_from_run
from metaplast.run.train import run as train

#: 3 classes whose 8×8 images light one of three disjoint bands of pixels, plus noise.
CLASSES, SIDE = 3, 8


def separable_idx(root, per_class_train=200, per_class_test=30):
    generator = torch.Generator().manual_seed(0)
    for prefix, per_class in (("train", per_class_train), ("t10k", per_class_test)):
        labels = torch.arange(CLASSES).repeat_interleave(per_class)
        images = torch.rand(len(labels), SIDE, SIDE, generator=generator) * 60
        for c in range(CLASSES):
            images[labels == c, 2 * c : 2 * c + 3, :] += 180
        write_idx(root / f"{prefix}-images-idx3-ubyte", images.clamp(0, 255).to(torch.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8))
    return root


def compose_eval(*overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


@pytest.fixture(scope="module")
def stream_root(tmp_path_factory):
    return separable_idx(tmp_path_factory.mktemp("separable"))


def separable(stream_root, *overrides):
    return compose_eval(
        "dataset=idx",
        f"dataset.root={stream_root}",
        "model.hidden=[20]",
        "online.trials=4",
        "online.samples=300",
        "online.every=50",
        *overrides,
    )


def test_bp_f0_learns_a_separable_stream_and_zero_theta_stays_at_chance(stream_root, tmp_path):
    learned = run(separable(stream_root, "feedback=bp", "theta={0:0.05}"), tmp_path / "bp")
    final = learned[learned["sample"] == 300]
    assert len(final) == 4
    assert final["acc"].mean() > 0.9  # chance is 1/3
    assert set(learned["sample"]) == set(range(0, 301, 50))

    frozen = run(separable(stream_root, "feedback=bp", "theta={0:0.0}"), tmp_path / "zero")
    start = frozen[frozen["sample"] == 0].set_index("trial")["acc"]
    end = frozen[frozen["sample"] == 300].set_index("trial")["acc"]
    assert np.array_equal(start.to_numpy(), end.to_numpy())  # no plasticity: the network never changes
    assert end.mean() < 0.6
    # Before any sample both evaluations see the same fresh networks.
    assert np.allclose(start.to_numpy(), learned[learned["sample"] == 0]["acc"].to_numpy())


def test_fa_alignment_angles_are_recorded_and_bp_angles_are_zero(stream_root, tmp_path):
    fa = run(separable(stream_root, "feedback=fa", "theta={0:0.05}", "online.samples=100"), tmp_path / "fa")
    bp = run(separable(stream_root, "feedback=bp", "theta={0:0.05}", "online.samples=100"), tmp_path / "bp")
    assert {"angle_0", "angle_1", "orth_1", "orth_2"} <= set(fa.columns)
    assert fa["angle_1"].between(0, 180).all() and fa["angle_1"].mean() > 10
    assert bp["angle_1"].abs().max() < 0.1  # float32 arccos near 1


def test_theta_from_a_meta_training_run_checkpoint_and_csv(make_cfg, tmp_path):
    cfg = make_cfg("rule=bio")
    train(cfg, tmp_path)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"][
        "meta.theta"
    ]
    rule, values = theta_from_run(tmp_path)
    assert rule.terms == (0, 2, 9)
    assert [values[r] for r in rule.terms] == pytest.approx(checkpoint.double().mean(0).tolist())
    _, first = theta_from_run(tmp_path, trial=1)
    assert [first[r] for r in rule.terms] == pytest.approx(checkpoint[1].double().tolist())
    (tmp_path / "checkpoints" / "last.ckpt").unlink()
    rule_csv, values_csv = theta_from_run(tmp_path)  # falls back to metrics.csv (last episode)
    assert rule_csv.terms == (0, 2, 9)
    table = pd.read_csv(tmp_path / "metrics.csv")
    last = table[table["episode"] == 2]
    assert [values_csv[r] for r in rule.terms] == pytest.approx(
        [last[f"theta_{r}"].mean() for r in (0, 2, 9)]
    )
    # The CSV holds the Θ an episode used, the checkpoint Θ after its Adam step (at most lr = 1e-3 away).
    assert max(abs(values_csv[r] - values[r]) for r in rule.terms) <= 1.001e-3


def test_cli_evaluates_theta_of_a_run(make_cfg, tmp_path):
    run_dir = tmp_path / "train"
    train(make_cfg("rule=oja"), run_dir)
    out = tmp_path / "eval"
    result = run_cli(
        "dataset=glyphs",
        "dataset.per_class=12",
        "model.hidden=[16,12]",
        f"from_run={run_dir}",
        "online.trials=2",
        "online.samples=20",
        "online.every=10",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
        module="metaplast.evaluate",
    )
    assert "final test accuracy" in result.stdout
    assert (out / "online.csv").exists() and (out / "theta.json").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("theta=0.1", "theta=0.1 is not allowed"),
        ("theta={12:0.1}", "term ids [12]"),
        ("online.every=0", "online.every=0"),
        ("online.samples=100000", "at most 600"),
    ],
)
def test_bad_input_is_named(stream_root, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run(separable(stream_root, override), tmp_path)


def test_from_trial_out_of_range_is_named(make_cfg, tmp_path):
    train(make_cfg(), tmp_path)
    with pytest.raises(ConfigError, match=r"from_trial=7 is not allowed; allowed: 0..1"):
        theta_from_run(tmp_path, trial=7)
