"""Image data loading: the packaged MNIST subset, ``.npz`` files and image folders."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from disco_fl.core.pixels import per_channel, pixels_to_input

__all__ = [
    "BUILTIN_DATASETS",
    "IMAGE_EXTENSIONS",
    "MNIST_MEAN",
    "MNIST_STD",
    "ArrayDataset",
    "load_builtin",
    "load_image_folder",
    "load_npz",
    "to_pixels",
    "to_tensor",
]

#: Mean of MNIST pixel values scaled to [0, 1].
MNIST_MEAN: float = 0.1307
#: Standard deviation of MNIST pixel values scaled to [0, 1].
MNIST_STD: float = 0.3081
#: Names accepted by :func:`load_builtin` (files ``disco_fl/data/<name>.npz``).
BUILTIN_DATASETS: tuple[str, ...] = ("mnist_5k",)
#: File suffixes read by :func:`load_image_folder` (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp")

_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "F"})


def _validate_arrays(images: np.ndarray, labels: np.ndarray, source: str) -> np.ndarray:
    """Check images/labels and return the labels as int64."""
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: images must be uint8, got dtype {images.dtype}")
    if images.ndim not in (3, 4):
        raise ValueError(
            f"{source}: images must have shape [N, H, W] or [N, H, W, C], got {images.shape}"
        )
    if labels.ndim != 1:
        raise ValueError(f"{source}: labels must be 1-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source}: labels must be integers, got dtype {labels.dtype}")
    if len(images) != len(labels):
        raise ValueError(
            f"{source}: {len(images)} images but {len(labels)} labels; lengths must match"
        )
    if labels.size and labels.min() < 0:
        raise ValueError(f"{source}: labels must be non-negative, got {labels.min()}")
    return labels.astype(np.int64)


def load_npz(
    path: str | os.PathLike[str],
    images_key: str = "images",
    labels_key: str = "labels",
) -> tuple[np.ndarray, np.ndarray]:
    """Load images and labels from a ``.npz`` file (pickles are refused).

    Parameters
    ----------
    path : str or os.PathLike
        The ``.npz`` file.
    images_key : str, default "images"
        Array of uint8 images, shape [N, H, W] or [N, H, W, C].
    labels_key : str, default "labels"
        Array of N non-negative integer labels.

    Returns
    -------
    images : np.ndarray
        uint8, as stored.
    labels : np.ndarray
        int64, shape [N].

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a readable ``.npz``, a key is missing, or dtypes, dimensions or
        lengths are wrong.
    """
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"npz file {source!r} does not exist")
    try:
        loaded = np.load(source, allow_pickle=False)
    except Exception as exc:  # not a zip/npy file, or a pickle
        raise ValueError(f"could not read npz file {source!r}: {exc}") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{source!r} holds a single array, not an .npz archive")
    with loaded as npz:
        for key in (images_key, labels_key):
            if key not in npz.files:
                raise ValueError(
                    f"{source!r} has no array {key!r}; it contains {sorted(npz.files)}"
                )
        try:
            images = npz[images_key]
            labels = npz[labels_key]
        except Exception as exc:  # corrupt member
            raise ValueError(f"could not read npz file {source!r}: {exc}") from exc
    return images, _validate_arrays(images, labels, repr(source))


def _builtin_file(filename: str) -> Any:
    """The packaged data file; if this copy of the package carries code only (a Flower app
    bundle of a repository checkout holds ``*.py`` files, no data), the same file of another
    copy of ``disco_fl`` on ``sys.path`` (the installed package or the checkout)."""
    resource = resources.files("disco_fl.data").joinpath(filename)
    if resource.is_file():
        return resource
    for finder in sys.meta_path:  # path entries, and editable installs' own finders
        find = getattr(finder, "find_spec", None)
        try:
            spec = find("disco_fl", None) if find is not None else None
        except Exception:  # a finder that cannot answer for this name
            spec = None
        for loc in (spec.submodule_search_locations or []) if spec is not None else []:
            candidate = Path(loc) / "data" / filename
            if candidate.is_file():
                return candidate
    for entry in sys.path:
        candidate = Path(entry or ".") / "disco_fl" / "data" / filename
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"built-in data file {filename} is not in the disco_fl package")


def load_builtin(name: str = "mnist_5k") -> tuple[np.ndarray, np.ndarray]:
    """Load a dataset shipped inside the package (works from a non-editable install).

    Parameters
    ----------
    name : str, default "mnist_5k"
        One of :data:`BUILTIN_DATASETS`. "mnist_5k": 5000 MNIST digits, 500 per class.

    Returns
    -------
    images : np.ndarray
        uint8, shape [N, H, W] ([5000, 28, 28] for "mnist_5k").
    labels : np.ndarray
        int64, shape [N].
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown builtin dataset {name!r}; known: {', '.join(BUILTIN_DATASETS)}")
    resource = _builtin_file(f"{name}.npz")
    with resource.open("rb") as fh, np.load(fh, allow_pickle=False) as npz:
        images = npz["images"]
        labels = npz["labels"]
    return images, _validate_arrays(images, labels, f"builtin dataset {name!r}")


