"""Data: the packaged MNIST subset, file loaders, datasets and seeded splits."""

from disco_fl.data.datasets import (
    BUILTIN_DATASETS,
    IMAGE_EXTENSIONS,
    MNIST_MEAN,
    MNIST_STD,
    ArrayDataset,
    load_builtin,
    load_image_folder,
    load_npz,
    to_tensor,
)
from disco_fl.data.splits import largest_remainder, split_households, stratified_split

__all__ = [
    "BUILTIN_DATASETS",
    "IMAGE_EXTENSIONS",
    "MNIST_MEAN",
    "MNIST_STD",
    "ArrayDataset",
    "largest_remainder",
    "load_builtin",
    "load_image_folder",
    "load_npz",
    "split_households",
    "stratified_split",
    "to_tensor",
]
