"""A small Vision Transformer whose parameter names follow timm's ``VisionTransformer``.

``state_dict`` keys: ``cls_token``, ``pos_embed``, ``patch_embed.proj.{weight,bias}``, and per
block ``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``,
``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2``, then ``norm`` and
``head`` (``cls_token`` only with ``pool="cls"``), so a timm checkpoint of the same
architecture loads with :func:`disco_fl.models.checkpoint.load_checkpoint_strict`. Blocks are
pre-norm; the attention is the hand-written timm form (``qkv`` -> heads ->
``scaled_dot_product_attention`` -> ``proj``), which :func:`disco_fl.partition` recognises and
splits by heads. Every ``forward`` is traceable by ``torch.fx``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "Block", "Mlp", "PatchEmbed", "ViT", "ViTConfig", "vit_tiny_mnist"]

_POOLS = ("cls", "mean")


@dataclass
class ViTConfig:
    """Architecture of a :class:`ViT`; every field is validated in ``__post_init__``."""

    # Side of the (square) input image, pixels.
    image_size: int = 28
    # Side of a (square) patch; must divide image_size. Tokens: (image_size / patch_size) ** 2.
    patch_size: int = 7
    # Channels of the input images (1 for MNIST, 3 for RGB).
    in_chans: int = 1
    # Outputs of the classifier ``head``.
    num_classes: int = 10
    # Width D of the residual stream (token features); must be divisible by num_heads.
    embed_dim: int = 64
    # Number of transformer blocks.
    depth: int = 4
    # Attention heads per block (head_dim = embed_dim / num_heads).
    num_heads: int = 4
    # Hidden units of each MLP = mlp_ratio * embed_dim (rounded down).
    mlp_ratio: float = 2.0
    # "cls": a class token is prepended and its final state x[:, 0] is classified (timm
    # default). "mean": no class token; the mean of the token states is classified (timm's
    # global_pool="avg", class_token=False).
    pool: str = "cls"
    # Dropout on the attention weights, after each projection/MLP and after the positional
    # embedding (0 = off; eval mode never drops).
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "in_chans", "num_classes", "embed_dim"):
            _positive(name, getattr(self, name))
        _positive("depth", self.depth)
        _positive("num_heads", self.num_heads)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size {self.patch_size} must divide image_size {self.image_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}"
            )
        if not self.mlp_ratio > 0 or int(self.embed_dim * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {self.pool!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: a Conv2d with stride = kernel = patch."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, T, D)


class Attention(nn.Module):
    """timm's ``Attention``: ``qkv`` -> heads -> scaled dot-product attention -> ``proj``."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # (B, T, D)
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hd)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
        )  # (B, H, T, hd)
        x = x.transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return self.proj_drop(self.proj(x))  # (B, T, D)


class Mlp(nn.Module):
    """timm's ``Mlp``: ``fc1`` -> GELU -> dropout -> ``fc2`` -> dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))  # (B, T, hidden)
        return self.drop2(self.fc2(x))  # (B, T, D)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (B, T, D)
        return x + self.mlp(self.norm2(x))  # (B, T, D)


class ViT(nn.Module):
    """Vision Transformer (timm ``VisionTransformer`` names); see :class:`ViTConfig`."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.patch_embed = PatchEmbed(config.in_chans, d, config.patch_size)
        tokens = config.num_patches
        if config.pool == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
            tokens += 1
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, d))
        self.pos_drop = nn.Dropout(config.dropout)
        self.blocks = nn.Sequential(
            *[
                Block(d, config.num_heads, config.mlp_hidden, config.dropout)
                for _ in range(config.depth)
            ]
        )
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.config.pool == "cls":
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, T, D)
        if self.config.pool == "cls":
            cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
            x = torch.cat((cls, x), dim=1)  # (B, T + 1, D)
        x = self.pos_drop(x + self.pos_embed)  # (B, T', D)
        x = self.norm(self.blocks(x))  # (B, T', D)
        x = x[:, 0] if self.config.pool == "cls" else x.mean(dim=1)  # (B, D)
        logits: torch.Tensor = self.head(x)  # (B, num_classes)
        return logits


def vit_tiny_mnist(
    num_classes: int = 10, in_channels: int = 1, pool: str = "cls", dropout: float = 0.0
) -> ViT:
    """The preset "vit_tiny_mnist": 28x28 images, 7x7 patches (16 tokens + class token),
    D = 64, 4 blocks of 4 heads, MLP ratio 2 (about 0.14 M parameters).

    Parameters
    ----------
    num_classes : int, default 10
        Outputs of ``head``.
    in_channels : int, default 1
        Input channels.
    pool : {"cls", "mean"}, default "cls"
        Classify the class token or the mean of the tokens.
    dropout : float, default 0.0
        See :class:`ViTConfig`.
    """
    return ViT(
        ViTConfig(
            image_size=28,
            patch_size=7,
            in_chans=in_channels,
            num_classes=num_classes,
            embed_dim=64,
            depth=4,
            num_heads=4,
            mlp_ratio=2.0,
            pool=pool,
            dropout=dropout,
        )
    )
