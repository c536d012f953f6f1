"""A node's data from a Hugging Face dataset on disk, partitioned by Flower Datasets.

Optional: needs the ``datasets`` extra (``pip install 'disco_fl[datasets]'``: Flower Datasets,
``flwr-datasets``, and Hugging Face ``datasets``). Nothing is downloaded: the path must exist
on the node (a ``datasets.Dataset`` or ``DatasetDict`` written by ``save_to_disk``, or a local
directory or file that ``datasets.load_dataset`` reads with one of its packaged builders:
``imagefolder``, ``parquet``, ``csv``, ``json``, ``arrow``); a hub name is refused. Set
``HF_DATASETS_OFFLINE=1`` on a node that should never reach the hub.

A node's ``data`` setting (and ``eval-data``), parsed by :func:`parse_hf_spec`::

    hf:<path>:<partitioner>:<partition>/<partitions>[:<key>=<value>]...

- ``<path>``: the dataset on disk (it may contain ``:``; the fields after it are read from
  the right).
- ``<partitioner>``: ``iid`` (:class:`flwr_datasets.partitioner.IidPartitioner`) or
  ``dirichlet`` (:class:`flwr_datasets.partitioner.DirichletPartitioner`, label skew by the
  label column).
- ``<partition>/<partitions>``: this node's partition id in ``[0, partitions)``.
- options, each at most once: ``alpha=<a>`` (Dirichlet concentration > 0, default 0.5;
  ``dirichlet`` only), ``seed=<s>`` (default 42, Flower Datasets' own), ``min-size=<m>``
  (Dirichlet: the smallest partition, default 1), ``image=<column>`` (default ``image``),
  ``label=<column>`` (default ``label``), ``split=<name>`` (a ``DatasetDict``'s split, or
  ``load_dataset``'s; default ``train``).

Example: ``hf:/data/digits:dirichlet:0/3:alpha=0.3:seed=7:image=img``.

As ``flwr_datasets.FederatedDataset`` does, the rows are shuffled with ``seed`` first and
then partitioned (``IidPartitioner`` cuts the shuffled rows into contiguous shards,
``DirichletPartitioner`` draws with the same ``seed``), so every node that names the same
dataset, partitioner and seed gets its own part of the same partition. The partitioner runs
on the row ids and labels only; a node decodes only its own rows.

:func:`load_hf_partition` returns what :func:`disco_fl.data.load_npz` returns: ``images``
uint8 ``(N, H, W)`` (grayscale) or ``(N, H, W, C)``, ``labels`` int64 ``(N,)``. An
``Image`` column is decoded with Pillow (grayscale if every image is, else RGB, as
:func:`disco_fl.data.load_image_folder`); an array column (``Array2D`` / ``Array3D`` or nested
lists) must hold integers in ``0..255``. Labels: a ``ClassLabel`` or an integer column.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from disco_fl.data.datasets import _GRAYSCALE_MODES, _validate_arrays

__all__ = [
    "HF_PARTITIONERS",
    "HF_PREFIX",
    "HFSpec",
    "hf_partition_indices",
    "load_hf_partition",
    "parse_hf_spec",
]

#: The prefix of a node's ``data`` setting that names a Hugging Face dataset.
HF_PREFIX = "hf:"
#: Partitioner names accepted in an ``hf:`` spec.
HF_PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet")
_OPTIONS = ("alpha", "seed", "min-size", "image", "label", "split")
_INSTALL = "pip install 'disco_fl[datasets]'"
_FORM = "hf:<path>:<iid|dirichlet>:<partition>/<partitions>[:key=value...]"
_FILE_BUILDERS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".arrow": "arrow",
}


@dataclass(frozen=True)
class HFSpec:
    """A parsed ``hf:`` data setting (see the module docstring)."""

    path: str
    partitioner: str
    partition_id: int
    num_partitions: int
    alpha: float = 0.5
    seed: int = 42
    min_size: int = 1
    image: str = "image"
    label: str = "label"
    split: str = "train"


def parse_hf_spec(spec: str) -> HFSpec:
    """``"hf:<path>:<partitioner>:<i>/<n>[:key=value...]"`` -> :class:`HFSpec`.

    Raises ``ValueError`` naming the setting and what is wrong. The path is not checked here
    (:func:`load_hf_partition` does).
    """
    s = spec.strip()
    if not s.startswith(HF_PREFIX):
        raise ValueError(f"data {spec!r}: expected {_FORM}")
    tokens = s[len(HF_PREFIX) :].split(":")
    options: dict[str, str] = {}
    while tokens and "=" in tokens[-1]:
        key, _, value = tokens.pop().partition("=")
        key = key.strip()
        if key not in _OPTIONS:
            raise ValueError(f"data {spec!r}: unknown option {key!r}; known: {', '.join(_OPTIONS)}")
        if key in options:
            raise ValueError(f"data {spec!r}: option {key!r} given twice")
        if not value.strip():
            raise ValueError(f"data {spec!r}: option {key!r} has no value")
        options[key] = value.strip()
    if len(tokens) < 3 or not ":".join(tokens[:-2]).strip():
        raise ValueError(f"data {spec!r}: expected {_FORM}")
    path = ":".join(tokens[:-2]).strip()
    partitioner = tokens[-2].strip().lower()
    if partitioner not in HF_PARTITIONERS:
        known = ", ".join(HF_PARTITIONERS)
        raise ValueError(f"data {spec!r}: unknown partitioner {tokens[-2]!r}; known: {known}")
    try:
        i_s, n_s = tokens[-1].split("/")
        i, n = int(i_s), int(n_s)
    except ValueError as e:
        raise ValueError(
            f"data {spec!r}: expected '<partition>/<partitions>' after the partitioner, got "
            f"{tokens[-1]!r} ({_FORM})"
        ) from e
    if n < 1:
        raise ValueError(f"data {spec!r}: the number of partitions must be >= 1, got {n}")
    if not 0 <= i < n:
        raise ValueError(f"data {spec!r}: partition {i} is not in [0, {n})")
    if "alpha" in options and partitioner != "dirichlet":
        raise ValueError(f"data {spec!r}: 'alpha' applies to the dirichlet partitioner only")
    if "min-size" in options and partitioner != "dirichlet":
        raise ValueError(f"data {spec!r}: 'min-size' applies to the dirichlet partitioner only")
    try:
        alpha = float(options.get("alpha", 0.5))
        seed = int(options.get("seed", 42))
        min_size = int(options.get("min-size", 1))
    except ValueError as e:
        raise ValueError(f"data {spec!r}: {e}") from e
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"data {spec!r}: alpha must be a positive number, got {alpha}")
    if seed < 0:
        raise ValueError(f"data {spec!r}: seed must be >= 0, got {seed}")
    if min_size < 0:
        raise ValueError(f"data {spec!r}: min-size must be >= 0, got {min_size}")
    return HFSpec(
        path=path,
        partitioner=partitioner,
        partition_id=i,
        num_partitions=n,
        alpha=alpha,
        seed=seed,
        min_size=min_size,
        image=options.get("image", "image"),
        label=options.get("label", "label"),
        split=options.get("split", "train"),
    )


def _modules() -> tuple[Any, Any]:
    """``(datasets, flwr_datasets.partitioner)``, imported on first use."""
    try:
        import datasets
        import flwr_datasets.partitioner as partitioner
    except ImportError as e:
        raise ImportError(
            f"'hf:' data needs Flower Datasets (flwr-datasets) and Hugging Face datasets: "
            f"{_INSTALL} ({e})"
        ) from e
    return datasets, partitioner


def _load(spec: HFSpec, datasets: Any) -> Any:
    """The ``datasets.Dataset`` at ``spec.path`` (its ``spec.split``), read from disk only."""
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data 'hf:{spec.path}:...': {str(path)!r} does not exist (a dataset saved with "
            f"save_to_disk, a local folder or a parquet / csv / json / arrow file; nothing is "
            f"downloaded)"
        )
    try:
        if path.is_dir() and (
            (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        ):
            loaded = datasets.load_from_disk(os.fspath(path))
        elif path.is_dir():
            loaded = datasets.load_dataset(os.fspath(path))
        elif path.suffix.lower() in _FILE_BUILDERS:
            loaded = datasets.load_dataset(
                _FILE_BUILDERS[path.suffix.lower()], data_files=os.fspath(path)
            )
        else:
            raise ValueError(f"unknown file type {path.suffix!r}; known: {sorted(_FILE_BUILDERS)}")
    except (ValueError, OSError, TypeError) as e:
        raise ValueError(f"data 'hf:{spec.path}:...': could not load the dataset: {e}") from e
    if isinstance(loaded, datasets.DatasetDict):
        if spec.split not in loaded:
            raise ValueError(
                f"data 'hf:{spec.path}:...': no split {spec.split!r}; it has {sorted(loaded)} "
                f"(option split=<name>)"
            )
        loaded = loaded[spec.split]
    if not isinstance(loaded, datasets.Dataset):
        raise ValueError(
            f"data 'hf:{spec.path}:...': expected a datasets.Dataset, got {type(loaded).__name__}"
        )
    for role, col in (("image", spec.image), ("label", spec.label)):
        if col not in loaded.column_names:
            raise ValueError(
                f"data 'hf:{spec.path}:...': no {role} column {col!r}; its columns are "
                f"{loaded.column_names} (option {role}=<column>)"
            )
    return loaded


def _labels(ds: Any, spec: HFSpec, datasets: Any) -> np.ndarray:
    feature = ds.features[spec.label]
    ok = isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and str(feature.dtype).startswith(("int", "uint"))
    )
    if not ok:
        raise ValueError(
            f"data 'hf:{spec.path}:...': label column {spec.label!r} must hold integer class "
            f"ids (a ClassLabel or an int column), it is {feature}; encode it first "
            f"(Dataset.class_encode_column)"
        )
    return np.asarray(ds.with_format("numpy")[spec.label], dtype=np.int64)


def _partition_rows(spec: HFSpec, labels: np.ndarray, datasets: Any, part: Any) -> np.ndarray:
    """Rows of the whole dataset in ``spec``'s partition, in the partition's order."""
    n = len(labels)
    if spec.num_partitions > n:
        raise ValueError(
            f"data 'hf:{spec.path}:...': {spec.num_partitions} partitions of {n} examples; "
            f"at most one partition per example"
        )
    # Row ids and labels only: the partitioners read no other column, and FederatedDataset's
    # shuffle of the whole set permutes these rows alike (the permutation depends on n only).
    index = datasets.Dataset.from_dict({"row": np.arange(n, dtype=np.int64), "label": labels})
    index = index.shuffle(seed=spec.seed)
    partitioner: Any
    if spec.partitioner == "iid":
        partitioner = part.IidPartitioner(num_partitions=spec.num_partitions)
    else:
        partitioner = part.DirichletPartitioner(
            num_partitions=spec.num_partitions,
            partition_by="label",
            alpha=float(spec.alpha),
            min_partition_size=spec.min_size,
            self_balancing=False,
            shuffle=True,
            seed=spec.seed,
        )
    partitioner.dataset = index
    try:
        rows = partitioner.load_partition(spec.partition_id)["row"]
    except ValueError as e:  # e.g. Dirichlet's min_partition_size not met in 10 draws
        raise ValueError(f"data 'hf:{spec.path}:...': {spec.partitioner} partitioner: {e}") from e
    return np.asarray(rows, dtype=np.int64)


def _images(ds: Any, spec: HFSpec, datasets: Any) -> np.ndarray:
    where = f"data 'hf:{spec.path}:...'"
    feature = ds.features[spec.image]
    if isinstance(feature, datasets.Image):
        pil = [im for im in ds[spec.image]]
        if any(im is None for im in pil):
            raise ValueError(f"{where}: image column {spec.image!r} has missing images")
        gray = all(im.mode in _GRAYSCALE_MODES for im in pil)
        arrays = [np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8) for im in pil]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(
                f"{where}: images differ in size ({sorted({a.shape for a in arrays})}); resize "
                f"them first"
            )
        if not arrays:
            return np.zeros((0, 1, 1), dtype=np.uint8)
        return np.stack(arrays)
    try:
        x = np.asarray(ds.with_format("numpy")[spec.image])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: image column {spec.image!r}: {e}") from e
    if x.dtype == object or x.ndim not in (3, 4):
        raise ValueError(
            f"{where}: image column {spec.image!r} must hold images of one size, (H, W) or "
            f"(H, W, C), got {feature} -> {x.dtype} {x.shape}"
        )
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.integer) or (x.size and (x.min() < 0 or x.max() > 255)):
            raise ValueError(
                f"{where}: image column {spec.image!r} must hold integers in 0..255 (uint8 "
                f"pixels), got {x.dtype}"
            )
        x = x.astype(np.uint8)
    return x


def hf_partition_indices(spec: HFSpec | str) -> np.ndarray:
    """The rows of the dataset (its order on disk) that make up ``spec``'s partition."""
    s = parse_hf_spec(spec) if isinstance(spec, str) else spec
    datasets, part = _modules()
    ds = _load(s, datasets)
    return _partition_rows(s, _labels(ds, s, datasets), datasets, part)


def load_hf_partition(spec: HFSpec | str) -> tuple[np.ndarray, np.ndarray]:
    """A node's partition of a Hugging Face dataset on disk (the module docstring).

    Returns
    -------
    images : np.ndarray
        uint8, ``(N, H, W)`` or ``(N, H, W, C)``, as :func:`disco_fl.data.load_npz`.
    labels : np.ndarray
        int64, ``(N,)``.

    Raises
    ------
    ImportError
        Flower Datasets is not installed (``pip install 'disco_fl[datasets]'``).
    FileNotFoundError
        The path does not exist.
    ValueError
        A malformed spec, a missing split or column, labels that are not integer class ids,
        images of different sizes, more partitions than examples.
    """
    s = parse_hf_spec(spec) if isinstance(spec, str) else spec
    datasets, part = _modules()
    ds = _load(s, datasets)
    labels = _labels(ds, s, datasets)
    rows = _partition_rows(s, labels, datasets, part)
    images = _images(ds.select(rows), s, datasets)
    return images, _validate_arrays(images, labels[rows], f"data 'hf:{s.path}:...'")
