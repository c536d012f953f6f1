"""Tests for disco_fl.data: packaged data, loaders, datasets and seeded splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from disco_fl.data import (
    MNIST_MEAN,
    MNIST_STD,
    ArrayDataset,
    largest_remainder,
    load_builtin,
    load_image_folder,
    load_npz,
    split_households,
    stratified_split,
    to_tensor,
)


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    return load_builtin()


def _assert_partition(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)


# ----------------------------------------------------------------------------- builtin


def test_builtin_mnist_5k(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = mnist
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.array_equal(np.bincount(labels), np.full(10, 500))
    assert images.max() == 255 and images.min() == 0


def test_builtin_unknown_name() -> None:
    with pytest.raises(ValueError, match="mnist_5k"):
        load_builtin("cifar10")


# ----------------------------------------------------------------------------- splits


def test_stratified_4000_1000(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = mnist
    train, test = stratified_split(labels, [4000, 1000], seed=0)
    assert len(train) == 4000 and len(test) == 1000
    assert np.array_equal(np.bincount(labels[train]), np.full(10, 400))
    assert np.array_equal(np.bincount(labels[test]), np.full(10, 100))
    assert len(np.intersect1d(train, test)) == 0
    _assert_partition([train, test], 5000)
    again = stratified_split(labels, [4000, 1000], seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(again, [train, test], strict=True))
    other = stratified_split(labels, [4000, 1000], seed=1)
    assert not np.array_equal(other[1], test)
    fractions = stratified_split(labels, [0.8, 0.2], seed=0)
    assert [len(p) for p in fractions] == [4000, 1000]


def test_stratified_uneven_sizes_are_exact() -> None:
    labels = np.repeat(np.arange(3), [7, 11, 13])  # 31 examples
    parts = stratified_split(labels, [10, 10, 5], seed=3)
    assert [len(p) for p in parts] == [10, 10, 5]
    assert len(np.unique(np.concatenate(parts))) == 25
    for p in parts:
        quota = len(p) * np.array([7, 11, 13]) / 31
        assert np.all(np.abs(np.bincount(labels[p], minlength=3) - quota) < 2)
    thirds = stratified_split(labels, [1 / 3, 1 / 3, 1 / 3], seed=0)
    assert sorted(len(p) for p in thirds) == [10, 10, 11]
    _assert_partition(thirds, 31)


def test_stratified_validation() -> None:
    labels = np.zeros(10, dtype=np.int64)
    with pytest.raises(ValueError, match="only 10 examples"):
        stratified_split(labels, [8, 3])
    with pytest.raises(ValueError, match="sum to"):
        stratified_split(labels, [0.7, 0.4])
    with pytest.raises(ValueError, match="all ints"):
        stratified_split(labels, [5, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        stratified_split(labels, [-1, 2])
    with pytest.raises(ValueError, match="empty"):
        stratified_split(labels, [])
    with pytest.raises(ValueError, match="1-D"):
        stratified_split(np.zeros((2, 5), dtype=np.int64), [2])


def test_largest_remainder() -> None:
    assert largest_remainder(np.array([1.5, 1.5, 1.0]), 4).tolist() == [2, 1, 1]
    assert largest_remainder(np.array([0.2, 0.7, 0.1]), 1).tolist() == [0, 1, 0]
    counts = largest_remainder(np.array([0.9, 0.1]), 1, capacity=np.array([0, 1]))
    assert counts.tolist() == [0, 1]


def _class_tv_distance(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between household and global class histograms."""
    global_hist = np.bincount(labels, minlength=10) / len(labels)
    dists = [
        0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - global_hist).sum()
        for p in parts
    ]
    return float(np.mean(dists))


