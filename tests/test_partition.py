"""Gates open: the partitioned model equals the original; ownership and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import disco_fl
from disco_fl import PartitionError
from disco_fl.core.layout import split_sizes
from tests.zoo import ZOO, UserNet


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("nodes", [2, 3, 4])
@pytest.mark.parametrize("execution", ["fused", "lockstep"])
def test_gates_open_equals_original(name: str, nodes: int, execution: str) -> None:
    torch.manual_seed(nodes)
    build, shape = ZOO[name]
    model = build().eval()
    x = torch.randn(*shape)
    pm = disco_fl.partition(model, nodes, x).eval()
    pm.execution = execution  # type: ignore[assignment]
    with torch.no_grad():
        ref = model(x)
        out = pm(x)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()


@pytest.mark.parametrize("nodes", [2, 3])
def test_train_mode_and_gradients_equal_original(nodes: int) -> None:
    """Batch statistics and input gradients match the original in training mode."""
    torch.manual_seed(0)
    model = UserNet().train()
    model.drop.p = 0.0
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    pm = disco_fl.partition(model, nodes, x.detach()).train()
    y = torch.randint(0, 11, (4,))
    F.cross_entropy(model(x), y).backward()
    g_ref = x.grad.clone()
    for execution in ("fused", "lockstep"):
        x.grad = None
        pm.execution = execution  # type: ignore[assignment]
        F.cross_entropy(pm(x), y).backward()
        assert torch.allclose(x.grad, g_ref, atol=1e-5), execution


def test_batch_size_free_at_run_time() -> None:
    model = ZOO["resnet_narrow"][0]().eval()
    pm = disco_fl.partition(model, 3, torch.randn(2, 1, 28, 28)).eval()
    x = torch.randn(7, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(pm(x), model(x), atol=1e-5)


def test_shards_hold_their_slices_only() -> None:
    model = UserNet().eval()
    pm = disco_fl.partition(model, 3, torch.randn(1, 3, 16, 16))
    # stem has 13 output channels: 5/4/4
    rows = [pm.shards[k].ops["stem"].weight.shape[0] for k in range(3)]
    assert rows == [5, 4, 4]
    total = sum(p.numel() for s in pm.shards for p in s.ops.parameters())
    assert total == sum(p.numel() for p in model.parameters())


def test_uneven_capacities() -> None:
    assert split_sizes(10, 3) == [4, 3, 3]
    assert split_sizes(10, 2, [3, 1]) == [7, 3]
    model = ZOO["resnet_narrow"][0]().eval()
    x = torch.randn(2, 1, 28, 28)
    pm = disco_fl.partition(model, 2, x, capacities=[3.0, 1.0]).eval()
    assert pm.shards[0].ops["conv1"].weight.shape[0] == 6
    with torch.no_grad():
        assert torch.allclose(pm(x), model(x), atol=1e-5)


def test_more_nodes_than_channels_names_the_layer() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 8, 3))
    with pytest.raises(PartitionError, match=r"'0'.*3 channels.*num_nodes=4"):
        disco_fl.partition(model, 4, torch.randn(1, 1, 8, 8))


class _Softmaxed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.sm = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.conv(x))


class _Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.g = nn.Conv2d(4, 4, 3, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g(self.conv(x))


class _ChannelMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=1)


@pytest.mark.parametrize(
    "model,pattern",
    [
        (_Softmaxed(), r"unsupported op: module 'sm' \(Softmax\)"),
        (_Grouped(), r"module 'g'.*groups=2"),
        (_ChannelMean(), r"reduction over the channel dim"),
    ],
)
def test_unsupported_ops_are_named(model: nn.Module, pattern: str) -> None:
    with pytest.raises(PartitionError, match=pattern):
        disco_fl.partition(model, 2, torch.randn(1, 1, 8, 8))


def test_bad_arguments() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3))
    with pytest.raises(PartitionError, match="num_nodes"):
        disco_fl.partition(model, 0, torch.randn(1, 1, 8, 8))
    with pytest.raises(PartitionError, match="example_input"):
        disco_fl.partition(model, 2, [1, 2])  # type: ignore[arg-type]
