"""FLP's runner (issue 12): the sine-wave and few-shot task families through the training module,
against independent computations — the sine meta-loss from FLP's formulas written out, the
forgetting and update-gradient metrics from their definitions, disjoint meta-train/meta-test
classes and functions — and every flp_* preset end to end at tiny sizes."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import CONF
from metaplast.core.metrics import (
    feedback_weight_angles,
    follow_stream,
    forgetting,
    readout_fit,
    stream_blocks,
    update_gradient_cosine,
)
from metaplast.data.sampler import split_classes
from metaplast.run.config import ConfigError, register, typed, validate
from metaplast.run.data import load_data
from metaplast.run.module import STREAM_TEST_TASKS, MetaPlasticity, build_samplers
from metaplast.run.train import run as train

#: The smallest sine task: 2 functions, 4 batches of 5, 3 query points each; a 3-layer ReLU net.
TINY_SINE = [
    "task.functions=2",
    "task.batches=4",
    "task.query=3",
    "task.test_episodes=1",
    "meta.batch=5",
    "model.hidden=[6,5]",
    "model.learn_init=[0,1,2]",
    "rule.plastic=2",
    "meta.trials=2",
    "meta.episodes=1",
    "logger=csv",
    "trainer.accelerator=cpu",
    "trainer.progress_bar=false",
]
TINY_CLASSIFY = [
    "dataset.per_class=12",
    "model.hidden=[16,12]",
    "meta.M=3",
    "meta.K=4",
    "meta.Q=3",
    "task.test_episodes=1",
    "meta.trials=2",
    "meta.episodes=1",
    "logger=csv",
    "trainer.accelerator=cpu",
    "trainer.progress_bar=false",
]
PRESETS = {
    "flp_sine_iid": TINY_SINE,
    "flp_sine_continual": TINY_SINE,
    "flp_classify_iid": TINY_CLASSIFY,
    "flp_classify_continual": TINY_CLASSIFY,
}


def compose_with(*overrides):
    register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def module_for(*overrides):
    cfg = compose_with(*overrides)
    validate(cfg)
    config = typed(cfg)
    return MetaPlasticity(config, load_data(config))


def test_every_flp_preset_is_tested():
    assert {p.stem for p in (Path(CONF) / "experiment").glob("flp_*.yaml")} == set(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_flp_preset_runs_end_to_end_and_meta_tests(preset, tmp_path):
    cfg = compose_with(f"+experiment={preset}", *PRESETS[preset], "rule.theta_init=0")
    order = preset.rsplit("_", 1)[1]
    assert cfg.task.order.value == order and cfg.rule.terms == "flp" and cfg.feedback.kind.value == "flp"
    module = train(cfg, tmp_path)
    assert module.global_step == 1
    # rule.nonnegative: Adam's first step from α = 0 is ±lr per synapse; the negative ones are projected to 0
    alphas = module.meta.groups()["theta"][-1]
    assert alphas.min() >= 0 and (alphas == 0).any() and (alphas > 0).any()
    result = json.loads((tmp_path / "meta_test.json").read_text())
    depth = len(cfg.model.hidden) + 1
    assert result["order"] == order and len(result["loss"]["trials"]) == 2
    assert all(math.isfinite(v) for v in result["loss"]["trials"])
    layers = result["update_cos"]["per_layer"]
    assert len(layers) == depth and all(layer["trials"] == [0.0, 0.0] for layer in layers[: depth - 2])
    assert ("forgetting" in result) == (order == "continual")
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {f"cos_{l}" for l in range(depth)} | {f"fbangle_{l}" for l in range(depth)} <= set(header)


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_sine_meta_loss_is_flps_formulas_written_out(float64):
    """The module's meta-loss of one episode against FLP written out: forward pass with biases,
    feedback x ← (1-β)x + β ReLU(B(t - y) - b), output clamped to t, w ← w + α (a b - b² w) summed
    over each batch of 5 in the top 2 layers, then the MSE on the query points."""
    module = module_for("+experiment=flp_sine_continual", *TINY_SINE, "trainer.precision=64-true")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move every meta-parameter off its starting value
        for p in module.meta.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1 * (p.abs().mean() + 0.1))
    sampler = copy.deepcopy(module.samplers)
    loss = module.training_step(None, 0).item()

    meta = module.meta
    total = 0.0
    for t, s in enumerate(sampler):
        task = s.sample()
        W = [meta.init[str(i)][t].clone() for i in range(3)]
        b = [bias[t, 0] for bias in meta.bias]
        alpha = [None, meta.theta[1][t, ..., 0], meta.theta[2][t, ..., 0]]
        beta = torch.sigmoid(meta.extra["flp_beta"][t])
        fb_bias = torch.split(meta.extra["flp_bias"][t], [6, 5])
        B = [meta.feedback[i][t] for i in range(3)]
        for step in range(4):
            x = task.x_train[step * 5 : (step + 1) * 5]
            target = task.y_train[step * 5 : (step + 1) * 5]
            h1 = torch.relu(x @ W[0].T + b[0])
            h2 = torch.relu(h1 @ W[1].T + b[1])
            out = h2 @ W[2].T + b[2]
            error = target - out
            post2 = (1 - beta[1]) * h2 + beta[1] * torch.relu(error @ B[2].T - fb_bias[1])
            for layer, pre, post in ((1, h1, post2), (2, h2, target)):
                hebb = sum(torch.outer(post[k], pre[k]) for k in range(5))
                decay = sum(post[k] ** 2 for k in range(5))[:, None] * W[layer]
                W[layer] = W[layer] + alpha[layer] * (hebb - decay)
        h = torch.relu(torch.relu(task.x_query @ W[0].T + b[0]) @ W[1].T + b[1])
        total += ((h @ W[2].T + b[2]) - task.y_query).pow(2).mean().item()
    assert loss == pytest.approx(total, rel=1e-9)


def test_forgetting_is_the_output_change_on_earlier_functions(float64):
    module = module_for("+experiment=flp_sine_continual", *TINY_SINE, "task.functions=4", "task.query=2")
    learner, cfg = module.learner, module.cfg
    sampler = build_samplers(cfg, None, [0], STREAM_TEST_TASKS)[0]
    task = sampler.sample()
    x, y, xq = task.x_train[None], task.y_train[None], task.x_query[None]
    groups, query_groups = x[..., 1:].argmax(-1), xq[..., 1:].argmax(-1)
    blocks = stream_blocks(groups, 5)
    assert blocks == [0, 1, 2, 3, 4]  # 4 functions x 5 samples, one batch of 5 each
    meta = {k: (v[:1] if torch.is_tensor(v) else v) for k, v in module.meta.as_meta().items()}
    meta = {
        **meta,
        "theta": [t[:1] * 50 for t in meta["theta"]],
        "feedback": [f[:1] for f in meta["feedback"]],
    }
    meta["init"] = {k: v[:1] for k, v in meta["init"].items()}
    meta["bias"] = [b[:1] for b in meta["bias"]]
    state = learner.init_state([torch.Generator().manual_seed(0)], "xavier_uniform", meta)
    followed = follow_stream(learner, state, meta, x, y, 5, xq, blocks)
    found = forgetting(followed["outputs"], blocks, groups, query_groups, 5)
    # directly: the outputs on the queries of functions 0..n-1 before and after the batch of function n
    outputs, current = [], state
    with torch.no_grad():
        for step in range(4):
            outputs.append(learner.network.forward(current.weights, xq, current.biases)[0][-1][0])
            current = learner.step(
                current, meta, x[:, step * 5 : (step + 1) * 5], y[:, step * 5 : (step + 1) * 5]
            )
        outputs.append(learner.network.forward(current.weights, xq, current.biases)[0][-1][0])
    assert math.isnan(found[0, 0])
    for n in range(1, 4):
        earlier = query_groups[0] < n
        expected = (outputs[n + 1][earlier] - outputs[n][earlier]).pow(2).mean()
        assert found[0, n].item() == pytest.approx(expected.item(), rel=1e-12)
        assert expected > 0
    torch.testing.assert_close(followed["state"].weights, current.weights)


def test_sgd_updates_point_along_the_negative_gradient_and_frozen_layers_not_at_all(float64):
    """The gradient-based learner (BP with F^0) makes exactly the gradient step: cosine 1 in its
    plastic layers, 0 in the frozen one; FA's ∠(W^T, B) is the angle of the flattened matrices."""
    module = module_for(
        "+experiment=flp_sine_iid", *TINY_SINE, "rule.terms=f0", "feedback.kind=bp", "feedback.learn=false"
    )
    learner = module.learner
    meta = module.meta.as_meta()
    state = learner.init_state(module.init_generators, "xavier_uniform", meta)
    task = module.samplers[0].sample()
    x, y = task.x_train[None, :5].expand(2, -1, -1), task.y_train[None, :5].expand(2, -1, -1)
    cos, after = update_gradient_cosine(learner, state, meta, x, y)
    torch.testing.assert_close(cos[:, 1:], torch.ones(2, 2))
    torch.testing.assert_close(cos[:, 0], torch.zeros(2))
    torch.testing.assert_close(after.weights[0], state.weights[0])

    fa = module_for(
        "+experiment=flp_sine_iid", *TINY_SINE, "rule.terms=f0", "feedback.kind=fa", "feedback.learn=false"
    )
    state = fa.learner.init_state(fa.init_generators, "xavier_uniform", fa.meta.as_meta())
    angles = feedback_weight_angles(fa.learner, state)
    for layer, (w, b) in enumerate(zip(state.weights, state.feedback)):
        u, v = w[0].T.reshape(-1), b[0].reshape(-1)
        expected = math.degrees(math.acos((u @ v / (u.norm() * v.norm())).item()))
        assert angles[0, layer].item() == pytest.approx(expected, rel=1e-10)
    state.feedback = [w.transpose(-1, -2).clone() for w in state.weights]  # symmetric: 0°
    assert feedback_weight_angles(fa.learner, state).abs().max() < 1e-5


