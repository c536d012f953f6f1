"""Tests for disco_fl.models: shapes, fx tracing, torchvision names, strict checkpoints."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import fx, nn

from disco_fl.models import (
    MODELS,
    CheckpointError,
    ResNet,
    ResNetConfig,
    build_model,
    load_checkpoint_strict,
    resnet18,
    resnet50,
    resnet_narrow,
    resnet_small,
    save_checkpoint_atomic,
)

# state_dict keys of torchvision.models.resnet18(), in order, written out from torchvision's
# source (BasicBlock: conv1, bn1, relu, conv2, bn2, downsample; downsample = conv1x1 + BN).
RESNET18_KEYS = [
    "conv1.weight",
    "bn1.weight",
    "bn1.bias",
    "bn1.running_mean",
    "bn1.running_var",
    "bn1.num_batches_tracked",
    "layer1.0.conv1.weight",
    "layer1.0.bn1.weight",
    "layer1.0.bn1.bias",
    "layer1.0.bn1.running_mean",
    "layer1.0.bn1.running_var",
    "layer1.0.bn1.num_batches_tracked",
    "layer1.0.conv2.weight",
    "layer1.0.bn2.weight",
    "layer1.0.bn2.bias",
    "layer1.0.bn2.running_mean",
    "layer1.0.bn2.running_var",
    "layer1.0.bn2.num_batches_tracked",
    "layer1.1.conv1.weight",
    "layer1.1.bn1.weight",
    "layer1.1.bn1.bias",
    "layer1.1.bn1.running_mean",
    "layer1.1.bn1.running_var",
    "layer1.1.bn1.num_batches_tracked",
    "layer1.1.conv2.weight",
    "layer1.1.bn2.weight",
    "layer1.1.bn2.bias",
    "layer1.1.bn2.running_mean",
    "layer1.1.bn2.running_var",
    "layer1.1.bn2.num_batches_tracked",
    "layer2.0.conv1.weight",
    "layer2.0.bn1.weight",
    "layer2.0.bn1.bias",
    "layer2.0.bn1.running_mean",
    "layer2.0.bn1.running_var",
    "layer2.0.bn1.num_batches_tracked",
    "layer2.0.conv2.weight",
    "layer2.0.bn2.weight",
    "layer2.0.bn2.bias",
    "layer2.0.bn2.running_mean",
    "layer2.0.bn2.running_var",
    "layer2.0.bn2.num_batches_tracked",
    "layer2.0.downsample.0.weight",
    "layer2.0.downsample.1.weight",
    "layer2.0.downsample.1.bias",
    "layer2.0.downsample.1.running_mean",
    "layer2.0.downsample.1.running_var",
    "layer2.0.downsample.1.num_batches_tracked",
    "layer2.1.conv1.weight",
    "layer2.1.bn1.weight",
    "layer2.1.bn1.bias",
    "layer2.1.bn1.running_mean",
    "layer2.1.bn1.running_var",
    "layer2.1.bn1.num_batches_tracked",
    "layer2.1.conv2.weight",
    "layer2.1.bn2.weight",
    "layer2.1.bn2.bias",
    "layer2.1.bn2.running_mean",
    "layer2.1.bn2.running_var",
    "layer2.1.bn2.num_batches_tracked",
    "layer3.0.conv1.weight",
    "layer3.0.bn1.weight",
    "layer3.0.bn1.bias",
    "layer3.0.bn1.running_mean",
    "layer3.0.bn1.running_var",
    "layer3.0.bn1.num_batches_tracked",
    "layer3.0.conv2.weight",
    "layer3.0.bn2.weight",
    "layer3.0.bn2.bias",
    "layer3.0.bn2.running_mean",
    "layer3.0.bn2.running_var",
    "layer3.0.bn2.num_batches_tracked",
    "layer3.0.downsample.0.weight",
    "layer3.0.downsample.1.weight",
    "layer3.0.downsample.1.bias",
    "layer3.0.downsample.1.running_mean",
    "layer3.0.downsample.1.running_var",
    "layer3.0.downsample.1.num_batches_tracked",
    "layer3.1.conv1.weight",
    "layer3.1.bn1.weight",
    "layer3.1.bn1.bias",
    "layer3.1.bn1.running_mean",
    "layer3.1.bn1.running_var",
    "layer3.1.bn1.num_batches_tracked",
    "layer3.1.conv2.weight",
    "layer3.1.bn2.weight",
    "layer3.1.bn2.bias",
    "layer3.1.bn2.running_mean",
    "layer3.1.bn2.running_var",
    "layer3.1.bn2.num_batches_tracked",
    "layer4.0.conv1.weight",
    "layer4.0.bn1.weight",
    "layer4.0.bn1.bias",
    "layer4.0.bn1.running_mean",
    "layer4.0.bn1.running_var",
    "layer4.0.bn1.num_batches_tracked",
    "layer4.0.conv2.weight",
    "layer4.0.bn2.weight",
    "layer4.0.bn2.bias",
    "layer4.0.bn2.running_mean",
    "layer4.0.bn2.running_var",
    "layer4.0.bn2.num_batches_tracked",
    "layer4.0.downsample.0.weight",
    "layer4.0.downsample.1.weight",
    "layer4.0.downsample.1.bias",
    "layer4.0.downsample.1.running_mean",
    "layer4.0.downsample.1.running_var",
    "layer4.0.downsample.1.num_batches_tracked",
    "layer4.1.conv1.weight",
    "layer4.1.bn1.weight",
    "layer4.1.bn1.bias",
    "layer4.1.bn1.running_mean",
    "layer4.1.bn1.running_var",
    "layer4.1.bn1.num_batches_tracked",
    "layer4.1.conv2.weight",
    "layer4.1.bn2.weight",
    "layer4.1.bn2.bias",
    "layer4.1.bn2.running_mean",
    "layer4.1.bn2.running_var",
    "layer4.1.bn2.num_batches_tracked",
    "fc.weight",
    "fc.bias",
]


def _sd(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", ["resnet", "resnet_narrow"])
def test_mnist_models_output_shape(name: str) -> None:
    model = build_model(name)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("small_input", [False, True])
def test_resnet18_output_shape(small_input: bool) -> None:
    model = resnet18(small_input=small_input).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    expected_kernel = 3 if small_input else 7
    assert model.conv1.kernel_size == (expected_kernel, expected_kernel)
    assert isinstance(model.maxpool, nn.Identity if small_input else nn.MaxPool2d)


def test_resnet50_output_shape() -> None:
    model = resnet50(num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_widths_and_classes_are_configurable() -> None:
    model = resnet_small(widths=(4, 8, 16), num_classes=3, in_channels=2)
    assert model.fc.in_features == 16
    assert model(torch.randn(2, 2, 28, 28)).shape == (2, 3)
    assert resnet_narrow().fc.in_features == 32
    assert resnet_small().fc.in_features == 128


# ----------------------------------------------------------------------------- fx


@pytest.mark.parametrize("builder", [resnet_small, resnet_narrow, resnet50])
def test_fx_symbolic_trace_matches_module(builder: Any) -> None:
    model = builder().eval()
    shape = (2, 1, 28, 28) if builder is not resnet50 else (1, 3, 64, 64)
    x = torch.randn(*shape)
    traced = fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert {"conv1", "bn1", "maxpool", "layer1.0.conv1", "fc"} <= targets


# ----------------------------------------------------------------------------- names


def test_resnet18_state_dict_keys_match_torchvision() -> None:
    assert len(RESNET18_KEYS) == 122
    sd = resnet18().state_dict()
    assert list(sd) == RESNET18_KEYS
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert sd["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert sd["fc.weight"].shape == (1000, 512)
    # small_input only changes the conv1 kernel, not the names
    assert list(resnet18(small_input=True).state_dict()) == RESNET18_KEYS


def test_resnet50_state_dict_matches_torchvision() -> None:
    model = resnet50()
    sd = model.state_dict()
    assert len(sd) == 320
    assert len(list(model.parameters())) == 161
    expected_shapes = {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.running_var": (1024,),
        "layer4.0.downsample.1.num_batches_tracked": (),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048),
        "fc.bias": (1000,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    # v1.5: the stride sits on the 3x3 convolution
    assert model.get_submodule("layer2.0.conv2").stride == (2, 2)
    assert model.get_submodule("layer2.0.conv1").stride == (1, 1)
    assert "layer1.1.downsample.0.weight" not in sd


def test_torchvision_init() -> None:
    model = resnet_narrow()
    assert torch.all(model.get_parameter("bn1.weight") == 1)
    assert torch.all(model.get_parameter("bn1.bias") == 0)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    # kaiming normal, fan_out: std = sqrt(2 / (out_channels * k * k))
    w = resnet18().get_parameter("layer4.0.conv2.weight").detach()
    expected = (2.0 / (512 * 9)) ** 0.5
    assert abs(float(w.std()) - expected) / expected < 0.05


def test_group_norm_variant() -> None:
    model = resnet_small(widths=(8, 24, 100), norm="group")
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert {(m.num_channels, m.num_groups) for m in norms} == {(8, 8), (24, 24), (100, 25)}
    assert not any("running" in k for k in model.state_dict())
    # Opacus registers full backward hooks on GroupNorm: ReLU must then not be in place
    for m in norms:
        m.register_full_backward_hook(lambda *args: None)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    config = ResNetConfig(block="basic", layers=(1,), widths=(8,), norm="group", inplace_relu=True)
    hooked = ResNet(config)
    hooked.bn1.register_full_backward_hook(lambda *args: None)
    with pytest.raises(RuntimeError, match="inplace"):
        hooked(torch.randn(2, 1, 28, 28)).sum().backward()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="block"):
        ResNetConfig(block="wide", layers=(1,), widths=(8,))
    with pytest.raises(ValueError, match="widths has 1 entries"):
        ResNetConfig(block="basic", layers=(1, 1), widths=(8,))
    with pytest.raises(ValueError, match="strides"):
        ResNetConfig(block="basic", layers=(1, 1), widths=(8, 16), strides=(1,))
    with pytest.raises(ValueError, match="layers must contain positive ints"):
        ResNetConfig(block="basic", layers=(0,), widths=(8,))
    with pytest.raises(ValueError, match="stem"):
        ResNetConfig(block="basic", layers=(1,), widths=(8,), stem="cifar")
    with pytest.raises(ValueError, match="norm"):
        ResNetConfig(block="basic", layers=(1,), widths=(8,), norm="layer")
    with pytest.raises(ValueError, match="num_classes"):
        ResNetConfig(block="basic", layers=(1,), widths=(8,), num_classes=0)
    config = ResNetConfig(block="basic", layers=[1, 1], widths=[4, 8])  # type: ignore[arg-type]
    assert config.layers == (1, 1) and config.stage_strides == (1, 2)
    assert isinstance(ResNet(config), ResNet)


def test_registry() -> None:
    assert set(MODELS) == {
        "resnet",
        "resnet_narrow",
        "resnet18",
        "resnet50",
        "vit_tiny_mnist",
        "seg_small",  # issue 16: segmentation and super-resolution
        "seg_small_rh",
        "seg_narrow",
        "espcn",
    }
    assert build_model("resnet18", num_classes=5).fc.out_features == 5  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="known models: espcn, resnet, resnet18, resnet50"):
        build_model("vgg16")


# ----------------------------------------------------------------------------- checkpoints


def _assert_same_state(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_strict_load_round_trip(tmp_path: Path) -> None:
    src = resnet_narrow()
    src.train()
    src(torch.randn(4, 1, 28, 28))  # changes the BN running statistics
    path = tmp_path / "ckpt" / "model.pth"
    save_checkpoint_atomic(src.state_dict(), path)
    dst = resnet_narrow()
    load_checkpoint_strict(dst, path)
    _assert_same_state(src.state_dict(), dst.state_dict())
    assert os.listdir(path.parent) == ["model.pth"]


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_strict_load_wrapped(tmp_path: Path, wrapper: str) -> None:
    src = resnet_narrow()
    path = tmp_path / "wrapped.pth"
    save_checkpoint_atomic({wrapper: src.state_dict(), "epoch": 3}, path)
    dst = resnet_narrow()
    load_checkpoint_strict(dst, path)
    _assert_same_state(src.state_dict(), dst.state_dict())
    dst2 = resnet_narrow()
    load_checkpoint_strict(dst2, {wrapper: src.state_dict()})
    _assert_same_state(src.state_dict(), dst2.state_dict())


def test_missing_key_raises() -> None:
    sd = _sd(resnet_narrow())
    del sd["layer2.0.conv1.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): layer2\.0\.conv1\.weight"):
        load_checkpoint_strict(resnet_narrow(), sd)


def test_unexpected_key_raises() -> None:
    sd = _sd(resnet_narrow())
    sd["head.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): head\.weight"):
        load_checkpoint_strict(resnet_narrow(), sd)


def test_wrong_shape_raises_and_leaves_model_untouched() -> None:
    sd = _sd(resnet_narrow())
    sd["fc.weight"] = torch.zeros(10, 16)
    sd["layer1.0.conv1.weight"] = torch.ones_like(sd["layer1.0.conv1.weight"])
    model = resnet_narrow()
    before = _sd(model)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_strict(model, sd)
    message = str(info.value)
    assert "fc.weight: expected (10, 32), got (10, 16)" in message
    assert "layer1.0.conv1.weight" not in message
    _assert_same_state(before, model.state_dict())


def test_all_problems_reported_together() -> None:
    sd = _sd(resnet_narrow())
    del sd["bn1.bias"]
    sd["extra"] = torch.zeros(1)
    sd["fc.bias"] = torch.zeros(11)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_strict(resnet_narrow(), sd)
    message = str(info.value)
    assert "bn1.bias" in message and "extra" in message and "fc.bias" in message
    assert isinstance(info.value, ValueError)


def test_missing_num_batches_tracked() -> None:
    sd = {k: v for k, v in _sd(resnet_narrow()).items() if "num_batches_tracked" not in k}
    load_checkpoint_strict(resnet_narrow(), sd)  # old torchvision weights lack them
    with pytest.raises(CheckpointError, match="bn1.num_batches_tracked"):
        load_checkpoint_strict(resnet_narrow(), sd, allow_missing_num_batches_tracked=False)


def test_corrupt_or_missing_file_raises(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.pth"):
        load_checkpoint_strict(resnet_narrow(), bad)
    good = tmp_path / "good.pth"
    save_checkpoint_atomic(resnet_narrow().state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_checkpoint_strict(resnet_narrow(), truncated)
    with pytest.raises(CheckpointError, match="nope.pth"):
        load_checkpoint_strict(resnet_narrow(), tmp_path / "nope.pth")
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint_strict(resnet_narrow(), not_a_dict)


def test_atomic_save_keeps_old_file_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.pth"
    old = resnet_narrow()
    save_checkpoint_atomic(old.state_dict(), path)
    old_bytes = path.read_bytes()

    def failing_save(obj: object, f: Any, *args: object, **kwargs: object) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint_atomic(resnet_narrow().state_dict(), path)
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == ["model.pth"]
    restored = resnet_narrow()
    load_checkpoint_strict(restored, path)
    _assert_same_state(old.state_dict(), restored.state_dict())
