"""The ``torch.export`` capture on small models, one op family each.

Gates open: the emulation (fused and lock-step) equals the original. Random sparse hard
masks: shard-only execution of the exported shards equals the emulation. Refusals name the
op, the layer and the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import disco_fl
from disco_fl import PartitionError
from disco_fl.emulation.export import load_shard, run_shards


def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape  # ShuffleNet's channel shuffle
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleNetUnit(nn.Module):
    """Channel split, shuffle, grouped and depthwise convs, concat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.pw = nn.Conv2d(12, 12, 1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.bn = nn.BatchNorm2d(12)
        self.gconv = nn.Conv2d(24, 24, 3, padding=1, groups=4)  # groups of 6
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))  # (B, 24, H, W)
        a, b = x.chunk(2, dim=1)  # (B, 12, H, W) each
        b = self.bn(self.dw(F.relu(self.pw(b))))
        x = _shuffle(torch.cat([a, b], dim=1), 2)
        x = _shuffle(self.gconv(x), 3)
        x = x[:, 4:20] * 2.0  # channel slicing: (B, 16, H, W)
        x = torch.cat([x, x[:, :8]], dim=1)  # (B, 24, H, W)
        return self.head(x.mean(dim=(2, 3)))


class ConvNeXtBlock(nn.Module):
    """Channels-last LayerNorm (functional), layer scale, permutes, stochastic depth (eval)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim, 1, 1) + 0.5)
        self.gn_w = nn.Parameter(torch.rand(dim) + 0.5)
        self.drop_path = 0.1
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.ndim == 4:  # shape-dependent Python control flow (symbolic fx cannot trace it)
            y = self.dw(x).permute(0, 2, 3, 1)  # (B, H, W, C)
            y = F.layer_norm(y, (y.shape[-1],), self.norm.weight, self.norm.bias, 1e-6)
            y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
            y = self.gamma * y
            if self.training and self.drop_path > 0:  # stochastic depth: identity at eval
                keep = torch.rand(x.shape[0], 1, 1, 1) > self.drop_path
                y = y * keep / (1 - self.drop_path)
            x = x + y
        x = F.group_norm(x, 4, self.gn_w, None, 1e-5)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SegNet(nn.Module):
    """Squeeze-excitation, padding, interpolation, pixel (un)shuffle, transposed conv, dict
    output and an optional argument."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.se1 = nn.Conv2d(16, 4, 1)
        self.se2 = nn.Conv2d(4, 16, 1)
        self.unshuffled = nn.Conv2d(64, 8, 1)
        self.up = nn.ConvTranspose2d(8, 12, 2, stride=2)
        self.mid = nn.Conv2d(12, 48, 3)  # node slices of whole blocks of 4 at N = 2, 3, 4
        self.ps = nn.PixelShuffle(2)
        self.head = nn.Conv2d(12, 5, 1)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
        size = x.shape[-2:]
        h = F.hardswish(self.stem(x))  # (B, 16, H/2, W/2)
        s = torch.sigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(h, 1)))))
        h = h * s  # squeeze-excitation
        h = self.unshuffled(F.pixel_unshuffle(h, 2))  # (B, 8, H/4, W/4)
        h = self.up(h)  # (B, 12, H/2, W/2)
        h = F.pad(h, (1, 1, 1, 1), mode="constant", value=0.0)
        h = self.ps(F.relu(self.mid(h)))  # (B, 12, H, W)
        h = F.interpolate(h, scale_factor=0.5, mode="bilinear", align_corners=False)
        h = self.upsample(h)
        out = F.interpolate(self.head(h), size=size, mode="bilinear", align_corners=False)
        if mask is not None:
            out = out * mask
        return {"out": out}


