"""The SYNTHETIC glyphs: classes, determinism, image statistics and the on-disk cache."""

import pytest
import torch
import torchvision

import metaplast.data.glyphs as glyphs
from metaplast.data import GLYPH_CLASSES, DataError, generate_glyphs, load_dataset

PER_CLASS = 3


@pytest.fixture(scope="module")
def small_set():
    return generate_glyphs(PER_CLASS, seed=0)


def test_classes_match_emnist_balanced_label_order():
    assert list(GLYPH_CLASSES) == torchvision.datasets.EMNIST.classes_split_dict["balanced"]


def test_shape_dtype_and_labels(small_set):
    images, labels = small_set
    assert images.shape == (47 * PER_CLASS, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [PER_CLASS] * 47


def test_same_seed_is_bit_identical_and_seeds_differ(small_set):
    images, labels = small_set
    again, again_labels = generate_glyphs(PER_CLASS, seed=0)
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    assert not torch.equal(images, generate_glyphs(PER_CLASS, seed=1)[0])


def test_independent_of_default_dtype(small_set):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        images, _ = generate_glyphs(PER_CLASS, seed=0)
    finally:
        torch.set_default_dtype(previous)
    assert torch.equal(images, small_set[0])


def test_images_look_like_centred_varied_characters(small_set):
    images, _ = small_set
    x = images.float() / 255
    ink = (x > 0.5).float().mean((1, 2))
    assert torch.all(ink > 0.02) and torch.all(ink < 0.65)  # a character, not blank or a blob
    coords = torch.arange(28.0) + 0.5
    mass = x.sum((1, 2))
    centre_x = (x.sum(1) * coords).sum(1) / mass
    centre_y = (x.sum(2) * coords).sum(1) / mass
    assert (centre_x - 14).abs().mean() < 1.5 and (centre_y - 14).abs().mean() < 1.5
    assert x[:, :2].mean() < 0.05 and x[:, -2:].mean() < 0.05  # mostly dark border
    same_class = x.view(47, PER_CLASS, -1)
    assert torch.all((same_class[:, 0] - same_class[:, 1]).abs().mean(1) > 0.02)  # varied


def test_jitter_options_change_images_and_are_validated():
    plain = generate_glyphs(1, seed=0, rotation=0, scale=0, aspect=0, shear=0, translate=0, elastic=0)
    jittered = generate_glyphs(1, seed=0)
    assert not torch.equal(plain[0], jittered[0])
    thin = generate_glyphs(2, seed=0, strokes=[-1])[0].float().mean()
    thick = generate_glyphs(2, seed=0, strokes=[2])[0].float().mean()
    assert thick > 1.5 * thin
    with pytest.raises(DataError, match=r"unknown glyph options \['wobble'\]"):
        generate_glyphs(1, wobble=2)
    with pytest.raises(DataError, match=r"strokes \(9,\): need one or more widths in -3..4"):
        generate_glyphs(1, strokes=[9])
    with pytest.raises(DataError, match="per_class must be >= 1"):
        generate_glyphs(0)


def test_load_dataset_caches_and_reuses(tmp_path, monkeypatch, small_set):
    data = load_dataset("glyphs", root=tmp_path, per_class=PER_CLASS)
    assert data.synthetic and data.name == "glyphs" and data.num_classes == 47
    assert data.images.shape == (47 * PER_CLASS, 784) and data.images.dtype == torch.float32
    assert torch.equal(data.images, small_set[0].view(-1, 784).float() / 255)
    assert [p.name for p in tmp_path.iterdir()] == [glyphs.glyphs_cache_path(tmp_path, PER_CLASS, 0).name]

    def no_generation(*args, **kwargs):
        raise AssertionError("cache not used")

    monkeypatch.setattr(glyphs, "generate_glyphs", no_generation)
    cached = load_dataset("glyphs", root=tmp_path, per_class=PER_CLASS)
    assert torch.equal(cached.images, data.images) and torch.equal(cached.labels, data.labels)


def test_corrupt_cache_is_rebuilt(tmp_path, small_set):
    path = glyphs.glyphs_cache_path(tmp_path, PER_CLASS, 0)
    path.write_bytes(b"not a torch file")
    images, _ = glyphs.load_glyphs(tmp_path, PER_CLASS, seed=0)
    assert torch.equal(images, small_set[0])
    assert torch.equal(torch.load(path, weights_only=True)["images"], small_set[0])
    assert len(list(tmp_path.iterdir())) == 1  # no temporary file left behind


def test_options_and_split_select_distinct_sets(tmp_path):
    a = glyphs.glyphs_cache_path(tmp_path, 3, 0)
    assert glyphs.glyphs_cache_path(tmp_path, 3, 0, rotation=10) == a  # the default value
    assert glyphs.glyphs_cache_path(tmp_path, 3, 0, strokes=[0, 1, 2]) == a
    assert glyphs.glyphs_cache_path(tmp_path, 3, 0, rotation=30) != a
    test = load_dataset("glyphs", root=tmp_path, per_class=1)
    train = load_dataset("glyphs", root=tmp_path, per_class=1, split="train")
    assert not torch.equal(test.images, train.images)
