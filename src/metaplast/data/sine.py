"""Incremental sine waves (Lindsey & Litwin-Kumar 2020, §5; Javed & White 2019): a regression task
family, fully synthetic.

Each episode draws ``functions`` sines ``f_n(x) = A_n sin(x - φ_n)`` with amplitude
``A_n ~ U[0.1, 5]`` and phase ``φ_n ~ U[0, π]``; an input holds ``x ~ U[-5, 5]`` and the one-hot
index n of its function (so ``1 + functions`` numbers), the target is ``f_n(x)``. The training
stream is ``batches`` mini-batches of ``batch_size`` samples, drawn equally from the functions,
in random order (``iid``) or one function after another (``continual``); the query set asks for
``query`` new inputs of every function. Draws come from the sampler's own generator.
"""

from __future__ import annotations

import math

import torch

from metaplast.data.sampler import Task

ORDERS = ("iid", "continual")


class SineTaskSampler:
    """Episodes of the incremental sine-wave task (see the module docstring)."""

    def __init__(
        self,
        functions: int = 10,
        batches: int = 400,
        batch_size: int = 32,
        query: int = 10,
        order: str = "iid",
        seed: int = 0,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: float = 5.0,
    ) -> None:
        if order not in ORDERS:
            raise ValueError(f"order={order!r} is not allowed; allowed: {', '.join(ORDERS)}")
        for name, value in (("functions", functions), ("batches", batches), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name}={value} is not allowed; allowed: an integer >= 1")
        if (batches * batch_size) % functions:
            raise ValueError(
                f"batches x batch_size = {batches * batch_size} samples must split equally over "
                f"functions={functions}"
            )
        self.functions, self.batches, self.batch_size, self.query = functions, batches, batch_size, query
        self.order, self.amplitude, self.phase, self.x_range = order, amplitude, phase, x_range
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def input_dim(self) -> int:
        return 1 + self.functions

    def _uniform(self, shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=self.generator)

    def _samples(self, index: torch.Tensor, amplitude, phase):
        x = self._uniform(index.shape, -self.x_range, self.x_range)
        inputs = torch.cat([x[:, None], torch.nn.functional.one_hot(index, self.functions).float()], 1)
        return inputs, (amplitude[index] * torch.sin(x - phase[index]))[:, None]

    def sample(self) -> Task:
        amplitude = self._uniform(self.functions, *self.amplitude)
        phase = self._uniform(self.functions, *self.phase)
        per_function = self.batches * self.batch_size // self.functions
        index = torch.arange(self.functions).repeat_interleave(per_function)  # continual: in order
        if self.order == "iid":
            index = index[torch.randperm(len(index), generator=self.generator)]
        x_train, y_train = self._samples(index, amplitude, phase)
        x_query, y_query = self._samples(
            torch.arange(self.functions).repeat_interleave(self.query), amplitude, phase
        )
        return Task(x_train, y_train, x_query, y_query)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
