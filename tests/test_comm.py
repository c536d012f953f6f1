"""Communication accounting against hand-computed figures; codecs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import disco_fl
from disco_fl.core.codecs import get_codec, int8_quantize


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)  # reads the replicated input: no exchange
        self.c2 = nn.Conv2d(8, 6, 3, padding=1, stride=2)  # reads c1's output: exchange 1
        self.gn = nn.GroupNorm(1, 6)  # one group over 3+3 channels: statistics exchanged
        self.fc = nn.Linear(6, 4)  # reads pooled features: exchange 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(x))  # (B, 8, 6, 6)
        h = self.gn(self.c2(h))  # (B, 6, 3, 3)
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)  # (B, 6)
        return self.fc(h)  # (B, 4)


def test_hand_computed_bytes_two_nodes() -> None:
    pm = disco_fl.partition(Tiny(), 2, torch.randn(1, 1, 6, 6))
    r = pm.comm_report("fp32")
    # input: 36 floats to node 1
    assert r.input_bytes == 36 * 4
    # exchange 1: each node sends its 4 channels of 6x6 to the other: 2 * 4 * 36 * 4 B
    # exchange 2: each node sends 3 features: 2 * 3 * 4 B
    assert r.exchange_bytes == 2 * 4 * 36 * 4 + 2 * 3 * 4
    # GroupNorm(1 group): mean and M2 for 1 group, both directions, fp32
    assert r.stats_bytes == 2 * 2 * 4
    # output: node 1 sends its 2 logits
    assert r.output_bytes == 2 * 4
    assert r.bytes_per_sample == 144 + 1152 + 24 + 16 + 8 == r.dense_bytes_per_sample
    assert r.sync_points == 3

    # close every gate of node 1 -> node 0 in exchange 1, and one of node 0's features to 1
    ex1, ex2 = (o.name for o in pm.program.exchanges)
    pm.shards[1].gates[ex1].set_mask(0, torch.zeros(4))
    pm.shards[0].gates[ex2].set_mask(1, torch.tensor([1.0, 0.0, 1.0]))
    r = pm.comm_report("fp32")
    assert r.exchange_bytes == 1 * 4 * 36 * 4 + (3 + 2) * 4
    layer = next(lay for lay in r.layers if lay.op == ex1)
    assert layer.pairs == {"0->1": 576} and layer.readers == ["c2"]

    # int8: 1 byte per element plus one 4-byte scale per sample per non-empty message
    r8 = pm.comm_report("int8")
    assert r8.input_bytes == 36 + 4
    assert r8.exchange_bytes == (144 + 4) + (3 + 4) + (2 + 4)
    assert r8.stats_bytes == 16  # statistics stay fp32
    assert r8.output_bytes == 2 + 4
    r16 = pm.comm_report("fp16")
    assert r16.exchange_bytes == (144 + 3 + 2) * 2


def test_all_closed_has_no_sync_points_but_input_and_output() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    pm = disco_fl.partition(model, 2, torch.randn(1, 1, 8, 8))
    pm.set_all_masks(0.0)
    r = pm.comm_report()
    assert r.exchange_bytes == 0 and r.sync_points == 0
    assert r.input_bytes == 64 * 4 and r.output_bytes == 2 * 16 * 4
    assert r.dense_sync_points == 1


def test_int8_error_bound() -> None:
    x = torch.randn(5, 7, 3, 3) * torch.arange(1, 6).view(5, 1, 1, 1)
    q, scale = int8_quantize(x)
    y = get_codec("int8").roundtrip(x)
    bound = x.abs().flatten(1).amax(1) / 254 + 1e-7
    assert ((x - y).abs().flatten(1).amax(1) <= bound).all()
    assert q.dtype == torch.int8 and scale.shape == (5,)
    assert torch.equal(get_codec("fp32").roundtrip(x), x)


def test_unknown_codec() -> None:
    with pytest.raises(ValueError, match="unknown codec"):
        get_codec("bf8")


def test_int8_empty_batches() -> None:
    for shape in [(0, 3, 2), (2, 0)]:
        x = torch.zeros(shape)
        assert get_codec("int8").roundtrip(x).shape == x.shape
