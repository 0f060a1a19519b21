"""Load a labelled image dataset by name: torchvision's EMNIST/MNIST/FashionMNIST, IDX files,
or the SYNTHETIC glyphs."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

from metaplast.data.glyphs import GLYPH_CLASSES, load_glyphs
from metaplast.data.idx import DataError, load_idx_pair

SPLITS = ("test", "train")
#: The most classes a dataset may have: an IDX label id of 10^6 would build a 10^6-unit output layer.
MAX_CLASSES = 1000
OFFLINE_HINT = (
    "Offline alternatives: dataset=glyphs (synthetic, generated locally); "
    "dataset=idx dataset.root=/usr/share/datasets/fashion-mnist (real FashionMNIST, after "
    "`apt-get install dataset-fashion-mnist`); or put the files under a directory given by "
    "dataset.root or the METAPLAST_DATA environment variable."
)


@dataclass(frozen=True)
class LabelledImages:
    """Flattened images (N, H*W) float32 in [0, 1] and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    synthetic: bool


def data_root(root: str | os.PathLike | None = None) -> Path:
    """root if given, else $METAPLAST_DATA, else ~/.cache/metaplast/data."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("METAPLAST_DATA"):
        return Path(os.environ["METAPLAST_DATA"]).expanduser()
    return Path.home() / ".cache" / "metaplast" / "data"


def _idx_names(prefix: str) -> tuple[str, str]:
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find(directory: Path, name: str) -> Path | None:
    """directory/name or directory/name.gz, whichever exists."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_pair(directory: Path, prefix: str, dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read {prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz] from directory."""
    names = _idx_names(prefix)
    paths = [_find(directory, name) for name in names]
    if None in paths:
        raise DataError(
            f"dataset {dataset!r}: {' and '.join(names)} (optionally .gz) not found in "
            f"{directory}. {OFFLINE_HINT}"
        )
    return load_idx_pair(*paths)


def _to_float(images: torch.Tensor, source: str) -> torch.Tensor:
    """(N, H, W) images as float32 (N, H*W) in [0, 1]; refuses empty sets, zero-size or
    non-finite images and float pixels outside [0, 1]."""
    if images.dim() != 3:
        raise DataError(f"{source}: expected images of shape (N, H, W), found {tuple(images.shape)}")
    if 0 in images.shape:
        raise DataError(
            f"{source}: images of shape {tuple(images.shape)}; "
            "allowed: N >= 1 images of H x W >= 1 x 1 pixels"
        )
    flat = images.reshape(images.shape[0], -1)
    if images.dtype == torch.uint8:
        return flat.float() / 255
    flat = flat.float()
    bad = ~flat.isfinite()
    if bad.any():
        first = int(bad.any(1).nonzero()[0])
        raise DataError(
            f"{source}: {int(bad.sum())} pixel values are NaN or infinite (the first in image {first}); "
            "allowed: finite pixel values in [0, 1]"
        )
    if flat.min() < 0 or flat.max() > 1:
        raise DataError(f"{source}: {images.dtype} pixel values must lie in [0, 1]")
    return flat


def _check_labels(labels: torch.Tensor, num_classes: int | None, source: str) -> torch.Tensor:
    """int64 labels in ``0..num_classes-1`` (None: the ids must stay below :data:`MAX_CLASSES`)."""
    if labels.is_floating_point():
        raise DataError(f"{source}: labels of type {labels.dtype}; allowed: integer class ids")
    labels = labels.long()
    if labels.numel() == 0:
        raise DataError(f"{source}: no labels; allowed: one integer class id per image")
    limit = MAX_CLASSES if num_classes is None else num_classes
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= limit:
        bad = low if low < 0 else high
        declared = "" if num_classes is None else " (the dataset's declared classes)"
        raise DataError(
            f"{source}: label id {bad} is out of range; allowed: class ids 0..{limit - 1}{declared}"
            + (f"; at most {MAX_CLASSES} classes, one output unit each" if num_classes is None else "")
        )
    return labels


