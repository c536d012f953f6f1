"""Shard records travel packed (two arrays); unpacking checks every field."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from disco_fl.fl.federated import ModelSpec, pack_state, shard_arrays, unpack_state


def _state() -> dict[str, torch.Tensor]:
    return {
        "w": torch.randn(3, 4),
        "half": torch.randn(5).half(),
        "steps": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
    }


def test_round_trip_keeps_keys_dtypes_shapes_values() -> None:
    st = _state()
    back = unpack_state(pack_state(st))
    assert list(back) == list(st)
    for k, v in st.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v)


def test_shard_record_is_two_arrays_and_round_trips() -> None:
    pm = ModelSpec(name="resnet_narrow", num_nodes=2).partition()
    shard = pm.shard(1)
    rec = shard_arrays(shard)
    assert sorted(rec.keys()) == ["data", "index"]
    back = unpack_state(rec)
    ref = shard.state_dict()
    assert back.keys() == ref.keys() and all(torch.equal(back[k], ref[k]) for k in ref)


def _record(index: object, data: bytes) -> ArrayRecord:
    head = json.dumps(index).encode()
    return ArrayRecord(
        {
            "index": Array(np.frombuffer(head, dtype=np.uint8).copy()),
            "data": Array(np.frombuffer(data, dtype=np.uint8).copy()),
        }
    )


@pytest.mark.parametrize(
    ("index", "nbytes", "match"),
    [
        ([["w", "float32", [2], 0]], 4, "past the end"),
        ([["w", "float32", [1], 0]], 8, "trailing bytes"),
        ([["w", "complex64", [1], 0]], 8, "dtype"),
        ([["w", "float32", [-1], 0]], 4, "shape"),
        ([["w", "float32", [1], 4]], 8, "offset"),
        ([["w", "float32", [1], 0], ["w", "float32", [1], 4]], 8, "key"),
        ([["w", "float32", [1]]], 4, "index entry"),
        ({"w": 1}, 4, "not a packed"),
    ],
)
def test_malformed_records_are_refused(index: object, nbytes: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        unpack_state(_record(index, bytes(nbytes)))


def test_unpacked_record_of_other_form_is_refused() -> None:
    rec = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    with pytest.raises(ValueError, match="not a packed shard record"):
        unpack_state(rec)
