"""The dataset of a config (shared by training and online evaluation)."""

from __future__ import annotations

from metaplast.data import LabelledImages, load_dataset


def load_data(cfg, split: str | None = None) -> LabelledImages:
    """``cfg.dataset`` (its ``split`` unless ``split`` is given)."""
    dataset = cfg.dataset
    options = {"per_class": dataset.per_class} if dataset.name == "glyphs" else {}
    return load_dataset(
        dataset.name, dataset.root, split or dataset.split, dataset.download, dataset.seed, **options
    )