def _normalize_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    error = ValueError(f"size must be a positive int or (height, width), got {size!r}")
    if isinstance(size, bool):
        raise error
    if isinstance(size, int):
        height = width = size
    else:
        try:
            height, width = size
        except (TypeError, ValueError):
            raise error from None
    for dim in (height, width):
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise error
    return height, width


def load_image_folder(
    root: str | os.PathLike[str],
    size: int | tuple[int, int] | None = None,
    grayscale: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load a torchvision-``ImageFolder``-style tree ``root/<class_name>/<image>``.

    Classes are the sub-directories of ``root`` sorted by name (label i is the i-th name);
    files with suffixes in :data:`IMAGE_EXTENSIONS` are read with Pillow in sorted order, other
    files are ignored.

    Parameters
    ----------
    root : str or os.PathLike
        The top directory.
    size : int, (int, int) or None, default None
        Resize every image to (height, width) (an int means square) with bilinear filtering.
        None keeps the original sizes, which must then all be equal.
    grayscale : bool or None, default None
        True converts to 8-bit grayscale ("L"), False to RGB. None picks grayscale if every
        image is grayscale ("1", "L", "LA", "I", "I;16" or "F" mode) and RGB otherwise.

    Returns
    -------
    images : np.ndarray
        uint8, [N, H, W] for grayscale or [N, H, W, 3] for RGB.
    labels : np.ndarray
        int64, shape [N].
    class_names : list of str
        Sorted class names.

    Raises
    ------
    FileNotFoundError
        If ``root`` is not a directory.
    ValueError
        If there are no class directories, a class has no images, an image cannot be read, or
        (with ``size=None``) images differ in size.
    """
    from PIL import Image, UnidentifiedImageError

    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"image folder {os.fspath(root)!r} is not a directory")
    target = _normalize_size(size)
    class_names = sorted(
        p.name for p in root_path.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not class_names:
        raise ValueError(f"image folder {os.fspath(root)!r} has no class sub-directories")

    files: list[tuple[Path, int]] = []
    for label, name in enumerate(class_names):
        found = sorted(
            p
            for p in (root_path / name).iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not found:
            raise ValueError(
                f"class directory {os.fspath(root_path / name)!r} has no images "
                f"(suffixes {', '.join(IMAGE_EXTENSIONS)})"
            )
        files.extend((p, label) for p in found)

    loaded: list[Image.Image] = []
    for path, _ in files:
        try:
            with Image.open(path) as opened:
                opened.load()
                loaded.append(opened.copy())
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise ValueError(f"could not read image {os.fspath(path)!r}: {exc}") from exc

    gray = all(img.mode in _GRAYSCALE_MODES for img in loaded) if grayscale is None else grayscale
    arrays: list[np.ndarray] = []
    for img, (path, _) in zip(loaded, files, strict=True):
        converted = img.convert("L" if gray else "RGB")
        if target is not None:
            converted = converted.resize((target[1], target[0]), Image.Resampling.BILINEAR)
        arr = np.asarray(converted, dtype=np.uint8)
        if arrays and arr.shape != arrays[0].shape:
            raise ValueError(
                f"image {os.fspath(path)!r} has shape {arr.shape} but {os.fspath(files[0][0])!r} "
                f"has {arrays[0].shape}; pass size=... to resize"
            )
        arrays.append(arr)
    labels = np.fromiter((label for _, label in files), dtype=np.int64, count=len(files))
    return np.stack(arrays), labels, class_names


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 images ``[N, H, W]`` or ``[N, H, W, C]`` as a uint8 tensor ``(N, C, H, W)`` (a
    view where it can be; read-only arrays are copied)."""
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got dtype {images.dtype}")
    if not images.flags.writeable:  # torch tensors must not alias read-only memory
        images = images.copy()
    if images.ndim == 3:
        return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    if images.ndim == 4:
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    raise ValueError(f"images must be [N, H, W] or [N, H, W, C], got shape {images.shape}")


def to_tensor(
    images: np.ndarray,
    mean: float | Sequence[float] = MNIST_MEAN,
    std: float | Sequence[float] = MNIST_STD,
) -> torch.Tensor:
    """Convert uint8 images to a normalized float32 tensor ``(x / 255 - mean) / std``
    (:func:`disco_fl.core.pixels.pixels_to_input`, the conversion the serving nodes make of
    uint8 requests).

    Parameters
    ----------
    images : np.ndarray
        uint8, [N, H, W] or [N, H, W, C].
    mean : float or sequence of float, default MNIST_MEAN (0.1307)
        One value for all channels or one per channel.
    std : float or sequence of float, default MNIST_STD (0.3081)
        One value for all channels or one per channel; must be positive.

    Returns
    -------
    torch.Tensor
        float32, shape (N, C, H, W) (C = 1 for [N, H, W] input).
    """
    x = to_pixels(images)
    channels = x.shape[1]
    return pixels_to_input(
        x, per_channel(mean, channels, "mean"), per_channel(std, channels, "std")
    )


class ArrayDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A map-style dataset over uint8 image arrays and integer labels.

    Parameters
    ----------
    images : np.ndarray
        uint8, [N, H, W] or [N, H, W, C].
    labels : np.ndarray
        N non-negative integer labels.
    mean : float or sequence of float, default MNIST_MEAN (0.1307)
        Normalization mean (per channel or shared).
    std : float or sequence of float, default MNIST_STD (0.3081)
        Normalization standard deviation (per channel or shared).

    Notes
    -----
    ``dataset[i]`` returns ``(x, y)``: ``x`` float32 (C, H, W) equal to
    ``(image / 255 - mean) / std`` and ``y`` an int64 scalar tensor. :meth:`tensors` returns
    the whole set at once; it is computed on first use and cached.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        mean: float | Sequence[float] = MNIST_MEAN,
        std: float | Sequence[float] = MNIST_STD,
    ) -> None:
        images = np.asarray(images)
        self.labels: np.ndarray = _validate_arrays(images, np.asarray(labels), "ArrayDataset")
        self.images: np.ndarray = images
        channels = 1 if images.ndim == 3 else images.shape[3]
        self._mean = per_channel(mean, channels, "mean")
        self._std = per_channel(std, channels, "std")
        self.mean = mean
        self.std = std
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = pixels_to_input(to_pixels(self.images[index : index + 1]), self._mean, self._std)[0]
        return x, torch.tensor(self.labels[index], dtype=torch.int64)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return all examples as ``(X, y)``: float32 (N, C, H, W) and int64 (N,)."""
        if self._cache is None:
            self._cache = (
                to_tensor(self.images, self.mean, self.std),
                torch.from_numpy(self.labels.copy()),
            )
        return self._cache
