"""Hostile or careless configs (issue 6): random overrides through the real Hydra compose API.

Every draw must either run a tiny episode to completion or stop with a validation
error — Hydra's/OmegaConf's (wrong type, unknown key, bad syntax), ConfigError or
DataError — or, by design, DivergenceError (meta.max_diverged=1 and a diverging θ).
Any other exception fails the test. Deterministic (derandomized), offline, bounded.
"""

import csv
import math
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hydra.errors import HydraException
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from metaplast.data import DataError
from metaplast.run.config import ConfigError, validate
from metaplast.run.train import run
from metaplast.safety import DivergenceError

EXAMPLES = int(os.environ.get("METAPLAST_FUZZ_EXAMPLES", "25"))
CODE = "__import__('os').system('touch PWNED')"  # must stay a string, never run


def listing(values) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


NAMES = ["f0", "pool", "bio", "ehebb", "oja"]
#: Careless or hostile values; a draw applies up to two of them over a sensible config.
HOSTILE = [
    ["model.hidden=[4,0]"],
    ["model.hidden=[-1]"],
    ["model.hidden=null", "model.depth=2", "model.width=null"],
    ["model.hidden=null", "model.depth=-1", "model.width=3"],
    ["rule.terms=hebb"],
    ["rule=custom", "rule.terms=[0,12]"],
    ["rule=custom", "rule.terms=[2,2]"],
    ["rule=custom", "rule.terms=[]"],
    ["rule=per_layer", "rule.per_layer=[f0]"],
    ["rule.theta_init=nan"],
    ["rule.theta0_init=inf"],
    ["reg.lam=-1"],
    ["reg.lam=nan"],
    ["reg.lam=inf"],
    ["model.beta=0"],
    ["model.beta=inf"],
    ["meta.M=0"],
    ["meta.M=48"],
    ["meta.K=0"],
    ["meta.Q=12"],
    ["meta.trials=0"],
    ["meta.episodes=0"],
    ["meta.lr=0"],
    ["meta.lr=inf"],
    ["meta.lr=nan"],
    ["meta.max_diverged=0"],
    ["meta.first_trial=-1"],
    ["trainer.precision=bf16-mixed"],
    ["trainer.checkpoint_every=0"],
    ["dataset.per_class=0"],
    ["dataset=idx", "dataset.root=/nonexistent/metaplast"],
    ["dataset.split=val"],
    ["dataset.name=cifar"],
    ["meta.M=five"],
    ["feedback.kind=xfa"],
    ["model.hidden=[a]"],
    ["+meta.foo=1"],
    ["+model._target_=os.system"],
    ["+_target_=builtins.eval"],
    [f'logger.name="{CODE}"'],
    ["rule.terms=${oc.env:HOME}"],
]