def test_households_iid(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = mnist
    parts = split_households(labels, 7, mode="iid", seed=0)
    _assert_partition(parts, 5000)
    assert sorted({len(p) for p in parts}) == [714, 715]
    assert _class_tv_distance(labels, parts) < 0.01


def test_households_dirichlet_is_skewed(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = mnist
    parts = split_households(labels, 10, mode="dirichlet", alpha=0.1, seed=0, min_size=10)
    _assert_partition(parts, 5000)
    assert min(len(p) for p in parts) >= 10
    iid = split_households(labels, 10, mode="iid", seed=0)
    assert _class_tv_distance(labels, parts) > 0.4
    assert _class_tv_distance(labels, parts) > 20 * _class_tv_distance(labels, iid)
    same = split_households(labels, 10, mode="dirichlet", alpha=0.1, seed=0, min_size=10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same, strict=True))
    mild = split_households(labels, 10, mode="dirichlet", alpha=100.0, seed=0)
    assert _class_tv_distance(labels, mild) < 0.1


def test_households_validation(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = mnist
    with pytest.raises(ValueError, match="mode"):
        split_households(labels, 3, mode="shards")
    with pytest.raises(ValueError, match="num_households"):
        split_households(labels, 0)
    with pytest.raises(ValueError, match="alpha"):
        split_households(labels, 3, mode="dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="at least 2000"):
        split_households(labels, 3, min_size=2000)
    with pytest.raises(ValueError, match="tries"):
        split_households(labels, 50, mode="dirichlet", alpha=0.01, min_size=90, max_tries=3)


# ----------------------------------------------------------------------------- npz


def test_load_npz(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.savez(path, x=images, y=np.array([1, 0], dtype=np.uint8))
    got_images, got_labels = load_npz(path, images_key="x", labels_key="y")
    assert np.array_equal(got_images, images)
    assert got_labels.dtype == np.int64 and got_labels.tolist() == [1, 0]


def test_load_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_npz(tmp_path / "missing.npz")
    images = np.zeros((2, 3, 3), dtype=np.uint8)
    cases: dict[str, tuple[dict[str, np.ndarray], str]] = {
        "nolabels.npz": ({"images": images}, "no array 'labels'"),
        "length.npz": ({"images": images, "labels": np.zeros(3, np.int64)}, "lengths must"),
        "dtype.npz": ({"images": images.astype(np.float32), "labels": np.zeros(2)}, "uint8"),
        "ndim.npz": ({"images": np.zeros((2, 9), np.uint8), "labels": np.zeros(2)}, "shape"),
        "labels.npz": ({"images": images, "labels": np.zeros(2, np.float64)}, "integers"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=message):
            load_npz(tmp_path / name)
    (tmp_path / "garbage.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="garbage.npz"):
        load_npz(tmp_path / "garbage.npz")


# ----------------------------------------------------------------------------- image folder


def _write_image(path: Path, value: int, size: tuple[int, int] = (6, 4), mode: str = "L") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    color: int | tuple[int, int, int] = value if mode == "L" else (value, 0, 255 - value)
    Image.new(mode, size, color).save(path)


def test_load_image_folder(tmp_path: Path) -> None:
    _write_image(tmp_path / "cat" / "a.png", 10)
    _write_image(tmp_path / "cat" / "b.bmp", 20)
    _write_image(tmp_path / "ant" / "x.PNG", 30)
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    images, labels, classes = load_image_folder(tmp_path)
    assert classes == ["ant", "cat"]
    assert images.shape == (3, 4, 6) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 1]
    assert [int(img[0, 0]) for img in images] == [30, 10, 20]

    rgb, _, _ = load_image_folder(tmp_path, size=(5, 7), grayscale=False)
    assert rgb.shape == (3, 5, 7, 3)
    square, _, _ = load_image_folder(tmp_path, size=8)
    assert square.shape == (3, 8, 8)


def test_load_image_folder_rgb_and_errors(tmp_path: Path) -> None:
    _write_image(tmp_path / "a" / "0.jpg", 100, mode="RGB")
    _write_image(tmp_path / "b" / "0.png", 50, size=(3, 3))
    with pytest.raises(ValueError, match="pass size"):
        load_image_folder(tmp_path)
    images, _, _ = load_image_folder(tmp_path, size=3)
    assert images.shape == (2, 3, 3, 3)  # one RGB image -> all converted to RGB
    (tmp_path / "b" / "1.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="1.png"):
        load_image_folder(tmp_path, size=3)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class"):
        load_image_folder(tmp_path, size=3)
    empty = tmp_path / "empty_root"
    empty.mkdir()
    with pytest.raises(ValueError, match="no class"):
        load_image_folder(empty)
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "missing")


# ----------------------------------------------------------------------------- datasets


def test_array_dataset_normalization(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = mnist
    dataset = ArrayDataset(images[:50], labels[:50])
    assert len(dataset) == 50
    x, y = dataset[7]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y) == int(labels[7])
    expected = (torch.from_numpy(images[7]).float() / 255 - MNIST_MEAN) / MNIST_STD
    torch.testing.assert_close(x[0], expected)
    X, Y = dataset.tensors()
    assert X.shape == (50, 1, 28, 28) and Y.tolist() == labels[:50].tolist()
    torch.testing.assert_close(X[7], x)
    full = to_tensor(images)
    assert abs(float(full.mean())) < 0.05 and abs(float(full.std()) - 1) < 0.05


def test_array_dataset_channels_and_errors() -> None:
    images = np.full((2, 3, 4, 3), 255, dtype=np.uint8)
    dataset = ArrayDataset(images, np.array([0, 1]), mean=(0.5, 0.0, 1.0), std=0.5)
    x, _ = dataset[1]
    assert x.shape == (3, 3, 4)
    assert x[:, 0, 0].tolist() == [1.0, 2.0, 0.0]
    with pytest.raises(ValueError, match="3 channels"):
        ArrayDataset(images, np.array([0, 1]), mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(images.astype(np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match="lengths"):
        ArrayDataset(images, np.array([0]))
    with pytest.raises(ValueError, match="std must be positive"):
        to_tensor(images, std=0.0)