def _torchvision_loader(
    dataset_class: type, prefix: Callable[[str], str], num_classes: int, transposed: bool = False
) -> Callable[..., LabelledImages]:
    """Loader for one of torchvision's MNIST-family datasets, read from its raw folder."""

    def load(name: str, root: Path, split: str, download: bool, seed: int) -> LabelledImages:
        raw = root / dataset_class.__name__ / "raw"
        if download and None in (_find(raw, n) for n in _idx_names(prefix(split))):
            extra = {"split": "balanced"} if dataset_class is torchvision.datasets.EMNIST else {}
            try:
                dataset_class(str(root), train=split == "train", download=True, **extra)
            except Exception as err:  # no network, mirror down, bad checksum...
                raise DataError(
                    f"dataset {name!r}: download into {raw} failed ({err}). {OFFLINE_HINT}"
                ) from err
        images, labels = _read_pair(raw, prefix(split), name)
        if transposed:
            images = images.transpose(1, 2)
        labels = _check_labels(labels, num_classes, str(raw))
        return LabelledImages(_to_float(images, str(raw)), labels, num_classes, name, False)

    return load


def _mnist_prefix(split: str) -> str:
    return "t10k" if split == "test" else "train"


def _load_idx(name: str, root: Path, split: str, download: bool, seed: int) -> LabelledImages:
    """Any directory holding {t10k,train}-{images-idx3,labels-idx1}-ubyte[.gz]."""
    images, labels = _read_pair(root, _mnist_prefix(split), name)
    labels = _check_labels(labels, None, f"dataset 'idx' in {root}")
    return LabelledImages(_to_float(images, str(root)), labels, int(labels.max()) + 1, name, False)


def _load_glyphs(name: str, root: Path, split: str, download: bool, seed: int, **options) -> LabelledImages:
    """The SYNTHETIC glyphs; split "train" draws from a different seed stream than "test"."""
    stream = seed if split == "test" else seed + 1_000_003
    images, labels = load_glyphs(root, seed=stream, **options)
    return LabelledImages(_to_float(images, "glyphs"), labels, len(GLYPH_CLASSES), name, True)


def _load_omniglot(name: str, root: Path, split: str, download: bool, seed: int) -> LabelledImages:
    """torchvision's Omniglot (Lake et al. 2015), the FLP paper's few-shot set: split "train" is its
    background alphabets (964 characters), "test" its evaluation alphabets (659, disjoint); images
    resized to 28 x 28 (white strokes on black, as the MNIST family), labels the character ids."""
    background = split == "train"
    try:
        data = torchvision.datasets.Omniglot(str(root), background=background, download=download)
    except Exception as err:  # not there (RuntimeError), or the download failed
        folder = root / "omniglot-py" / ("images_background" if background else "images_evaluation")
        raise DataError(
            f"dataset {name!r}: {folder} is not there"
            + (f" and its download failed ({err})" if download else " (dataset.download=false)")
            + f". {OFFLINE_HINT}"
        ) from err
    images, labels = [], []
    for image, label in data:
        small = image.convert("L").resize((28, 28), resample=2)  # bilinear
        images.append(torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8))
        labels.append(label)
    images = 255 - torch.stack(images).view(-1, 28, 28)  # Omniglot draws black strokes on white
    labels = _check_labels(torch.tensor(labels), None, f"dataset 'omniglot' in {root}")
    return LabelledImages(_to_float(images, str(root)), labels, int(labels.max()) + 1, name, False)


LOADERS: dict[str, Callable[..., LabelledImages]] = {
    "emnist": _torchvision_loader(
        torchvision.datasets.EMNIST,
        lambda split: f"emnist-balanced-{split}",
        num_classes=47,
        transposed=True,  # EMNIST's files store each image transposed
    ),
    "mnist": _torchvision_loader(torchvision.datasets.MNIST, _mnist_prefix, 10),
    "fashion_mnist": _torchvision_loader(torchvision.datasets.FashionMNIST, _mnist_prefix, 10),
    "idx": _load_idx,
    "glyphs": _load_glyphs,
    "omniglot": _load_omniglot,
}


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "test",
    download: bool = False,
    seed: int = 0,
    **kw,
) -> LabelledImages:
    """Load dataset name ("emnist", "mnist", "fashion_mnist", "idx" or "glyphs").

    root defaults to $METAPLAST_DATA, else ~/.cache/metaplast/data. Only glyphs takes extra
    keyword options (per_class and the jitter strengths of metaplast.data.glyphs); seed only
    matters for glyphs. Nothing is downloaded unless download=True.
    """
    if name not in LOADERS:
        raise DataError(f"unknown dataset {name!r}; allowed: {', '.join(LOADERS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if kw and name != "glyphs":
        raise DataError(f"dataset {name!r} takes no options, got {sorted(kw)}")
    return LOADERS[name](name, data_root(root), split, download, seed, **kw)