@st.composite
def overrides(draw) -> list[str]:
    """A sensible tiny config (sizes, rules, λ, feedback, depth, M/K/Q), then up to two hostile values."""
    o = []
    if draw(st.booleans()):
        hidden = draw(st.lists(st.integers(1, 6), max_size=3))
        o.append("model.hidden=" + listing(hidden))
        depth = len(hidden) + 1
    else:
        depth = draw(st.integers(0, 2))
        o += ["model.hidden=null", f"model.depth={depth}", f"model.width={draw(st.integers(1, 5))}"]
        depth += 1
    kind = draw(st.sampled_from(["named", "custom", "per_layer"]))
    if kind == "named":
        o.append(f"rule.terms={draw(st.sampled_from(NAMES))}")
    elif kind == "custom":
        terms = draw(st.lists(st.integers(0, 9), min_size=1, max_size=4, unique=True))
        o += ["rule=custom", "rule.terms=" + listing(terms)]
    else:
        per_layer = draw(st.lists(st.sampled_from(NAMES), min_size=depth, max_size=depth))
        o += ["rule=per_layer", "rule.per_layer=" + listing(per_layer)]
    o.append(f"rule.theta_init={draw(st.sampled_from([0, 1e-3, 0.5, 1e30]))}")  # 1e30 diverges
    o.append(f"feedback={draw(st.sampled_from(['bp', 'fa', 'dfa']))}")
    o.append(f"feedback.grad_through_b={draw(st.booleans())}")
    o.append(f"feedback.init={draw(st.sampled_from(['xavier_uniform', 'xavier_normal']))}")
    o.append(f"reg={draw(st.sampled_from(['none', 'l1', 'l2']))}")
    o.append(f"reg.lam={draw(st.sampled_from([0, 1e-3, 1]))}")
    o.append(f"model.beta={draw(st.sampled_from([1, 10, 100]))}")
    o.append(f"model.remap_labels={draw(st.booleans())}")
    o.append(f"meta.M={draw(st.integers(1, 5))}")
    o.append(f"meta.K={draw(st.integers(1, 4))}")
    o.append(f"meta.Q={draw(st.integers(1, 3))}")
    o.append(f"meta.trials={draw(st.integers(1, 3))}")
    o.append("meta.episodes=1")
    o.append(f"meta.lr={draw(st.sampled_from([1e-3, 0.1]))}")
    o.append(f"meta.max_diverged={draw(st.sampled_from([1, 10]))}")
    o.append(f"trainer.precision={draw(st.sampled_from(['32-true', '64-true']))}")
    o.append(f"seed={draw(st.integers(0, 3))}")
    for hostile in draw(st.lists(st.sampled_from(HOSTILE), max_size=2)):
        o += hostile
    return o


def reason(error: BaseException) -> str:
    """The field an error names (ConfigError/DataError) or the error's kind."""
    text = str(error)
    if isinstance(error, (HydraException, OmegaConfBaseException)):
        return f"compose: {type(error).__name__}"
    field = text.split("=")[0].split(":")[0].split(" ")[0]
    return f"{type(error).__name__}: {field if '.' in field else text[:40]}"


