"""Datasets (torchvision, IDX files, SYNTHETIC glyphs) and M-way few-shot task sampling."""

from metaplast.data.datasets import LOADERS, LabelledImages, data_root, load_dataset
from metaplast.data.glyphs import GLYPH_CLASSES, generate_glyphs, load_glyphs
from metaplast.data.idx import DataError, load_idx_pair, read_idx, write_idx
from metaplast.data.sampler import Task, TaskSampler, stack_tasks, stream_seed, trial_generators

__all__ = [
    "GLYPH_CLASSES",
    "LOADERS",
    "DataError",
    "LabelledImages",
    "Task",
    "TaskSampler",
    "data_root",
    "generate_glyphs",
    "load_dataset",
    "load_glyphs",
    "load_idx_pair",
    "read_idx",
    "stack_tasks",
    "stream_seed",
    "trial_generators",
    "write_idx",
]
