"""The dataset of a config (shared by training and online evaluation)."""

from __future__ import annotations

import torch

from metaplast.data import LabelledImages, load_dataset


def load_data(cfg, split: str | None = None) -> LabelledImages:
    """``cfg.dataset`` (its ``split`` unless ``split`` is given); for ``task.family=sine`` its shape
    only (:func:`sine_shape`)."""
    task = getattr(cfg, "task", None)
    if task is not None and getattr(task.family, "value", task.family) == "sine":
        return sine_shape(task.functions)
    dataset = cfg.dataset
    options = {"per_class": dataset.per_class} if dataset.name == "glyphs" else {}
    return load_dataset(
        dataset.name, dataset.root, split or dataset.split, dataset.download, dataset.seed, **options
    )


def sine_shape(functions: int) -> LabelledImages:
    """The sine task has no dataset: an empty one of its input width (x and the one-hot function
    index) and one output, for the code that sizes the network from the data."""
    return LabelledImages(torch.zeros(0, 1 + functions), torch.zeros(0, dtype=torch.long), 1, "sine", True)