def test_random_configs_run_or_stop_with_a_validation_error(make_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outcomes = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # bounded: no shrinking
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @example(["rule=ehebb", "feedback=fa", "reg=l1", "meta.trials=2"])  # the TINY run itself
    @example([f'logger.name="{CODE}"', "rule=oja"])
    @given(overrides())
    def check(draw):
        try:
            cfg = make_cfg("trainer.checkpoint_every=1", *draw)
        except (HydraException, OmegaConfBaseException) as error:
            outcomes[reason(error)] += 1
            return
        run_dir = Path(tempfile.mkdtemp(dir=tmp_path))
        try:
            run(cfg, run_dir)
        except (ConfigError, DataError, DivergenceError) as error:
            assert str(error), type(error)
            outcomes[reason(error)] += 1
            if not isinstance(error, DivergenceError):
                assert not (run_dir / "metrics.csv").exists()  # rejected before any work
            return
        outcomes["completed"] += 1
        with open(run_dir / "metrics.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == cfg.meta.trials * cfg.meta.episodes
        for row in rows:  # no NaN as a result: a finite number, or nan in a row flagged diverged
            for key, value in row.items():
                assert math.isfinite(float(value)) or row["meta_diverged"] == "1", (key, row)

    check()
    assert not (tmp_path / "PWNED").exists()
    rejected = sum(n for key, n in outcomes.items() if key != "completed")
    print(f"\nfuzzed {sum(outcomes.values())} configs: {outcomes['completed']} completed, {rejected} stopped")
    for key, n in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"  {n:3d}  {key}")
    assert outcomes["completed"] >= 3 and rejected >= 3, outcomes


if __name__ == "__main__":
    pytest.main([__file__, "-s", "-q"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("meta.lr=inf", "meta.lr=inf is not allowed; allowed: a finite number"),
        ("reg.lam=nan", "reg.lam=nan is not allowed; allowed: a finite number"),
        ("model.beta=inf", "model.beta=inf is not allowed"),
        ("rule.theta_init=-inf", "rule.theta_init=-inf is not allowed"),
        ("meta.max_diverged=0", "meta.max_diverged=0 is not allowed; allowed: an integer >= 1"),
        ("+model._target_=os.system", "model._target_ is not a known key; allowed keys here: hidden, depth"),
    ],
)
def test_non_finite_numbers_and_targets_are_rejected_by_name(make_cfg, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(make_cfg(override))


# --- the same for metaplast.evaluate (issue 14: the fuzzer extended to evaluate) ---------------------

EVAL_HOSTILE = [
    ["online.trials=0"],
    ["online.trials=-3"],
    ["online.samples=0"],
    ["online.samples=-1"],
    ["online.every=0"],
    ["online.every=1e9"],
    ["online.stream_split=val"],
    ["online.test_split=train2"],
    ["online.test_per_class=0"],
    ["theta={0:nan}"],
    ["theta={0:inf}"],
    ["theta={0:1e300}"],
    ["theta={12:0.1}"],
    ["theta={a:1}"],
    ["theta=[1,2]"],
    ["from_run=/nonexistent/metaplast-run"],
    ["from_trial=-1"],
    ["seed=-1"],
    ["seed=4294967296"],
    ["model.hidden=[0]"],
    ["model.init=normal"],
    ["model.init_std=-1"],
    ["dataset.per_class=0"],
    ["rule.terms=hebb"],
    ["feedback.kind=xfa"],
    ["+online.foo=1"],
    [f'from_run="{CODE}"'],
]


@st.composite
def eval_overrides(draw) -> list[str]:
    """A tiny online evaluation on the glyphs, then up to two hostile values."""
    o = ["dataset=glyphs", "dataset.per_class=6"]
    o.append("model.hidden=" + listing(draw(st.lists(st.integers(1, 8), min_size=1, max_size=2))))
    o.append(f"rule.terms={draw(st.sampled_from(['f0', 'bio', 'ehebb', 'oja']))}")
    o.append(f"feedback={draw(st.sampled_from(['bp', 'fa', 'dfa']))}")
    o.append(f"theta={{0:{draw(st.sampled_from([0, 1e-2, 1e30]))}}}")  # 1e30: the stream diverges
    o.append(f"online.trials={draw(st.integers(1, 3))}")
    o.append(f"online.samples={draw(st.integers(1, 20))}")
    o.append(f"online.every={draw(st.integers(1, 10))}")
    o.append(f"online.test_per_class={draw(st.sampled_from([1, 2]))}")
    o.append(f"seed={draw(st.integers(0, 3))}")
    for hostile in draw(st.lists(st.sampled_from(EVAL_HOSTILE), max_size=2)):
        o += hostile
    return o


def test_random_evaluations_run_or_stop_with_a_validation_error(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from metaplast.run.evaluate import run as evaluate
    from metaplast.safety import CheckpointError

    monkeypatch.chdir(tmp_path)
    outcomes = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(eval_overrides())
    def check(draw):
        try:
            with initialize_config_dir(str(CONF), version_base="1.3"):
                cfg = compose("evaluate", overrides=draw)
        except (HydraException, OmegaConfBaseException) as error:
            outcomes[reason(error)] += 1
            return
        out = Path(tempfile.mkdtemp(dir=tmp_path))
        try:
            table = evaluate(cfg, out)
        except (ConfigError, DataError, CheckpointError) as error:
            assert str(error) and "\n" not in str(error).strip(), error
            outcomes[reason(error)] += 1
            return
        except DivergenceError:  # every trial diverged: reported, exit 3 at the command line
            outcomes["every trial diverged"] += 1
            return
        outcomes["completed"] += 1
        for column in table.columns:  # a finite number, or nan in a row flagged diverged
            for value, diverged in zip(table[column], table.get("diverged", [0] * len(table))):
                if isinstance(value, float):
                    assert math.isfinite(value) or diverged, (column, table)

    check()
    assert not (tmp_path / "PWNED").exists()
    rejected = sum(n for key, n in outcomes.items() if key != "completed")
    done = outcomes["completed"]
    print(f"\nfuzzed {sum(outcomes.values())} evaluations: {done} completed, {rejected} stopped")
    for key, n in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"  {n:3d}  {key}")
    assert outcomes["completed"] >= 3 and rejected >= 3, outcomes
