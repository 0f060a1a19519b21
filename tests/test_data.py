"""IDX files, dataset loading (offline, from files the tests write) and task sampling."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from metaplast.data import (
    DataError,
    LabelledImages,
    TaskSampler,
    data_root,
    load_dataset,
    load_idx_pair,
    read_idx,
    stack_tasks,
    write_idx,
)

FASHION = Path("/usr/share/datasets/fashion-mnist")
IDX_CODES = {"uint8": 0x08, "int8": 0x09, "int16": 0x0B, "int32": 0x0C, "float32": 0x0D, "float64": 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """Reference IDX encoding, independent of metaplast.data.idx."""
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[array.dtype.name], array.ndim)
    header += b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def save_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def digit_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("dtype", list(IDX_CODES))
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_reads_every_dtype_exactly(tmp_path, dtype, suffix):
    rng = np.random.default_rng(1)
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = save_idx(tmp_path / f"a-idx3{suffix}", array)
    tensor = read_idx(path)
    assert tensor.dtype == getattr(torch, dtype)
    np.testing.assert_array_equal(tensor.numpy(), array)


@pytest.mark.parametrize("dtype", list(IDX_CODES))
def test_write_idx_matches_reference_encoding(tmp_path, dtype):
    array = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
    write_idx(tmp_path / "a", torch.from_numpy(array))
    assert (tmp_path / "a").read_bytes() == idx_bytes(array)
    write_idx(tmp_path / "a.gz", torch.from_numpy(array))
    assert gzip.decompress((tmp_path / "a.gz").read_bytes()) == idx_bytes(array)


def test_truncated_idx_file_names_file_and_sizes(tmp_path):
    path = tmp_path / "cut-images-idx3-ubyte"
    path.write_bytes(idx_bytes(digit_images(2))[:-5])
    with pytest.raises(DataError, match=r"cut-images-idx3-ubyte.*1568 payload bytes, found 1563"):
        read_idx(path)


def test_oversized_idx_file_is_rejected(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(digit_images(2)) + b"\0")
    with pytest.raises(DataError, match="needs 1568 payload bytes, found 1569"):
        read_idx(path)


def test_truncated_gzip_names_file(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(digit_images(2)))[:-20])
    with pytest.raises(DataError, match="cut.gz"):
        read_idx(path)


def test_truncated_header_names_file(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(idx_bytes(digit_images(2))[:9])
    with pytest.raises(DataError, match=r"short: expected 3 dimension sizes"):
        read_idx(path)


@pytest.mark.parametrize("magic", [b"\x01\x00\x08\x03", b"\x00\x00\x0a\x03"])
def test_bad_magic_names_file(tmp_path, magic):
    path = tmp_path / "magic"
    path.write_bytes(magic + idx_bytes(digit_images(1))[4:])
    with pytest.raises(DataError, match=r"magic: bad magic number"):
        read_idx(path)


def test_missing_idx_file(tmp_path):
    with pytest.raises(DataError, match="nothing-here does not exist"):
        read_idx(tmp_path / "nothing-here")


def test_load_idx_pair_checks_counts(tmp_path):
    images = save_idx(tmp_path / "im", digit_images(5))
    labels = save_idx(tmp_path / "lab", np.arange(4, dtype=np.uint8))
    with pytest.raises(DataError, match=r"5 images in .*im but 4 labels in .*lab"):
        load_idx_pair(images, labels)
    good = save_idx(tmp_path / "lab5", np.arange(5, dtype=np.uint8))
    x, y = load_idx_pair(images, good)
    assert x.shape == (5, 28, 28) and y.tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- datasets


def write_raw(directory: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz=False):
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    save_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
    save_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels.astype(np.uint8))


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_family_reads_torchvision_raw_layout(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    images, labels = digit_images(30), np.arange(30) % 10
    write_raw(raw, "t10k", images, labels)
    write_raw(raw, "train", digit_images(20, seed=1), np.arange(20) % 10)
    data = load_dataset(name, root=tmp_path)
    assert isinstance(data, LabelledImages)
    assert (data.name, data.num_classes, data.synthetic) == (name, 10, False)
    assert data.images.dtype == torch.float32 and data.images.shape == (30, 784)
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == labels.tolist()
    assert 0 <= data.images.min() and data.images.max() <= 1
    np.testing.assert_allclose(data.images.numpy(), images.reshape(30, 784) / 255, rtol=1e-6)
    # the same files are what torchvision itself reads
    reference = getattr(torchvision.datasets, folder)(str(tmp_path), train=False)
    assert torch.equal(data.images, reference.data.reshape(30, 784).float() / 255)
    assert load_dataset(name, root=tmp_path, split="train").images.shape == (20, 784)


def test_emnist_is_transposed_upright(tmp_path):
    raw = tmp_path / "EMNIST" / "raw"
    stored = np.zeros((47, 28, 28), dtype=np.uint8)
    stored[:, 0, :] = 255  # EMNIST files hold images transposed: a top row in the file ...
    write_raw(raw, "emnist-balanced-test", stored, np.arange(47), gz=True)
    data = load_dataset("emnist", root=tmp_path)
    upright = data.images.view(47, 28, 28)
    assert torch.all(upright[:, :, 0] == 1) and upright[:, :, 1:].sum() == 0  # ... is a left column
    assert data.num_classes == 47 and data.labels.tolist() == list(range(47))

    write_raw(raw, "emnist-balanced-test", stored, np.arange(47))  # plain files: torchvision too
    reference = torchvision.datasets.EMNIST(str(tmp_path), split="balanced", train=False)
    assert torch.equal(upright, reference.data.transpose(1, 2).float() / 255)


def test_missing_dataset_names_directory_and_offline_alternatives(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("emnist", root=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "EMNIST" / "raw") in message
    assert "glyphs" in message and "/usr/share/datasets/fashion-mnist" in message
    assert "METAPLAST_DATA" in message


def test_failed_download_raises_data_error(tmp_path, monkeypatch):
    def offline(self):
        raise RuntimeError("Error downloading: no network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(DataError, match=r"download into .*MNIST.raw failed.*no network.*glyphs"):
        load_dataset("mnist", root=tmp_path, download=True)


def test_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("METAPLAST_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    write_raw(tmp_path / "env" / "MNIST" / "raw", "t10k", digit_images(3), np.arange(3))
    assert load_dataset("mnist").images.shape == (3, 784)
    monkeypatch.delenv("METAPLAST_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".cache" / "metaplast" / "data"


def test_idx_dataset_from_any_directory(tmp_path):
    write_raw(tmp_path, "t10k", digit_images(6), np.array([0, 1, 2, 6, 6, 3]), gz=True)
    data = load_dataset("idx", root=tmp_path)
    assert data.num_classes == 7 and data.images.shape == (6, 784) and not data.synthetic
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*not found in"):
        load_dataset("idx", root=tmp_path, split="train")


def test_bad_names_and_options():
    with pytest.raises(DataError, match="allowed: emnist, mnist, fashion_mnist, idx, glyphs"):
        load_dataset("cifar")
    with pytest.raises(DataError, match="unknown split 'val'"):
        load_dataset("mnist", split="val")
    with pytest.raises(DataError, match="takes no options"):
        load_dataset("mnist", per_class=3)


@pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").exists(), reason="no FashionMNIST")
def test_real_fashion_mnist_idx_files():
    data = load_dataset("idx", root=FASHION, split="test")
    assert data.images.shape == (10000, 784) and data.num_classes == 10
    assert torch.bincount(data.labels).tolist() == [1000] * 10
    assert data.images.min() == 0 and data.images.max() == 1


# ---------------------------------------------------------------- sampler

CLASS_IDS = [3, 7, 10, 11, 20, 42]


def toy_dataset(per_class=(12, 15, 13, 20, 12, 14)):
    """Image i holds its index i in pixel 0, so tasks reveal which images they used."""
    labels = torch.cat([torch.full((n,), c) for c, n in zip(CLASS_IDS, per_class, strict=True)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    images = torch.zeros(len(labels), 784)
    images[:, 0] = torch.arange(len(labels), dtype=torch.float32)
    return images, labels


def indices(x):
    return x[..., 0].long()


def test_task_shapes_classes_and_disjoint_images():
    images, labels = toy_dataset()
    sampler = TaskSampler(images, labels, M=4, K=5, Q=3, seed=0)
    for _ in range(20):
        task = sampler.sample()
        assert task.x_train.shape == (20, 784) and task.x_query.shape == (12, 784)
        train, query = indices(task.x_train), indices(task.x_query)
        assert torch.equal(labels[train], task.y_train) and torch.equal(labels[query], task.y_query)
        assert len(set(train.tolist()) | set(query.tolist())) == 32  # all distinct, disjoint
        classes = task.y_query.view(4, 3)[:, 0]
        assert len(set(classes.tolist())) == 4 and torch.all(task.y_query.view(4, 3) == classes[:, None])
        assert sorted(torch.bincount(task.y_train).tolist())[-4:] == [5, 5, 5, 5]
        assert set(task.y_train.tolist()) == set(classes.tolist())


def test_training_stream_is_shuffled_across_classes():
    images, labels = toy_dataset()
    sampler = TaskSampler(images, labels, M=5, K=10, Q=2, seed=1)
    tasks = [sampler.sample() for _ in range(10)]
    changes = [(t.y_train[1:] != t.y_train[:-1]).sum().item() for t in tasks]
    # grouped by class would give 4 changes; a random order of 5 x 10 gives about 40
    assert min(changes) > 20


def test_classes_are_drawn_uniformly():
    images, labels = toy_dataset()
    sampler = TaskSampler(images, labels, M=2, K=3, Q=3, seed=2)
    counts = torch.zeros(43)
    for _ in range(600):
        counts += torch.bincount(sampler.sample().y_query, minlength=43) / 3
    assert torch.all((counts[CLASS_IDS] - 200).abs() < 50)  # 600 * 2 / 6 = 200 each


def test_same_seed_same_tasks_and_state_round_trip():
    images, labels = toy_dataset()
    a = TaskSampler(images, labels, 3, 4, 2, seed=5)
    b = TaskSampler(images, labels, 3, 4, 2, seed=5)
    c = TaskSampler(images, labels, 3, 4, 2, seed=6)
    first = [a.sample() for _ in range(3)]
    assert all(torch.equal(t.x_train, b.sample().x_train) for t in first)
    assert not all(torch.equal(t.x_train, c.sample().x_train) for t in first)

    state = a.state_dict()
    expected = [a.sample() for _ in range(3)]
    c.load_state_dict(state)
    for task in expected:
        assert all(torch.equal(u, v) for u, v in zip(task, c.sample(), strict=True))


def test_remap_labels_follow_draw_order():
    images, labels = toy_dataset()
    plain = TaskSampler(images, labels, 4, 5, 3, seed=3)
    remapped = TaskSampler(images, labels, 4, 5, 3, seed=3, remap_labels=True)
    for _ in range(5):
        p, r = plain.sample(), remapped.sample()
        assert torch.equal(p.x_train, r.x_train) and torch.equal(p.x_query, r.x_query)
        assert r.y_query.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
        drawn = p.y_query.view(4, 3)[:, 0]
        assert torch.equal(drawn[r.y_train], p.y_train)


def test_sampler_validation_messages():
    images, labels = toy_dataset()
    with pytest.raises(ValueError, match=r"M=0: must be >= 1"):
        TaskSampler(images, labels, 0, 5, 3, seed=0)
    with pytest.raises(ValueError, match=r"Q=0: must be >= 1"):
        TaskSampler(images, labels, 2, 5, 0, seed=0)
    with pytest.raises(ValueError, match=r"M=7: must be <= 6, the number of classes present"):
        TaskSampler(images, labels, 7, 5, 3, seed=0)
    with pytest.raises(ValueError, match=r"K\+Q=10\+3=13: must be <= 12.* class 3 "):
        TaskSampler(images, labels, 2, 10, 3, seed=0)
    with pytest.raises(ValueError, match="86 images but 85 labels"):
        TaskSampler(images, labels[:-1], 2, 5, 3, seed=0)
    TaskSampler(images, labels, 6, 10, 2, seed=0)  # K+Q equal to the smallest class is fine


def test_stack_tasks_adds_leading_trials_dimension():
    images, labels = toy_dataset()
    sampler = TaskSampler(images, labels, 3, 4, 2, seed=0)
    tasks = [sampler.sample() for _ in range(5)]
    stacked = stack_tasks(tasks)
    assert stacked.x_train.shape == (5, 12, 784) and stacked.y_query.shape == (5, 6)
    assert torch.equal(stacked.y_train[2], tasks[2].y_train)
