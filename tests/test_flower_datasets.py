"""Flower Datasets (the ``datasets`` extra): a node's ``hf:`` data, partitioned by
``IidPartitioner`` / ``DirichletPartitioner``, from a Hugging Face dataset on disk built
offline from the shipped MNIST subset. No network: ``HF_DATASETS_OFFLINE=1`` is set before
``datasets`` is imported (and checked)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before any import of datasets

import subprocess
import sys
from pathlib import Path

import datasets  # the dev extra installs it (and flwr-datasets): CI never skips these
import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from disco_fl.data import (
    hf_partition_indices,
    load_builtin,
    load_hf_partition,
    load_image_folder,
    parse_hf_spec,
    stratified_split,
    to_tensor,
)
from disco_fl.fl.local_data import node_data

ROOT = Path(__file__).resolve().parents[1]
PER_CLASS = 30


@pytest.fixture(scope="module")
def source() -> tuple[np.ndarray, np.ndarray]:
    """300 digits (30 per class) of the built-in set, in its order (sorted by label)."""
    images, labels = load_builtin()
    idx = stratified_split(labels, [PER_CLASS * 10], seed=0)[0]
    return images[idx], labels[idx]


@pytest.fixture(scope="module")
def saved(source: tuple[np.ndarray, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The digits as a ``datasets.Dataset`` (PNG ``Image`` + ``ClassLabel``), ``save_to_disk``."""
    images, labels = source
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
    )
    ds = datasets.Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features)
    path = tmp_path_factory.mktemp("hf") / "digits"
    ds.save_to_disk(str(path))
    return str(path)


def _context(data: str, eval_data: str = "") -> Context:
    config = {"household": "h", "shard": 0, "peer-address": "127.0.0.1:1", "data": data}
    if eval_data:
        config["eval-data"] = eval_data
    return Context(run_id=1, node_id=0, node_config=config, state=RecordDict(), run_config={})


