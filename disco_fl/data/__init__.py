"""Data: the packaged MNIST subset, file loaders, datasets, seeded splits, the
segmentation / super-resolution data derived from the digits, and (optional extra) a Hugging
Face dataset on disk partitioned by Flower Datasets (:mod:`disco_fl.data.flower_datasets`)."""

from disco_fl.data.datasets import (
    BUILTIN_DATASETS,
    IMAGE_EXTENSIONS,
    MNIST_MEAN,
    MNIST_STD,
    ArrayDataset,
    load_builtin,
    load_image_folder,
    load_npz,
    to_pixels,
    to_tensor,
)
from disco_fl.data.flower_datasets import (
    HF_PARTITIONERS,
    HF_PREFIX,
    HFSpec,
    hf_partition_indices,
    load_hf_partition,
    parse_hf_spec,
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
    "HF_PARTITIONERS",
    "HF_PREFIX",
    "IMAGE_EXTENSIONS",
    "INK_THRESHOLD",
    "MNIST_MEAN",
    "MNIST_STD",
    "PIXEL_TASKS",
    "SEGMENTATION_CLASSES",
    "ArrayDataset",
    "HFSpec",
    "hf_partition_indices",
    "largest_remainder",
    "load_builtin",
    "load_hf_partition",
    "load_image_folder",
    "load_npz",
    "parse_hf_spec",
    "segmentation_data",
    "split_households",
    "stratified_split",
    "super_resolution_data",
    "task_data",
    "to_pixels",
    "to_tensor",
]