def test_readout_fit_is_the_least_squares_readout_of_the_initial_features(float64):
    module = module_for("+experiment=flp_sine_iid", *TINY_SINE)
    learner = module.learner
    state = learner.init_state(module.init_generators, "xavier_uniform", module.meta.as_meta())
    task = module.samplers[0].sample()
    x, y = task.x_train[None].expand(2, -1, -1), task.y_train[None].expand(2, -1, -1)
    xq, yq = task.x_query[None].expand(2, -1, -1), task.y_query[None].expand(2, -1, -1)
    found = readout_fit(learner, state, x, y, xq, yq, ridge=1e-9)
    for t in range(2):
        features = [
            learner.network.forward([w[t : t + 1] for w in state.weights], z[t : t + 1])[0][-2][0]
            for z in (x, xq)
        ]
        h, hq = (torch.cat([f, torch.ones(len(f), 1)], 1) for f in features)
        readout = torch.linalg.lstsq(h, y[t]).solution
        assert found[t].item() == pytest.approx((hq @ readout - yq[t]).pow(2).mean().item(), rel=1e-5)


def test_meta_train_and_meta_test_classes_are_disjoint():
    module = module_for("+experiment=flp_classify_iid", *TINY_CLASSIFY)
    train_labels, test_labels = module.train_part[1], module.test_part[1]
    train_classes, test_classes = set(train_labels.tolist()), set(test_labels.tolist())
    assert len(test_classes) == 15 and len(train_classes) == 47 - 15 and not train_classes & test_classes
    assert split_classes(torch.arange(47), 15, 0)[1].tolist() == sorted(test_classes)
    for sampler in module.samplers:  # tasks are drawn from meta-training classes only
        assert set(sampler.labels.tolist()) == train_classes
    tests = build_samplers(module.cfg, module.test_part, module.trial_ids, STREAM_TEST_TASKS)
    assert all(set(s.labels.tolist()) == test_classes for s in tests)


