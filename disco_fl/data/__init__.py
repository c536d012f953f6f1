"""Data: the packaged MNIST subset, file loaders, datasets, seeded splits, and the
segmentation / super-resolution data derived from the digits."""

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
from disco_fl.data.pixel_tasks import (
    INK_THRESHOLD,
    PIXEL_TASKS,
    SEGMENTATION_CLASSES,
    segmentation_data,
    super_resolution_data,
    task_data,
)
from disco_fl.data.splits import largest_remainder, split_households, stratified_split

__all__ = [
    "BUILTIN_DATASETS",
    "IMAGE_EXTENSIONS",
    "INK_THRESHOLD",
    "MNIST_MEAN",
    "MNIST_STD",
    "PIXEL_TASKS",
    "SEGMENTATION_CLASSES",
    "ArrayDataset",
    "largest_remainder",
    "load_builtin",
    "load_image_folder",
    "load_npz",
    "segmentation_data",
    "split_households",
    "stratified_split",
    "super_resolution_data",
    "task_data",
    "to_tensor",
]
