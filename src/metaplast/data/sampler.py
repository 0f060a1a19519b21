"""M-way few-shot task sampling (K training and Q query images per class, disjoint)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class Task(NamedTuple):
    """One task: a shuffled training stream and a query batch (or stacked ones, see stack_tasks)."""

    x_train: torch.Tensor  # (M*K, D)
    y_train: torch.Tensor  # (M*K,)
    x_query: torch.Tensor  # (M*Q, D)
    y_query: torch.Tensor  # (M*Q,)


class TaskSampler:
    """Draws tasks of M distinct classes with K training and Q query images each.

    The training stream is shuffled across classes; query images are grouped by class.
    Labels keep their dataset ids unless remap_labels, which maps the i-th drawn class to i.
    All randomness comes from the sampler's own generator, seeded with seed.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        M: int,
        K: int,
        Q: int,
        seed: int,
        remap_labels: bool = False,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        for name, value in (("M", M), ("K", K), ("Q", Q)):
            if value < 1:
                raise ValueError(f"{name}={value}: must be >= 1")
        self.classes, counts = torch.unique(labels, return_counts=True)
        if M > len(self.classes):
            raise ValueError(f"M={M}: must be <= {len(self.classes)}, the number of classes present")
        smallest = int(counts.argmin())
        if K + Q > counts[smallest]:
            raise ValueError(
                f"K+Q={K}+{Q}={K + Q}: must be <= {int(counts[smallest])}, the number of images "
                f"of class {int(self.classes[smallest])} (the smallest class)"
            )
        self.images, self.labels = images, labels
        self.M, self.K, self.Q, self.remap_labels = M, K, Q, remap_labels
        order = torch.argsort(labels, stable=True)
        self.class_indices = list(torch.split(order, counts.tolist()))
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> Task:
        """Draw one task."""
        M, K, Q, g = self.M, self.K, self.Q, self.generator
        chosen = torch.randperm(len(self.classes), generator=g)[:M]
        picks = []
        for c in chosen.tolist():
            indices = self.class_indices[c]
            picks.append(indices[torch.randperm(len(indices), generator=g)[: K + Q]])
        picks = torch.stack(picks)  # (M, K+Q) dataset indices
        train = picks[:, :K].reshape(-1)[torch.randperm(M * K, generator=g)]
        query = picks[:, K:].reshape(-1)
        if self.remap_labels:
            remap = torch.empty_like(self.classes)
            remap[chosen] = torch.arange(M)
            y_train = remap[torch.searchsorted(self.classes, self.labels[train])]
            y_query = torch.arange(M).repeat_interleave(Q)
        else:
            y_train, y_query = self.labels[train], self.labels[query]
        return Task(self.images[train], y_train, self.images[query], y_query)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generator state, so a resumed run continues the same task stream."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def stack_tasks(tasks: Sequence[Task]) -> Task:
    """Stack per-trial tasks along a new leading trials dimension."""
    return Task(*(torch.stack(parts) for parts in zip(*tasks, strict=True)))
