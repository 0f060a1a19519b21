"""M-way few-shot task sampling (K training and Q query images per class, disjoint)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch


class Task(NamedTuple):
    """One task: a shuffled training stream and a query batch (or stacked ones, see stack_tasks)."""

    x_train: torch.Tensor  # (M*K, D)
    y_train: torch.Tensor  # (M*K,)
    x_query: torch.Tensor  # (M*Q, D)
    y_query: torch.Tensor  # (M*Q,)


#: How tasks are drawn: ``fresh`` (metaplast: M distinct classes, K + Q random images of each) or
#: ``authors`` (the authors' code: M classes drawn with replacement, always the first K training and
#: the next Q query images of each class in dataset order, so only K + Q images per class are used).
SAMPLING_MODES = ("fresh", "authors")

#: The order of a task's training stream: shuffled across classes (``iid``), or all K images of one
#: class, then all of the next (``continual``; Lindsey & Litwin-Kumar 2020), classes in drawn order.
STREAM_ORDERS = ("iid", "continual")


class TaskSampler:
    """Draws tasks of M classes with K training and Q query images each (see :data:`SAMPLING_MODES`).

    The training stream is shuffled across classes (``order='iid'``) or presented class after class
    (``order='continual'``, each class's images in random order); query images are grouped by class.
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
        mode: str = "fresh",
        order: str = "iid",
    ) -> None:
        if order not in STREAM_ORDERS:
            raise ValueError(f"order={order!r}: allowed: {', '.join(STREAM_ORDERS)}")
        if mode not in SAMPLING_MODES:
            raise ValueError(f"sampling={mode!r}: allowed: {', '.join(SAMPLING_MODES)}")
        if mode == "authors" and remap_labels:
            raise ValueError(
                "sampling='authors' draws classes with replacement, so a task can hold one class twice; "
                "it needs remap_labels=false (labels keep their dataset ids, as in the authors' code)"
            )
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        for name, value in (("M", M), ("K", K), ("Q", Q)):
            if value < 1:
                raise ValueError(f"{name}={value}: must be >= 1")
        self.classes, counts = torch.unique(labels, return_counts=True)
        if M > len(self.classes) and mode == "fresh":
            raise ValueError(f"M={M}: must be <= {len(self.classes)}, the number of classes present")
        smallest = int(counts.argmin())
        if K + Q > counts[smallest]:
            raise ValueError(
                f"K+Q={K}+{Q}={K + Q}: must be <= {int(counts[smallest])}, the number of images "
                f"of class {int(self.classes[smallest])} (the smallest class)"
            )
        self.images, self.labels = images, labels
        self.M, self.K, self.Q, self.remap_labels, self.mode = M, K, Q, remap_labels, mode
        self.order = order
        order = torch.argsort(labels, stable=True)
        self.class_indices = list(torch.split(order, counts.tolist()))
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> Task:
        """Draw one task."""
        M, K, Q, g = self.M, self.K, self.Q, self.generator
        if self.mode == "authors":  # with replacement; the first K + Q images of each class
            chosen = torch.randint(len(self.classes), (M,), generator=g)
            picks = [self.class_indices[c][: K + Q] for c in chosen.tolist()]
        else:
            chosen = torch.randperm(len(self.classes), generator=g)[:M]
            picks = []
            for c in chosen.tolist():
                indices = self.class_indices[c]
                picks.append(indices[torch.randperm(len(indices), generator=g)[: K + Q]])
        picks = torch.stack(picks)  # (M, K+Q) dataset indices
        train = picks[:, :K].reshape(-1)
        if self.order == "iid":
            train = train[torch.randperm(M * K, generator=g)]
        else:  # continual: class after class, each class's images in random order
            train = picks[:, :K][:, torch.randperm(K, generator=g)].reshape(-1)
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


def split_classes(labels: torch.Tensor, held_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint meta-training and meta-testing classes: ``held_out`` of the classes present, drawn
    with ``seed``, for meta-testing, the rest for meta-training (both sorted)."""
    classes = torch.unique(labels)
    if not 0 <= held_out < len(classes):
        raise ValueError(
            f"test_classes={held_out}: must be in 0..{len(classes) - 1} "
            f"(the dataset has {len(classes)} classes)"
        )
    order = classes[torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed))]
    return order[held_out:].sort().values, order[:held_out].sort().values


def stack_tasks(tasks: Sequence[Task]) -> Task:
    """Stack per-trial tasks along a new leading trials dimension."""
    return Task(*(torch.stack(parts) for parts in zip(*tasks, strict=True)))


def stream_seed(seed: int, trial: int, stream: int) -> int:
    """Independent seed of one random stream of one trial (0: weights and feedback, 1: tasks,
    2: the calibration episodes of ``rule.term_scale=auto``)."""
    return int(np.random.SeedSequence([seed, trial, stream]).generate_state(1, np.uint64)[0] >> 1)


def trial_generators(seed: int, trials, stream: int) -> list[torch.Generator]:
    """One generator per trial id, seeded with :func:`stream_seed`."""
    return [torch.Generator().manual_seed(stream_seed(seed, t, stream)) for t in trials]