def test_continual_classification_streams_present_one_class_after_another():
    module = module_for("+experiment=flp_classify_continual", *TINY_CLASSIFY, "model.remap_labels=true")
    task = module.samplers[0].sample()
    assert task.y_train.tolist() == [c for c in range(3) for _ in range(4)]
    iid = module_for("+experiment=flp_classify_iid", *TINY_CLASSIFY).samplers[0].sample()
    assert sorted(iid.y_train.tolist()) == [c for c in range(3) for _ in range(4)]


def test_meta_test_functions_are_new_draws():
    module = module_for("+experiment=flp_sine_iid", *TINY_SINE)
    tests = build_samplers(module.cfg, None, module.trial_ids, STREAM_TEST_TASKS)
    for fitted, tested in zip(module.samplers, tests):
        a, b = fitted.sample(), tested.sample()
        assert not torch.equal(a.y_query, b.y_query)
        assert fitted.generator.initial_seed() != tested.generator.initial_seed()


def test_task_options_are_checked():
    for overrides, field in (
        (["task.family=sine"], "model.loss"),
        (["+experiment=flp_sine_iid", "task.batches=3", "task.functions=7"], "task.batches"),
        (["+experiment=flp_sine_iid", "model.bias=false"], "model.learn_bias"),
        (["+experiment=flp_sine_iid", "rule.plastic=9"], "rule.plastic"),
        (["+experiment=flp_sine_iid", "task.test_classes=3"], "task.test_classes"),
        (["+experiment=flp_sine_iid", "rule.theta_init=-1e-3"], "rule.nonnegative"),
    ):
        with pytest.raises(ConfigError, match=field):
            validate(compose_with(*overrides))