def test_offline_and_import_disco_fl_loads_neither_package() -> None:
    assert datasets.config.HF_DATASETS_OFFLINE and datasets.config.HF_HUB_OFFLINE
    code = (
        "import sys, disco_fl, disco_fl.data, disco_fl.fl.local_data, disco_fl.fl.client_app\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('datasets', 'flwr_datasets'))\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


def test_iid_partitions_are_disjoint_cover_the_set_and_equal_the_source(
    saved: str, source: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = source
    n = 3
    rows = [hf_partition_indices(f"hf:{saved}:iid:{i}/{n}") for i in range(n)]
    assert sorted(len(r) for r in rows) == [100, 100, 100]
    every = np.concatenate(rows)
    assert len(np.unique(every)) == len(every) == len(labels)  # disjoint, covering
    assert not (rows[0] == np.arange(100)).all()  # shuffled first, as FederatedDataset does
    for i in range(n):
        x, y = load_hf_partition(f"hf:{saved}:iid:{i}/{n}")
        assert x.dtype == np.uint8 and x.shape == (100, 28, 28)
        assert y.dtype == np.int64
        np.testing.assert_array_equal(x, images[rows[i]])  # decoded pixels == the source
        np.testing.assert_array_equal(y, labels[rows[i]])
    # another seed, another partition of the same set
    other = hf_partition_indices(f"hf:{saved}:iid:0/{n}:seed=1")
    assert set(other.tolist()) != set(rows[0].tolist())


def _skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance of the parts' label mix from the whole set's."""
    whole = np.bincount(labels, minlength=10) / len(labels)
    tv = [0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - whole).sum() for p in parts]
    return float(np.mean(tv))


def test_dirichlet_is_reproducible_and_label_skewed(
    saved: str, source: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = source
    n = 3
    spec = f"hf:{saved}:dirichlet:{{}}/{n}:alpha=0.1:seed=7:min-size=5"
    rows = [hf_partition_indices(spec.format(i)) for i in range(n)]
    again = [hf_partition_indices(spec.format(i)) for i in range(n)]
    for a, b in zip(rows, again, strict=True):
        np.testing.assert_array_equal(a, b)  # same seed, same partition (and order)
    every = np.concatenate(rows)
    assert len(np.unique(every)) == len(every) == len(labels)
    assert min(len(r) for r in rows) >= 5
    other = hf_partition_indices(spec.replace("seed=7", "seed=8").format(0))
    assert set(other.tolist()) != set(rows[0].tolist())
    iid = [hf_partition_indices(f"hf:{saved}:iid:{i}/{n}:seed=7") for i in range(n)]
    assert _skew(labels, iid) < 0.2 < 0.4 < _skew(labels, rows)
    x, y = load_hf_partition(spec.format(1))
    np.testing.assert_array_equal(x, images[rows[1]])
    np.testing.assert_array_equal(y, labels[rows[1]])


def test_array_columns_options_and_a_dataset_dict(
    source: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images, labels = source
    rgb = np.stack([images, 255 - images, images // 2], axis=-1)  # (N, 28, 28, 3), uint8
    features = datasets.Features(
        {
            "pixels": datasets.Array3D(shape=(28, 28, 3), dtype="uint8"),
            "digit": datasets.Value("int32"),
            "note": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict(
        {"pixels": list(rgb), "digit": labels.tolist(), "note": ["x"] * len(labels)}, features
    )
    dd = datasets.DatasetDict({"train": ds, "test": ds.select(range(20))})
    path = tmp_path / "with:colon"  # a path may hold ':'
    dd.save_to_disk(str(path))
    spec = f"hf:{path}:dirichlet:1/2:alpha=1.0:image=pixels:label=digit:seed=3"
    assert parse_hf_spec(spec).path == str(path)
    x, y = load_hf_partition(spec)
    rows = hf_partition_indices(spec)
    np.testing.assert_array_equal(x, rgb[rows])
    np.testing.assert_array_equal(y, labels[rows])
    x, y = load_hf_partition(f"hf:{path}:iid:0/1:image=pixels:label=digit:split=test")
    assert x.shape == (20, 28, 28, 3) and sorted(y.tolist()) == sorted(labels[:20].tolist())
    with pytest.raises(ValueError, match=r"no split 'valid'.*\['test', 'train'\]"):
        load_hf_partition(f"hf:{path}:iid:0/1:image=pixels:label=digit:split=valid")
    with pytest.raises(ValueError, match=r"no label column 'label'.*'digit'"):
        load_hf_partition(f"hf:{path}:iid:0/1:image=pixels")
    with pytest.raises(ValueError, match=r"no image column 'image'.*'pixels'"):
        load_hf_partition(f"hf:{path}:iid:0/1:label=digit")
    with pytest.raises(ValueError, match=r"label column 'note' must hold integer class ids"):
        load_hf_partition(f"hf:{path}:iid:0/1:image=pixels:label=note")


def test_parquet_file(
    source: tuple[np.ndarray, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    images, labels = source
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
    )
    ds = datasets.Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features)
    ds.to_parquet(str(tmp_path / "digits.parquet"))
    rows = hf_partition_indices(f"hf:{tmp_path / 'digits.parquet'}:iid:1/2")
    x, y = load_hf_partition(f"hf:{tmp_path / 'digits.parquet'}:iid:1/2")
    np.testing.assert_array_equal(x, images[rows])
    np.testing.assert_array_equal(y, labels[rows])


def test_an_image_folder_reads_as_load_image_folder_does(
    source: tuple[np.ndarray, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    images, labels = source
    root = tmp_path / "folder"
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(labels == c)[:4]):
            Image.fromarray(images[i]).save(root / f"class{c}" / f"{j}.png")
    x, y = load_hf_partition(f"hf:{root}:iid:0/1")
    fx, fy, _ = load_image_folder(root)
    assert x.shape == fx.shape == (12, 28, 28) and x.dtype == np.uint8
    ours = sorted(zip(map(bytes, x), y.tolist(), strict=True))
    assert ours == sorted(zip(map(bytes, fx), fy.tolist(), strict=True))


def test_node_data_and_the_client_app_read_the_hf_form(
    saved: str, source: tuple[np.ndarray, np.ndarray]
) -> None:
    from disco_fl.fl.client_app import _data

    images, labels = source
    spec = f"hf:{saved}:iid:0/2"
    rows = hf_partition_indices(spec)
    d = _data(_context(spec))  # what the ClientApp's train / query handlers read
    assert len(d.y_train) + len(d.y_eval) == len(rows) == 150
    assert len(d.y_eval) == 30  # a stratified 20 % held out, as for a .npz
    x_all = to_tensor(images[rows])
    # every example is the source's, normalized as the other loaders' are
    for x, y in ((d.x_train, d.y_train), (d.x_eval, d.y_eval)):
        match = (x[:, None] == x_all[None]).flatten(2).all(-1)  # (n, 150)
        j = match.float().argmax(1)
        assert match.any(1).all()
        assert torch.equal(y, torch.as_tensor(labels[rows])[j])
    # eval-data may be an hf: setting too; a pixel task derives its targets from the digits
    d = node_data(spec, f"hf:{saved}:iid:1/2", task="segmentation")
    assert d.x_train.shape == (150, 1, 28, 28) and d.y_train.shape == (150, 28, 28)
    assert len(d.y_eval) == 150


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("hf:", "expected hf:<path>"),
        ("hf:/d:iid", "expected hf:<path>"),
        ("hf:iid:0/2", "expected hf:<path>"),
        ("hf:/d:random:0/2", "unknown partitioner 'random'; known: iid, dirichlet"),
        ("hf:/d:iid:2/2", r"partition 2 is not in \[0, 2\)"),
        ("hf:/d:iid:-1/2", r"partition -1 is not in \[0, 2\)"),
        ("hf:/d:iid:0/0", "number of partitions must be >= 1"),
        ("hf:/d:iid:0-2", "expected '<partition>/<partitions>'"),
        ("hf:/d:iid:0/2:beta=1", "unknown option 'beta'"),
        ("hf:/d:iid:0/2:alpha=0.5", "'alpha' applies to the dirichlet partitioner only"),
        ("hf:/d:dirichlet:0/2:alpha=-1", "alpha must be a positive number"),
        ("hf:/d:dirichlet:0/2:alpha=x", "could not convert"),
        ("hf:/d:dirichlet:0/2:seed=1:seed=2", "option 'seed' given twice"),
        ("hf:/d:iid:0/2:image=", "option 'image' has no value"),
    ],
)
def test_malformed_hf_settings_are_refused(spec: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_hf_spec(spec)
    from disco_fl.fl.client_app import _data

    with pytest.raises(ValueError, match=error):
        _data(_context(spec))


def test_clear_errors_for_a_missing_path_too_many_partitions_and_no_package(
    saved: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist.*nothing is downloaded"):
        load_hf_partition(f"hf:{tmp_path / 'nowhere'}:iid:0/2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_partition("hf:mnist:iid:0/2")  # a hub name is not fetched
    with pytest.raises(ValueError, match="400 partitions of 300 examples"):
        load_hf_partition(f"hf:{saved}:iid:0/400")
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(ValueError, match="unknown file type '.txt'"):
        load_hf_partition(f"hf:{tmp_path / 'x.txt'}:iid:0/1")
    monkeypatch.setitem(sys.modules, "flwr_datasets.partitioner", None)
    with pytest.raises(ImportError, match=r"pip install 'disco_fl\[datasets\]'"):
        load_hf_partition(f"hf:{saved}:iid:0/2")
