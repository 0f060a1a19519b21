"""The incremental sine-wave task family (FLP paper §5) against its definition."""

import math

import pytest
import torch

from metaplast.data.sine import SineTaskSampler


def test_episode_holds_the_functions_in_the_stated_ranges_and_orders():
    sampler = SineTaskSampler(functions=10, batches=40, batch_size=8, query=5, order="continual", seed=1)
    task = sampler.sample()
    assert task.x_train.shape == (320, 11) and task.y_train.shape == (320, 1)
    assert task.x_query.shape == (50, 11) and task.y_query.shape == (50, 1)
    index = task.x_train[:, 1:].argmax(1)
    assert torch.equal(index, torch.arange(10).repeat_interleave(32))  # one function after another
    assert (task.x_train[:, 1:].sum(1) == 1).all()
    x = task.x_train[:, 0]
    assert x.abs().max() <= 5
    # every function is A sin(x - φ) with A in [0.1, 5], φ in [0, π]: recover (A, φ) from two points
    for n in range(10):
        xs, ys = x[index == n][:2].double(), task.y_train[index == n][:2, 0].double()
        # A sin(x - φ) = a sin x + b cos x with a = A cos φ, b = -A sin φ
        system = torch.stack([torch.sin(xs), torch.cos(xs)], 1)
        a, b = torch.linalg.solve(system, ys)
        amplitude, phase = math.hypot(a, b), math.atan2(-b, a)
        assert 0.1 - 1e-4 <= amplitude <= 5 + 1e-4 and -1e-4 <= phase <= math.pi + 1e-4
        rest = x[index == n].double()
        torch.testing.assert_close(
            task.y_train[index == n, 0].double(), amplitude * torch.sin(rest - phase), rtol=1e-4, atol=1e-4
        )


def test_iid_order_mixes_the_functions_equally_and_the_paper_protocol_is_400_batches_of_32():
    task = SineTaskSampler(order="iid", seed=2).sample()
    assert task.x_train.shape == (400 * 32, 11)
    index = task.x_train[:, 1:].argmax(1)
    assert torch.bincount(index).tolist() == [1280] * 10
    assert not torch.equal(index, index.sort().values)  # shuffled


def test_resume_continues_the_same_episodes_and_bad_options_are_named():
    a, b = (
        SineTaskSampler(seed=3, batches=10, batch_size=10),
        SineTaskSampler(seed=3, batches=10, batch_size=10),
    )
    a.sample()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.sample().x_train, b.sample().x_train)
    with pytest.raises(ValueError, match="order='sometimes' is not allowed; allowed: iid, continual"):
        SineTaskSampler(order="sometimes")
    with pytest.raises(ValueError, match="must split equally over functions=3"):
        SineTaskSampler(functions=3, batches=10, batch_size=10)
