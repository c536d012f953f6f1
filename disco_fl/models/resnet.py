"""ResNets whose parameter and buffer names match ``torchvision.models.resnet``.

The modules here are a dependency-free re-implementation of torchvision's ResNet (v1.5: in a
bottleneck block the stride sits on the 3x3 convolution). With ``norm="batch"`` the
``state_dict`` keys and shapes are identical to torchvision's, so torchvision checkpoints load
with :func:`disco_fl.models.checkpoint.load_checkpoint_strict`. ``forward`` has no
data-dependent control flow, so every model is traceable by ``torch.fx.symbolic_trace``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ResNetConfig",
    "group_norm_groups",
    "resnet18",
    "resnet50",
    "resnet_narrow",
    "resnet_small",
]

_BLOCKS = ("basic", "bottleneck")
_STEMS = ("small", "imagenet")
_NORMS = ("batch", "group")


@dataclass
class ResNetConfig:
    """Architecture of a :class:`ResNet`.

    Lists passed for the tuple fields are converted to tuples; every field is validated in
    ``__post_init__`` and a bad value raises ``ValueError``.
    """

    # "basic" (two 3x3 convs, expansion 1) or "bottleneck" (1x1, 3x3, 1x1; expansion 4).
    block: str
    # Number of blocks in each stage; one entry per stage (layer1, layer2, ...).
    layers: tuple[int, ...]
    # Planes of each stage; a stage outputs planes * expansion channels (x4 for bottleneck).
    # The stem outputs widths[0] channels (torchvision: 64).
    widths: tuple[int, ...]
    # Stride of the first block of each stage; None (default) means 1 for the first stage
    # and 2 for every later one, as in torchvision.
    strides: tuple[int, ...] | None = None
    # "small": 3x3 conv, stride 1, padding 1 and no max-pool (``maxpool`` is nn.Identity),
    # meant for 28x28 inputs. "imagenet": 7x7 conv, stride 2, padding 3, then
    # MaxPool2d(3, 2, 1), exactly like torchvision.
    stem: str = "small"
    # Channels of the input images (1 for MNIST, 3 for RGB).
    in_channels: int = 1
    # Size of the output of the final fully connected layer ``fc``.
    num_classes: int = 10
    # "batch": BatchNorm2d (torchvision's names and buffers). "group": GroupNorm with
    # group_norm_groups(C) groups, i.e. the largest divisor of C that is <= 32 (no running
    # statistics, so no running_mean/running_var/num_batches_tracked buffers; usable with
    # differential privacy, e.g. Opacus).
    norm: str = "batch"
    # Whether the ReLUs work in place. None (default) means True for norm="batch" (as in
    # torchvision) and False for norm="group", because Opacus' full backward hooks forbid
    # in-place changes of a hooked module's output.
    inplace_relu: bool | None = None

    def __post_init__(self) -> None:
        if self.block not in _BLOCKS:
            raise ValueError(f"block must be one of {_BLOCKS}, got {self.block!r}")
        if self.stem not in _STEMS:
            raise ValueError(f"stem must be one of {_STEMS}, got {self.stem!r}")
        if self.norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {self.norm!r}")
        self.layers = _positive_ints("layers", self.layers)
        self.widths = _positive_ints("widths", self.widths)
        if len(self.layers) == 0:
            raise ValueError("layers must have at least one stage")
        if len(self.widths) != len(self.layers):
            raise ValueError(
                f"widths has {len(self.widths)} entries but layers has {len(self.layers)}; "
                "they need one entry per stage"
            )
        if self.strides is not None:
            self.strides = _positive_ints("strides", self.strides)
            if len(self.strides) != len(self.layers):
                raise ValueError(
                    f"strides has {len(self.strides)} entries but layers has "
                    f"{len(self.layers)}; they need one entry per stage"
                )
        for name in ("in_channels", "num_classes"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.inplace_relu is not None and not isinstance(self.inplace_relu, bool):
            raise ValueError(f"inplace_relu must be a bool or None, got {self.inplace_relu!r}")

    @property
    def expansion(self) -> int:
        """Channel expansion of the block type (1 for basic, 4 for bottleneck)."""
        return 1 if self.block == "basic" else Bottleneck.expansion

    @property
    def stage_strides(self) -> tuple[int, ...]:
        """Strides with the default filled in."""
        if self.strides is not None:
            return self.strides
        return (1,) + (2,) * (len(self.layers) - 1)

    @property
    def relu_inplace(self) -> bool:
        """``inplace_relu`` with the default filled in."""
        if self.inplace_relu is not None:
            return self.inplace_relu
        return self.norm == "batch"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_ints(name: str, values: object) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a sequence of positive ints, got {values!r}")
    result = tuple(values)
    for v in result:
        if not _is_int(v) or v < 1:
            raise ValueError(f"{name} must contain positive ints only, got {values!r}")
    return result


def group_norm_groups(channels: int, max_groups: int = 32) -> int:
    """Return the number of GroupNorm groups used for ``channels`` channels.

    Parameters
    ----------
    channels : int
        Number of channels to normalize.
    max_groups : int, default 32
        Upper bound on the number of groups.

    Returns
    -------
    int
        The largest divisor of ``channels`` that is ``<= max_groups`` (e.g. 32 for 64
        channels, 8 for 8 channels, 25 for 100 channels).
    """
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(group_norm_groups(channels), channels)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (torchvision's ``conv3x3``)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution with no bias (torchvision's ``conv1x1``)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (torchvision's ``BasicBlock``).

    Parameters
    ----------
    inplanes : int
        Input channels.
    planes : int
        Output channels (expansion 1).
    stride : int, default 1
        Stride of ``conv1`` and of the downsample shortcut.
    downsample : nn.Module or None, default None
        Shortcut projection; None means identity.
    norm : str, default "batch"
        "batch" or "group", see :class:`ResNetConfig`.
    inplace_relu : bool, default True
        Whether ``relu`` works in place.
    """

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm: str = "batch",
        inplace_relu: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = _norm_layer(norm, planes)
        self.relu = nn.ReLU(inplace=inplace_relu)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = _norm_layer(norm, planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        result: torch.Tensor = self.relu(out)
        return result


class Bottleneck(nn.Module):
    """1x1, 3x3 (strided, v1.5) and 1x1 convolutions with a residual connection.

    Matches torchvision's ``Bottleneck`` with ``groups=1`` and ``base_width=64``.

    Parameters
    ----------
    inplanes : int
        Input channels.
    planes : int
        Width of the 3x3 convolution; the block outputs ``planes * 4`` channels.
    stride : int, default 1
        Stride of ``conv2`` and of the downsample shortcut.
    downsample : nn.Module or None, default None
        Shortcut projection; None means identity.
    norm : str, default "batch"
        "batch" or "group", see :class:`ResNetConfig`.
    inplace_relu : bool, default True
        Whether ``relu`` works in place.
    """

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm: str = "batch",
        inplace_relu: bool = True,
    ) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = _norm_layer(norm, planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = _norm_layer(norm, planes)
        self.conv3 = conv1x1(planes, out_planes)
        self.bn3 = _norm_layer(norm, out_planes)
        self.relu = nn.ReLU(inplace=inplace_relu)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        result: torch.Tensor = self.relu(out)
        return result


class ResNet(nn.Module):
    """ResNet with torchvision's module names (conv1, bn1, relu, maxpool, layer1.., fc).

    Parameters
    ----------
    config : ResNetConfig
        The architecture. Kept as ``self.config``.

    Notes
    -----
    With ``stem="small"``, ``conv1`` is a 3x3/stride-1 convolution and ``maxpool`` is an
    ``nn.Identity`` (no parameters), so names stay aligned with torchvision. Initialization
    follows torchvision: Kaiming-normal (fan_out, relu) for convolutions, weight 1 and bias 0
    for normalization layers, PyTorch's default for ``fc``.
    """

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        inplace = config.relu_inplace
        block: type[BasicBlock] | type[Bottleneck] = (
            BasicBlock if config.block == "basic" else Bottleneck
        )
        self.inplanes = config.widths[0]
        if config.stem == "imagenet":
            self.conv1 = nn.Conv2d(
                config.in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False
            )
        else:
            self.conv1 = nn.Conv2d(
                config.in_channels, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False
            )
        self.bn1 = _norm_layer(config.norm, self.inplanes)
        self.relu = nn.ReLU(inplace=inplace)
        self.maxpool: nn.Module = (
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            if config.stem == "imagenet"
            else nn.Identity()
        )
        self.layer_names: tuple[str, ...] = tuple(
            f"layer{i + 1}" for i in range(len(config.layers))
        )
        for name, blocks, planes, stride in zip(
            self.layer_names, config.layers, config.widths, config.stage_strides, strict=True
        ):
            self.add_module(name, self._make_layer(block, planes, blocks, stride))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(config.widths[-1] * block.expansion, config.num_classes)
        self._init_weights()

    def _make_layer(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        blocks: int,
        stride: int,
    ) -> nn.Sequential:
        norm = self.config.norm
        inplace = self.config.relu_inplace
        out_planes = planes * block.expansion
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != out_planes:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, out_planes, stride), _norm_layer(norm, out_planes)
            )
        modules: list[nn.Module] = [
            block(self.inplanes, planes, stride, downsample, norm=norm, inplace_relu=inplace)
        ]
        self.inplanes = out_planes
        for _ in range(1, blocks):
            modules.append(block(self.inplanes, planes, norm=norm, inplace_relu=inplace))
        return nn.Sequential(*modules)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        for name in self.layer_names:
            x = getattr(self, name)(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        logits: torch.Tensor = self.fc(x)
        return logits


def resnet_small(
    widths: tuple[int, ...] = (32, 64, 128),
    num_classes: int = 10,
    in_channels: int = 1,
    norm: str = "batch",
) -> ResNet:
    """The benchmark model "resnet": basic blocks, layers (2, 2, 2), small stem.

    Parameters
    ----------
    widths : tuple of int, default (32, 64, 128)
        Planes of the three stages (strides 1, 2, 2).
    num_classes : int, default 10
        Outputs of ``fc``.
    in_channels : int, default 1
        Input channels.
    norm : str, default "batch"
        "batch" or "group" (see :class:`ResNetConfig`).
    """
    return ResNet(
        ResNetConfig(
            block="basic",
            layers=(2, 2, 2),
            widths=tuple(widths),
            strides=(1, 2, 2),
            stem="small",
            in_channels=in_channels,
            num_classes=num_classes,
            norm=norm,
        )
    )


def resnet_narrow(
    widths: tuple[int, ...] = (8, 16, 32),
    num_classes: int = 10,
    in_channels: int = 1,
    norm: str = "batch",
) -> ResNet:
    """Like :func:`resnet_small` with default widths (8, 16, 32) (model "resnet_narrow").

    Parameters
    ----------
    widths : tuple of int, default (8, 16, 32)
        Planes of the three stages.
    num_classes : int, default 10
        Outputs of ``fc``.
    in_channels : int, default 1
        Input channels.
    norm : str, default "batch"
        "batch" or "group".
    """
    return resnet_small(widths=widths, num_classes=num_classes, in_channels=in_channels, norm=norm)


def resnet18(
    num_classes: int = 1000,
    in_channels: int = 3,
    small_input: bool = False,
    norm: str = "batch",
) -> ResNet:
    """ResNet-18: basic blocks, layers (2, 2, 2, 2), widths (64, 128, 256, 512).

    Parameters
    ----------
    num_classes : int, default 1000
        Outputs of ``fc``.
    in_channels : int, default 3
        Input channels.
    small_input : bool, default False
        False: torchvision's 7x7/stride-2 stem with max-pool. True: the "small" 3x3 stem
        without max-pool (``conv1.weight`` then has shape (64, in_channels, 3, 3)).
    norm : str, default "batch"
        "batch" or "group".
    """
    return ResNet(
        ResNetConfig(
            block="basic",
            layers=(2, 2, 2, 2),
            widths=(64, 128, 256, 512),
            stem="small" if small_input else "imagenet",
            in_channels=in_channels,
            num_classes=num_classes,
            norm=norm,
        )
    )


def resnet50(
    num_classes: int = 1000,
    in_channels: int = 3,
    small_input: bool = False,
    norm: str = "batch",
) -> ResNet:
    """ResNet-50 (v1.5): bottleneck blocks, layers (3, 4, 6, 3), widths (64, 128, 256, 512).

    Parameters
    ----------
    num_classes : int, default 1000
        Outputs of ``fc`` (whose input has 2048 features).
    in_channels : int, default 3
        Input channels.
    small_input : bool, default False
        Use the "small" 3x3 stem without max-pool instead of torchvision's.
    norm : str, default "batch"
        "batch" or "group".
    """
    return ResNet(
        ResNetConfig(
            block="bottleneck",
            layers=(3, 4, 6, 3),
            widths=(64, 128, 256, 512),
            stem="small" if small_input else "imagenet",
            in_channels=in_channels,
            num_classes=num_classes,
            norm=norm,
        )
    )
