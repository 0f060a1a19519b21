"""The Oja paper's runner: every oja_* preset end to end at tiny sizes, the analyses that
``metaplast.evaluate`` logs against direct computations (norms, Eq. 2, PCA by SVD, W^T reconstructions,
update norms by autograd), the recurrent net's online pass against autograd's BPTT, the validation
split held out of the stream, the grid-search table, and the report's figures."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import CONF, TINY
from metaplast.analysis.report import write_report
from metaplast.analysis.rundir import expand
from metaplast.analysis.sweep import main as sweep_main
from metaplast.analysis.sweeps import online_grid
from metaplast.core.learner import State
from metaplast.data import trial_generators, write_idx
from metaplast.run.config import ConfigError, build_rule, register
from metaplast.run.data import load_data
from metaplast.run.evaluate import _held_out_order, _subsample_per_class, build_online_learner, typed_evaluate
from metaplast.run.evaluate import run as evaluate
from metaplast.run.train import run as train

#: Tiny sizes for every online preset (synthetic glyphs, 2 trials, 20 stream samples).
EVAL_TINY = [
    "dataset=glyphs",
    "dataset.per_class=12",
    "logger=csv",
    "online.trials=2",
    "online.samples=20",
    "online.every=10",
    "online.test_per_class=2",
    "online.probe=12",
    "online.images=2",
]
MLP_TINY = ["model.hidden=[16,12,8]"]
RNN_TINY = ["model.hidden=[8]", "model.length=6", "model.show=2"]
#: preset: the conditions its sweep runs (rule and, where it sweeps them, model / feedback)
EVAL_PRESETS = {
    "oja_fig1": [["rule=f0"], ["rule=oja", "model=oja10"]],
    "oja_fig2": [["rule=f0"], ["rule=oja"]],
    "oja_fig3": [["rule=oja"]],
    "oja_fig4": [["rule=oja", "model=oja10"]],
    "oja_fig5": [["rule=f0"], ["rule=oja"]],
    "oja_fig6": [["rule=oja", "feedback=fa"]],
    "oja_fig7": [["rule=f0"], ["rule=oja"]],
    "oja_s1": [["rule=oja"]],
    "oja_grid": [["theta.0=0.01", "theta.9=0", "online.validation=40"]],
}


def compose_with(config, *overrides, hydra=False):
    register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(config, overrides=list(overrides), return_hydra_config=hydra)


def tiny_eval(*overrides):
    rnn = any("oja_fig7" in o for o in overrides) or "model.kind=rnn" in overrides
    return compose_with("evaluate", *EVAL_TINY, *(RNN_TINY if rnn else MLP_TINY), *overrides)


def test_every_oja_preset_is_tested():
    online = {p.stem for p in (Path(CONF) / "eval_experiment").glob("oja_*.yaml")}
    assert online == set(EVAL_PRESETS)
    assert {p.stem for p in (Path(CONF) / "experiment").glob("oja_*.yaml")} == {"oja_fig8"}


def test_presets_hold_the_papers_settings():
    fig1 = compose_with("evaluate", "+eval_experiment=oja_fig1", hydra=True)
    assert fig1.hydra.sweeper.params == {"model": "paper5,oja10", "rule": "f0,oja"}
    assert fig1.feedback.kind.value == "bp" and fig1.model.init.value == "xavier_uniform"
    assert (fig1.online.trials, fig1.online.samples, fig1.dataset.name) == (20, 5000, "mnist")
    ten = compose_with("evaluate", "+eval_experiment=oja_fig1", "model=oja10")
    assert len(ten.model.hidden) == 9  # 10 weight layers
    fig5 = compose_with("evaluate", "+eval_experiment=oja_fig5")
    assert (fig5.model.init.value, fig5.model.init_std) == ("normal", 0.01)  # std 0.01: BP fails
    fig7 = compose_with("evaluate", "+eval_experiment=oja_fig7")
    assert (fig7.model.kind.value, fig7.model.show, fig7.model.length) == ("rnn", 5, 50)
    grid = compose_with("evaluate", "+eval_experiment=oja_grid", hydra=True)
    assert set(grid.hydra.sweeper.params) == {"theta.0", "theta.9"}
    assert "0" in grid.hydra.sweeper.params["theta.9"].split(",")  # θ_2 = 0: BP alone is in the grid
    assert grid.online.validation > 0
    fig8 = compose_with("config", "+experiment=oja_fig8")
    assert list(fig8.rule.terms) == [0, 2, 3, 9] and fig8.feedback.kind.value == "plastic"
    baseline = compose_with("config", "+experiment=oja_fig8", "feedback=bp", "rule=f0")  # the BP curve
    assert baseline.rule.terms == "f0" and baseline.feedback.kind.value == "bp"


@pytest.mark.parametrize(
    "preset, condition", [(p, c) for p, conditions in EVAL_PRESETS.items() for c in conditions]
)
def test_online_preset_runs_end_to_end(preset, condition, tmp_path):
    cfg = tiny_eval(f"+eval_experiment={preset}", *condition)
    table = evaluate(cfg, tmp_path)
    assert sorted(table["sample"].unique()) == [0, 10, 20] and table["trial"].nunique() == 2
    assert table["acc"].between(0, 1).all() and (table["diverged"] == 0).all()
    if cfg.online.analyses:
        with np.load(tmp_path / "analyses.npz") as data:
            assert list(data["samples"]) == [0, 10, 20]
            if cfg.model.kind.value == "rnn":
                assert data["state_norm"].shape == (3, 2, 6)
            else:
                assert data["recon_3"].shape == (2, 2, 28 * 28) and data["ev_1"].shape == (3, 2, 12)


def test_fig8_training_preset_runs_and_names_the_feedback_coefficients(tmp_path):
    cfg = compose_with("config", "+experiment=oja_fig8", *TINY, "meta.episodes=2")
    module = train(cfg, tmp_path)
    assert module.global_step == 2
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert {"theta_0", "theta_2", "theta_3", "theta_9", "psi_0", "psi_1"} <= set(metrics.columns)
    assert not any(c in metrics for c in ("theta_4",))  # Eq. 9's θ_4, θ_9 of ΔB are psi, not pool terms
    assert metrics["psi_0"].abs().max() > 0  # the feedback rule's coefficients are meta-learned


# ---------------------------------------------------------------- the analyses against direct computations


def _softplus(z):
    return np.logaddexp(0, 10 * z) / 10


def test_logged_analyses_equal_direct_computations(tmp_path):
    cfg = tiny_eval(
        "rule=oja", "feedback=bp", "theta={0:0.05,9:0.002}", "online.analyses=true", "online.samples=10"
    )
    evaluate(cfg, tmp_path)
    logged = pd.read_csv(tmp_path / "analyses.csv")
    data = dict(np.load(tmp_path / "analyses.npz"))
    # rebuild the pass's inputs: the fresh weights of each trial, the probe images, the first sample
    test = load_data(cfg, "test")
    keep = _subsample_per_class(test.labels, 2, torch.Generator().manual_seed(cfg.seed))
    x_test, y_test = test.images[keep], test.labels[keep]
    picks = torch.randperm(len(y_test), generator=torch.Generator().manual_seed(cfg.seed + 1))[:12]
    probe = x_test[picks].double().numpy()
    stream = load_data(cfg, "train")
    learner = build_online_learner(typed_evaluate(cfg), 28 * 28, 47, _rule(cfg))
    weights = learner.network.init_weights(trial_generators(cfg.seed, [0, 1], 0))
    _, order = _held_out_order(cfg, len(stream.labels), 10, [0, 1])
    start = logged[logged["sample"] == 0].sort_values("trial")
    for t in range(2):
        W = [w[t].double().numpy() for w in weights]
        ys = [probe]
        for i, w in enumerate(W):
            z = ys[-1] @ w.T
            ys.append(_softplus(z) if i < len(W) - 1 else np.exp(z) / np.exp(z).sum(1, keepdims=True))
        for layer, y in enumerate(ys):  # Fig. 6: mean ‖y_ℓ‖
            expected = np.mean([np.linalg.norm(row) for row in y])
            assert start[f"norm_{layer}"].iloc[t] == pytest.approx(expected, rel=1e-5)
        for layer in (1, 2, 3):  # Fig. 2: Eq. 2, sample by sample
            w, y_pre = W[layer - 1], ys[layer - 1]
            errors = [np.sum((v - w.T @ _softplus(w @ v)) ** 2) for v in y_pre]
            assert start[f"recon_{layer}"].iloc[t] == pytest.approx(np.mean(errors), rel=1e-4)
            # Fig. 3: PCA by SVD of the centred activations
            centred = torch.tensor(ys[layer] - ys[layer].mean(0))
            s = torch.linalg.svd(centred).S ** 2
            np.testing.assert_allclose(data[f"ev_{layer}"][0, t], (s.cumsum(0) / s.sum()).numpy(), atol=1e-5)
        # Supp. Fig. S1: on the first stream sample, backprop's θ_1 ‖∂L/∂W_ℓ‖ and the rule's ‖ΔW_ℓ‖
        x = stream.images[order[t, 0]].double()
        label = int(stream.labels[order[t, 0]])
        leaves = [torch.tensor(w, requires_grad=True) for w in W]
        h = x
        for i, w in enumerate(leaves):
            h = h @ w.T if i == len(leaves) - 1 else torch.nn.functional.softplus(h @ w.T, beta=10)
        loss = torch.nn.functional.cross_entropy(h[None], torch.tensor([label]))
        grads = torch.autograd.grad(loss, leaves)
        for layer, g in enumerate(grads, start=1):
            assert start[f"dw_bp_{layer}"].iloc[t] == pytest.approx(0.05 * g.norm().item(), rel=1e-4)
        # the rule's update: -θ_1 ∂L/∂W + θ_2 (y y_pre^T - y y^T W), layer by layer (BP: e = gradient)
        acts = [x.numpy()]
        for w in W[:-1]:
            acts.append(_softplus(w @ acts[-1]))
        for layer, g in enumerate(grads, start=1):
            w, pre = W[layer - 1], acts[layer - 1]
            post = _softplus(w @ pre) if layer < len(W) else torch.softmax(torch.tensor(w @ pre), 0).numpy()
            update = -0.05 * g.numpy() + 0.002 * (np.outer(post, pre) - np.outer(post, post) @ w)
            assert start[f"dw_{layer}"].iloc[t] == pytest.approx(np.linalg.norm(update), rel=1e-4)
    assert logged[logged["sample"] == 10]["dw_1"].isna().all()  # no next sample at the end
    # Fig. 4: the end's reconstructions, x̂ = W_1^T ... W_ℓ^T y_ℓ, from the end's weights
    chunk = order[:, :10]
    final = _adapt_direct(learner, State(weights), stream.images[chunk], stream.labels[chunk])
    np.testing.assert_allclose(data["images"], probe[:2], atol=1e-6)
    for t in range(2):
        W = [w[t].double().numpy() for w in final.weights]
        y = probe[:2]
        for layer in (1, 2, 3):
            y = _softplus(y @ W[layer - 1].T)
            expected = y.copy()
            for w in reversed(W[:layer]):
                expected = expected @ w
            np.testing.assert_allclose(data[f"recon_{layer}"][t], expected, rtol=2e-3, atol=2e-4)


def _rule(cfg):
    return build_rule(cfg)


def _adapt_direct(learner, state, x, y):
    """The online pass's updates, one sample at a time (the runner's steps, as a plain loop)."""
    theta = torch.tensor([0.05, 0.002]).expand(2, -1)
    with torch.no_grad():
        for i in range(x.shape[1]):
            state = learner.step(state, {"theta": theta}, x[:, i : i + 1], y[:, i : i + 1])
    return state


def test_recurrent_online_pass_equals_autograd_bptt(tmp_path):
    cfg = tiny_eval(
        "model.kind=rnn", "feedback=bp", "rule=f0", "theta={0:0.2}", "online.samples=3", "online.every=3"
    )
    table = evaluate(cfg, tmp_path)
    stream, test = load_data(cfg, "train"), load_data(cfg, "test")
    keep = _subsample_per_class(test.labels, 2, torch.Generator().manual_seed(cfg.seed))
    x_test, y_test = test.images[keep].double(), test.labels[keep]
    learner = build_online_learner(typed_evaluate(cfg), 28 * 28, 47, _rule(cfg))
    net = learner.network
    weights = [w.double() for w in net.init_weights(trial_generators(cfg.seed, [0, 1], 0))]
    _, order = _held_out_order(cfg, len(stream.labels), 3, [0, 1])
    for t in range(2):
        W = [w[t : t + 1].clone() for w in weights]
        for i in range(3):  # plain SGD by autograd through the unrolled 6 steps: W <- W - θ ∂L/∂W
            leaves = [w.clone().requires_grad_() for w in W]
            x = stream.images[order[t, i]].double()[None, None]
            label = stream.labels[order[t, i]][None]
            loss = torch.nn.functional.cross_entropy(net.logits(leaves, x)[0], label)
            W = [w - 0.2 * g for w, g in zip(W, torch.autograd.grad(loss, leaves))]
        acc = (net.logits(W, x_test[None]).argmax(-1)[0] == y_test).double().mean().item()
        row = table[(table["sample"] == 3) & (table["trial"] == t)]
        assert row["acc"].item() == pytest.approx(acc)
    assert "angle_0" not in table  # no feedback pathway to measure


def test_validation_images_are_held_out_of_every_stream_and_scored(tmp_path):
    cfg = tiny_eval("rule=f0", "feedback=bp", "theta={0:0.05}", "online.validation=30", "online.samples=40")
    table = evaluate(cfg, tmp_path)
    stream = load_data(cfg, "train")
    validation, order = _held_out_order(cfg, len(stream.labels), 40, [0, 1])
    assert len(validation) == 30 and len(set(validation.tolist())) == 30
    assert not set(validation.tolist()) & set(order.flatten().tolist())  # never streamed
    learner = build_online_learner(typed_evaluate(cfg), 28 * 28, 47, _rule(cfg))
    weights = learner.network.init_weights(trial_generators(cfg.seed, [0, 1], 0))
    x_val = stream.images[validation].expand(2, 30, -1)
    logits = learner.network.forward(weights, x_val)[1][-1]
    expected = (logits.argmax(-1) == stream.labels[validation]).float().mean(1)
    start = table[table["sample"] == 0].sort_values("trial")
    np.testing.assert_allclose(start["val_acc"].to_numpy(), expected.numpy(), atol=1e-7)
    assert json.loads((tmp_path / "theta.json").read_text())["validation"] == 30
    with pytest.raises(ConfigError, match="online.validation=30 is not allowed with online.stream_split"):
        evaluate(tiny_eval("online.validation=30", "online.stream_split=test"), tmp_path / "x")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.kind=rnn", "feedback=fa"], "feedback.kind='fa' is not allowed with model.kind=rnn"),
        (["model.kind=rnn", "feedback=bp", "rule=bio"], r"rule.terms=\[0, 2, 9\] is not allowed with"),
        (["model.kind=rnn", "feedback=bp", "model.hidden=[4,4]"], "allowed: one width"),
        (["model.kind=rnn", "feedback=bp", "model.show=7"], r"model.show=7 is not allowed; allowed: .*1..6"),
        (["online.images=20"], "online.images=20 is not allowed; allowed: at most online.probe=12"),
    ],
)
def test_bad_oja_options_are_named(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        evaluate(tiny_eval(*overrides), tmp_path)


# ---------------------------------------------------------------- the grid search and the report


@pytest.fixture(scope="module")
def separable_root(tmp_path_factory):
    """3 classes of 8 x 8 images, each lighting its own band of rows (learnable in a few samples)."""
    root = tmp_path_factory.mktemp("separable")
    generator = torch.Generator().manual_seed(0)
    for prefix, per_class in (("train", 60), ("t10k", 20)):
        labels = torch.arange(3).repeat_interleave(per_class)
        images = torch.rand(len(labels), 8, 8, generator=generator) * 60
        for c in range(3):
            images[labels == c, 2 * c : 2 * c + 3, :] += 180
        write_idx(root / f"{prefix}-images-idx3-ubyte", images.clamp(0, 255).to(torch.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8))
    return root


def _grid_job(grid, root, number, theta_0, theta_9):
    path = grid / str(number)
    cfg = tiny_eval(
        "+eval_experiment=oja_grid",
        "dataset=idx",
        f"dataset.root={root}",
        "model.hidden=[12,8]",
        f"theta.0={theta_0}",
        f"theta.9={theta_9}",
        "online.validation=60",
        "online.samples=40",
        "online.test_per_class=null",
    )
    evaluate(cfg, path)
    (path / ".hydra").mkdir()
    (path / ".hydra" / "overrides.yaml").write_text(f"- theta.0={theta_0}\n- theta.9={theta_9}\n")
    return path


def test_online_grid_picks_the_best_pair_by_validation_accuracy(separable_root, tmp_path, capsys):
    grid = tmp_path / "grid"
    pairs = [(0.0, 0.0), (0.03, 0.0), (0.3, 0.0), (0.3, 0.003)]
    paths = [_grid_job(grid, separable_root, n, *pair) for n, pair in enumerate(pairs)]
    table = online_grid([grid])
    finals = {}
    for path in paths:
        online = pd.read_csv(path / "online.csv")
        end = online[online["sample"] == online["sample"].max()]
        finals[str(path)] = (end["val_acc"].mean(), end["acc"].mean())
    ranked = sorted(finals, key=lambda p: finals[p][0], reverse=True)
    assert finals[ranked[0]][0] > finals[ranked[1]][0] > 1 / 3 + 0.1  # a clear winner, above chance
    assert table.loc[table["best"], "job"].item() == ranked[0]
    assert table["job"].tolist() == ranked and table["value"].tolist() == pytest.approx(
        [finals[p][0] for p in ranked]
    )
    assert table["test_acc"].tolist() == pytest.approx([finals[p][1] for p in ranked])
    row = table[table["job"] == str(paths[3])].iloc[0]
    assert (row["theta_0"], row["theta_9"]) == pytest.approx((0.3, 0.003))
    sweep_main([str(grid), "--out", str(tmp_path / "summary")])
    assert "**best**" in capsys.readouterr().out
    assert (tmp_path / "summary" / "grid.md").read_text().count("**best**") == 1


def test_report_draws_the_analyses_figures(tmp_path):
    for rule in ("f0", "oja"):
        evaluate(tiny_eval("+eval_experiment=oja_fig2", f"rule={rule}"), tmp_path / "runs" / rule)
    evaluate(tiny_eval("+eval_experiment=oja_fig7", "rule=oja"), tmp_path / "runs" / "rnn")
    names = write_report(expand([tmp_path / "runs"]), tmp_path / "report")
    for name in (
        "oja_activation_norms.png",
        "oja_reconstruction_error.png",
        "oja_explained_variance.png",
        "oja_update_norms.png",
        "oja_update_norms_bp.png",
        "oja_state_norms.png",
    ):
        assert name in names and (tmp_path / "report" / name).stat().st_size > 5000
    assert sum(n.startswith("oja_reconstructions_") for n in names) == 2
    index = (tmp_path / "report" / "index.html").read_text()
    assert "Fig. 2: the paper&#x27;s reconstruction error" in index and "BP+Oja, 4 layers" in index
    assert "BPTT+Oja, RNN (8 units)" in index