class TokenMixer(nn.Module):
    """(B, tokens, features): flatten of spatial dims, transposes, split along features."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 12, 4, stride=4)
        self.fc = nn.Linear(12, 24)
        self.fa = nn.Linear(12, 12)
        self.fb = nn.Linear(12, 12)
        self.out = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)  # (B, T, 12)
        a, b = self.fc(t).split([12, 12], dim=-1)
        t = self.fa(a) * torch.sigmoid(self.fb(b))  # each half read by a mixing layer
        t = t.reshape(t.shape[0], -1, 2, 6).reshape(t.shape[0], -1, 12)  # features kept
        return self.out((t * t.softmax(dim=1)).sum(1))  # softmax over tokens


MODELS = {
    "shufflenet_unit": (ShuffleNetUnit, (2, 3, 8, 8)),
    "convnext_block": (ConvNeXtBlock, (2, 3, 16, 16)),
    "segnet": (SegNet, (2, 3, 16, 16)),
    "token_mixer": (TokenMixer, (2, 3, 16, 16)),
}


def _output(y: Any) -> torch.Tensor:
    return y["out"] if isinstance(y, dict) else y


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    cls, shape = MODELS[name]
    model = cls().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(*shape)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("nodes", [2, 3, 4])
def test_gates_open_equals_original(name: str, nodes: int) -> None:
    model, x = _build(name)
    pm = disco_fl.partition(model, nodes, x, capture="export").eval()
    with torch.no_grad():
        ref = _output(model(x))
        for execution in ("fused", "lockstep"):
            pm.execution = execution  # type: ignore[assignment]
            out = _output(pm(x))
            assert out.shape == ref.shape
            assert torch.allclose(out, ref, atol=1e-5, rtol=0), (execution, (out - ref).abs().max())
        x1 = x[:1]  # the batch size stays free at run time
        assert torch.allclose(_output(pm(x1)), _output(model(x1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("nodes", [2, 4])
def test_shard_only_equals_emulation(name: str, nodes: int, tmp_path: Path) -> None:
    model, x = _build(name)
    pm = disco_fl.partition(model, nodes, x, capture="export").eval()
    g = torch.Generator().manual_seed(nodes)
    for _, _, d, gates in pm.gate_items():
        gates.set_mask(d, (torch.rand(gates.num_channels, generator=g) < 0.35).float())
    with torch.no_grad():
        ref = _output(pm(x))
        assert not torch.allclose(ref, _output(model(x)), atol=1e-4)
    pm.export(tmp_path)
    out = _output(run_shards([load_shard(tmp_path / "plan.json", k) for k in range(nodes)], x))
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()


def test_shuffle_moves_ownership_without_messages() -> None:
    """The shuffle, chunk and slicing of ShuffleNetUnit are reindex ops: no exchange."""
    model, x = _build("shufflenet_unit")
    pm = disco_fl.partition(model, 4, x, capture="export")
    kinds = [op.kind for op in pm.program.ops]
    assert kinds.count("reindex") >= 4
    # exchanges only before the mixing layers (pw, gconv: its groups straddle nodes, head)
    assert len(pm.program.exchanges) == 3


def test_grouped_conv_aligned_is_local_and_unaligned_mixes() -> None:
    class Net(nn.Module):
        def __init__(self, groups: int) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.g = nn.Conv2d(8, 8, 3, padding=1, groups=groups)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.g(self.a(x))

    x = torch.randn(2, 3, 6, 6)
    for groups, nodes, local in ((4, 2, True), (4, 4, True), (2, 4, False), (4, 3, False)):
        model = Net(groups).eval()
        pm = disco_fl.partition(model, nodes, x, capture="export").eval()
        kinds = [op.kind for op in pm.program.ops]
        assert ("gconv2d" if local else "gconv2d_mixing") in kinds, (groups, nodes, kinds)
        assert len(pm.program.exchanges) == (0 if local else 1)  # the first conv reads x
        with torch.no_grad():
            assert torch.allclose(pm(x), model(x), atol=1e-5)


def test_auto_falls_back_to_export_and_fx_stays_default() -> None:
    model, x = _build("convnext_block")
    with pytest.raises(PartitionError):
        disco_fl.partition(model, 2, x)  # symbolic fx cannot trace ``x.ndim``
    pm = disco_fl.partition(model, 2, x, capture="auto").eval()
    with torch.no_grad():
        assert torch.allclose(pm(x), model(x), atol=1e-5)


def test_auto_falls_back_where_the_fx_trace_cannot_run() -> None:
    """SegNet's optional argument traces as a Proxy that fx's shape propagation cannot run: a
    PartitionError (not a RuntimeError), so "auto" falls back to export (and keeps the dict)."""
    model, x = _build("segnet")
    with pytest.raises(PartitionError, match="fx trace does not run on the example input"):
        disco_fl.partition(model, 2, x)
    pm = disco_fl.partition(model, 2, x, capture="auto").eval()
    with torch.no_grad():
        out = pm(x)
        assert list(out) == ["out"] and torch.allclose(out["out"], model(x)["out"], atol=1e-5)


def test_refusal_names_op_layer_and_reason() -> None:
    class ChannelsIntoBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, c, h, w = x.shape
            return self.conv(x).reshape(-1, h, w)  # the split channels into the batch dim

    class AcrossSamples(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).permute(0, 2, 3, 1).reshape(1, -1)  # rows straddle samples

    class ChannelSoftmax(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).softmax(dim=1)

    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(PartitionError, match=r"reshape.*channel dim 1 into dim 0"):
        disco_fl.partition(ChannelsIntoBatch(), 2, x, capture="export")
    with pytest.raises(PartitionError, match=r"reshape.*batch dim 0 across samples"):
        disco_fl.partition(AcrossSamples(), 2, x, capture="export")
    with pytest.raises(PartitionError, match=r"softmax.*channel dim"):
        disco_fl.partition(ChannelSoftmax(), 2, x, capture="export")
    with pytest.raises(PartitionError, match="capture must be"):
        disco_fl.partition(ChannelSoftmax(), 2, x, capture="jit")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["shufflenet_unit", "convnext_block", "token_mixer"])
def test_train_mode_gradients_equal_original(name: str) -> None:
    """The new ops (reindex, reshape, grouped conv, param) train like the original: batch
    statistics, input and weight gradients (gates open)."""
    model, x = _build(name)
    model.train()
    if isinstance(model, ConvNeXtBlock):
        model.drop_path = 0.0  # captured in eval mode: stochastic depth is its identity
    pm = disco_fl.partition(model, 3, x, capture="export").train()
    x = x.clone().requires_grad_(True)
    model(x).square().sum().backward()
    g_ref = x.grad.clone()
    for execution in ("fused", "lockstep"):
        x.grad = None
        pm.zero_grad()
        pm.execution = execution  # type: ignore[assignment]
        pm(x).square().sum().backward()
        assert torch.allclose(x.grad, g_ref, atol=1e-4, rtol=1e-4), execution
        grads = [p.grad for p in pm.weight_parameters()]
        assert all(g is not None for g in grads), execution
    ref_w = sum(float(p.grad.square().sum()) for p in model.parameters() if p.grad is not None)
    got_w = sum(float(p.grad.square().sum()) for p in pm.weight_parameters())
    assert got_w == pytest.approx(ref_w, rel=1e-4)


def test_reshape_ownership_rules() -> None:
    """Ownership through reshapes (DTensor's flatten / split rules on arbitrary layouts)."""
    from disco_fl.core.layout import Layout
    from disco_fl.partition.ops_view import reshape_info
    from disco_fl.partition.program import TensorInfo

    lay = Layout((0, 0, 1, 1), 2)
    x = TensorInfo("sharded", (2, 4, 3), 1, lay)  # (B, C, T)
    flat = reshape_info(x, (2, 12), 2)  # flatten (C, T): blocks of T
    assert flat.cdim == 1 and flat.layout == lay.repeat_each(3)
    last = TensorInfo("sharded", (2, 3, 4), 2, lay)  # (B, T, C)
    tiled = reshape_info(last, (2, 12), 2)  # flatten (T, C): the layout tiled T times
    assert tiled.layout is not None and tiled.layout.owners == lay.owners * 3
    split = reshape_info(x, (2, 2, 2, 3), 2)  # C -> (2, 2): the owner follows the outer factor
    assert split.cdim == 1 and split.layout == Layout((0, 1), 2)
    inter = TensorInfo("sharded", (2, 4, 3), 1, Layout((0, 1, 0, 1), 2))
    assert reshape_info(inter, (2, 2, 2, 3), 2).cdim == 2  # ... or the inner one
    with pytest.raises(PartitionError, match="several dims"):
        reshape_info(TensorInfo("sharded", (2, 4, 3), 1, Layout((0, 0, 0, 1), 2)), (2, 2, 6), 2)
    with pytest.raises(PartitionError, match="batch dim"):
        reshape_info(x, (8, 3), 2)


class MultiOut(nn.Module):
    """A tuple output: logits, and a dict of a channels-first feature map and a list of its
    channels-last view and a channel slice (every leaf split over the nodes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        f = torch.relu(self.conv(x))
        pair = [f.permute(0, 2, 3, 1), f[:, 1:5]]
        return self.fc(f.mean((2, 3))), {"feat": f, "pair": pair}


def _assert_same_output(got: Any, want: Any, atol: float = 1e-5) -> None:
    """Same structure (container types, keys and their order) and leaves within ``atol``."""
    from torch.utils._pytree import tree_flatten

    got_leaves, got_spec = tree_flatten(got)
    want_leaves, want_spec = tree_flatten(want)
    assert got_spec == want_spec, (got_spec, want_spec)
    for a, b in zip(got_leaves, want_leaves, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=0), (a - b).abs().max()


def _segmentation() -> tuple[nn.Module, torch.Tensor]:
    """torchvision's LR-ASPP (returns ``OrderedDict(out=...)``) at 32 px."""
    from tests.conftest import import_torchvision

    tv = import_torchvision()
    torch.manual_seed(0)
    model = tv.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)
    return model.eval(), torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("case", ["multi_out", "segnet", "lraspp"])