def test_omniglot_absent_is_one_clear_error(tmp_path):
    from metaplast.data import DataError, load_dataset

    with pytest.raises(DataError, match=r"omniglot-py/images_evaluation is not there.*dataset=glyphs"):
        load_dataset("omniglot", tmp_path, "test", download=False)


def test_meta_test_summaries_count_diverged_episodes_and_leave_them_out():
    from metaplast.run.module import episode_mean, summary

    values = torch.tensor([[1.0, float("nan")], [3.0, 5.0]])  # (episodes, trials)
    mean = episode_mean(values, values.isfinite())
    assert mean.tolist() == [2.0, 5.0]
    found = summary(torch.tensor([2.0, float("nan"), 4.0]))
    assert (found["mean"], found["n"]) == (3.0, 2)
    assert found["se"] == pytest.approx(math.sqrt(2.0) / math.sqrt(2.0))


@pytest.mark.parametrize(
    "baseline",
    [
        [
            "rule.terms=f0",
            "feedback.kind=bp",
            "feedback.learn=false",
        ],  # gradient-based: SGD from a learned init
        ["rule.terms=f0", "feedback.kind=fa", "feedback.learn=false", "rule.share=all"],
        ["rule.terms=f0", "feedback.kind=dfa", "feedback.learn=false", "rule.share=all"],
        ["rule.terms=bio", "feedback.kind=fa", "feedback.learn=false", "rule.share=all"],
    ],
)
def test_baselines_meta_learn_their_initialisation_on_the_sine_task(baseline):
    """One episode of each baseline on the sine task: the meta-loss is finite and its gradient reaches
    the meta-learned initial weights of every layer (frozen ones too) and the rule's coefficients."""
    module = module_for("+experiment=flp_sine_iid", *TINY_SINE, *baseline, "rule.nonnegative=false")
    loss = module.training_step(None, 0)
    assert loss.isfinite()
    loss.backward()
    groups = module.meta.groups()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["init"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["theta"])


def test_the_start_line_describes_a_sine_stream_not_an_image_dataset():
    from metaplast.run.train import describe_data

    cfg = compose_with("+experiment=flp_sine_continual", "task.functions=4", "task.batches=8")
    assert describe_data(cfg, None) == "sine waves (4 functions, 8 batches per episode, continual)"
