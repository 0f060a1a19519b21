"""Every experiment preset composes, holds the papers' protocol, and starts (one episode, tiny sizes)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF, TINY
from metaplast.analysis.report import TABLE1_PAPER
from metaplast.run.config import register
from metaplast.run.evaluate import run as evaluate
from metaplast.run.train import run as train

TRAIN_PRESETS = {  # preset: (rule terms or per_layer, feedback, regulariser)
    "fig3": ("f0", "fa", "none"),
    "fig4": ("pool", "fa", "l1"),
    "fig5": ("ehebb", "fa", "l1"),
    "s2": ("bio", "fa", "none"),
    "fig7": ("oja", "fa", "none"),
    "s5": ("pool", "fa", "none"),
    "table1": (None, "fa", "none"),
}
ONLINE_PRESETS = ("fig1_online", "s4_online", "s6_online")  # +eval_experiment=<name> of metaplast.evaluate


def compose_with(config, *overrides, hydra=False):
    register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(config, overrides=list(overrides), return_hydra_config=hydra)


def test_every_preset_file_is_tested():
    names = {p.stem for p in (Path(CONF) / "experiment").glob("*.yaml")}
    names -= {n for n in names if n.startswith(("flp_", "oja_"))}  # test_flp_runner.py, test_oja_paper.py
    assert names == set(TRAIN_PRESETS)
    online = {p.stem for p in (Path(CONF) / "eval_experiment").glob("*.yaml")}
    online -= {n for n in online if n.startswith("oja_")}  # tested in test_oja_paper.py
    assert online == set(ONLINE_PRESETS)


@pytest.mark.parametrize("preset", sorted(TRAIN_PRESETS))
def test_train_preset_composes_with_the_papers_protocol(preset):
    cfg = compose_with("config", f"+experiment={preset}")
    terms, feedback, reg = TRAIN_PRESETS[preset]
    assert cfg.rule.terms == terms
    assert cfg.feedback.kind.value == feedback and cfg.reg.kind.value == reg
    assert (cfg.meta.episodes, cfg.meta.trials, cfg.meta.M, cfg.meta.K, cfg.meta.Q) == (
        500 if preset == "table1" else 600,
        20,
        5,
        50,
        10,
    )
    quick = compose_with("config", f"+experiment={preset}", "meta=quick")
    assert (quick.meta.episodes, quick.meta.trials) == (100, 4)


def test_the_discovery_presets_limit_meta_gradient_spikes_and_null_restores_the_papers_adam():
    for preset in ("fig4", "s5"):
        meta = compose_with("config", f"+experiment={preset}").meta
        assert (meta.spike_limit, meta.restart_momentum) == (10, True)
        plain = compose_with(
            "config", f"+experiment={preset}", "meta.spike_limit=null", "meta.restart_momentum=false"
        ).meta
        assert (plain.spike_limit, plain.restart_momentum) == (None, False)
    meta = compose_with("config", "rule=pool").meta  # the options' own defaults
    assert (meta.spike_limit, meta.restart_momentum) == (None, False)


def test_sweeping_presets_list_the_papers_conditions():
    assert compose_with("config", "+experiment=fig3", hydra=True).hydra.sweeper.params == {
        "feedback": "fa,bp"
    }
    assert compose_with("config", "+experiment=s5", hydra=True).hydra.sweeper.params == {"reg": "none,l2"}
    table1 = compose_with("config", "+experiment=table1", hydra=True)
    assert table1.model.hidden == [130, 70]
    assignments = table1.hydra.sweeper.params["rule.per_layer"].split("],[")
    uses = {tuple(part == "ehebb" for part in a.strip("[]").split(",")) for a in assignments}
    assert len(assignments) == 7 and uses == set(TABLE1_PAPER)


@pytest.mark.parametrize("preset", sorted(TRAIN_PRESETS))
def test_train_preset_starts(preset, tmp_path):
    cfg = compose_with("config", f"+experiment={preset}", *TINY, "meta.episodes=1")
    module = train(cfg, tmp_path)
    assert module.global_step == 1
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 1 + cfg.meta.trials


@pytest.mark.parametrize("preset", ONLINE_PRESETS)
def test_online_preset_composes_and_starts(preset, tmp_path):
    cfg = compose_with("evaluate", f"+eval_experiment={preset}")
    assert cfg.online.samples is None and cfg.online.trials == 20  # one epoch, the papers' 20 trials
    assert cfg.dataset.name == ("fashion_mnist" if preset == "s4_online" else "mnist")
    if preset == "s6_online":
        assert cfg.feedback.init.value == "xavier_normal"
    tiny = ["dataset=glyphs", "dataset.per_class=12", "model.hidden=[16,12]", "online.trials=2"]
    tiny += ["online.samples=10", "online.every=5", "online.test_per_class=2"]
    table = evaluate(compose_with("evaluate", f"+eval_experiment={preset}", *tiny), tmp_path)
    assert sorted(table["sample"].unique()) == [0, 5, 10]