@pytest.mark.parametrize("nodes", [2, 3])
def test_dict_and_tuple_outputs_keep_their_structure(case: str, nodes: int, tmp_path: Path) -> None:
    """The partitioned model returns what the original returns (a tuple of a tensor and a dict
    of a tensor and a list; a dict; torchvision's ``OrderedDict``), gates open and through the
    exported shards with random sparse masks."""
    if case == "multi_out":
        torch.manual_seed(0)
        model: nn.Module = MultiOut().eval()
        x = torch.randn(2, 3, 5, 5)
    elif case == "segnet":
        model, x = _build("segnet")
    else:
        model, x = _segmentation()
    pm = disco_fl.partition(model, nodes, x, capture="export").eval()
    with torch.no_grad():
        ref = model(x)
        _assert_same_output(pm(x), ref)
        pm.execution = "lockstep"  # type: ignore[assignment]
        _assert_same_output(pm(x), ref)
    if case == "multi_out":
        assert [op.kind for op in pm.program.ops][-2:] == ["cat", "output"]  # packed leaves
    g = torch.Generator().manual_seed(nodes)
    for _, _, d, gates in pm.gate_items():
        gates.set_mask(d, (torch.rand(gates.num_channels, generator=g) < 0.35).float())
    with torch.no_grad():
        masked = pm(x)
    with pytest.raises(AssertionError):
        _assert_same_output(masked, ref, atol=1e-4)  # the masks change the function
    pm.export(tmp_path)
    got = run_shards([load_shard(tmp_path / "plan.json", k) for k in range(nodes)], x)
    _assert_same_output(got, masked)


def test_outputs_split_and_replicated_are_refused() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.conv(x), x * 2.0  # x * 2 is held by every node

    with pytest.raises(PartitionError, match="split over the nodes and tensors every node"):
        disco_fl.partition(Mixed(), 2, torch.randn(2, 3, 4, 4), capture="export")
