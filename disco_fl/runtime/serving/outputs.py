"""What ``disco-fl infer`` writes for dense outputs: an ``.npz`` and, optionally, PNG files.

- ``.npz`` (``--out FILE.npz``, no pickles): ``outputs`` float32, the model's outputs as the
  task predicts them (segmentation: the logits ``(N, K, H, W)``; super-resolution: the images
  ``(N, C, H, W)`` clamped to [0, 1]; classification: the logits ``(N, K)``), ``names`` (the
  input of each row), and ``masks`` (segmentation: the class index per pixel, arg-max over
  ``K``, ``(N, H, W)``, uint8 for at most 256 classes, else int32) or ``predictions``
  (classification: the class index per input).
- PNG (``--png-dir DIR``, dense tasks): one file per input, ``<row>_<input name>.png``.
  Segmentation: a palette PNG whose pixel values are the class indices (PIL reads them back
  with ``np.array(Image.open(f))``), coloured with the PASCAL VOC colour map (class 0 black);
  at most 256 classes. Super-resolution: 8-bit grayscale (one channel) or RGB (three),
  ``round(255 * image)``.

PNG files are written by :func:`png_bytes`, a minimal encoder (zlib and the PNG chunk format,
no dependency): matplotlib is a development dependency only and PIL is optional here.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from disco_fl.core.files import atomic_write_bytes

__all__ = ["png_bytes", "voc_palette", "write_outputs"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bytes(image: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """A PNG of uint8 ``image``: ``(H, W)`` grayscale, ``(H, W, 3)`` RGB, or with ``palette``
    (``(P, 3)`` uint8, ``P <= 256``) ``(H, W)`` palette indices."""
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or 0 in image.shape:
        raise ValueError(f"PNG: expected a non-empty uint8 (H, W[, 3]) image, got {image.shape}")
    if image.ndim == 3 and (image.shape[2] != 3 or palette is not None):
        raise ValueError(f"PNG: a colour image is (H, W, 3) without a palette, got {image.shape}")
    if palette is not None:
        palette = np.asarray(palette, dtype=np.uint8)
        if palette.ndim != 2 or palette.shape[1] != 3 or not 0 < len(palette) <= 256:
            raise ValueError(f"PNG: a palette is (P <= 256, 3), got {palette.shape}")
        if int(image.max()) >= len(palette):
            raise ValueError(
                f"PNG: index {int(image.max())} beyond a {len(palette)}-colour palette"
            )
    h, w = image.shape[:2]
    color_type = 3 if palette is not None else (2 if image.ndim == 3 else 0)
    rows = image.reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter 0
    out = [_PNG_SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))]
    if palette is not None:
        out.append(_chunk(b"PLTE", palette.tobytes()))
    out += [_chunk(b"IDAT", zlib.compress(raw, 6)), _chunk(b"IEND", b"")]
    return b"".join(out)


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: ``(n, 3)`` uint8, class 0 black, classes well apart."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, rgb = i, [0, 0, 0]
        for j in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - j)
            c >>= 3
        pal[i] = rgb
    return pal


def _file_name(row: int, name: str, width: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "input"
    return f"{row:0{width}d}_{safe[:80]}.png"


def write_outputs(
    task: str,
    outputs: torch.Tensor,
    names: Sequence[str],
    out: str | Path | None = None,
    png_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``outputs`` (the household's raw outputs, one row per input) of ``task`` as the
    module docstring says; returns what was written (``out``, ``png_dir``, ``pngs``) and, for
    segmentation, ``masks`` (the tensor of class indices)."""
    if png_dir is not None and task == "classification":
        raise ValueError("--png-dir is for dense outputs (segmentation, super_resolution)")
    arrays: dict[str, np.ndarray] = {"names": np.asarray(list(names), dtype=str)}
    result: dict[str, Any] = {"out": str(out) if out else None, "png_dir": None, "pngs": 0}
    images: np.ndarray | None = None
    masks: torch.Tensor | None = None
    if task == "segmentation":
        if outputs.dim() != 4:
            raise ValueError(
                f"segmentation outputs must be (N, K, H, W), got {tuple(outputs.shape)}"
            )
        masks = outputs.argmax(1)
        k = int(outputs.shape[1])
        arrays["outputs"] = outputs.float().numpy()
        arrays["masks"] = masks.numpy().astype(np.uint8 if k <= 256 else np.int32)
        result["masks"] = masks
        if png_dir is not None and k > 256:
            raise ValueError(f"--png-dir: a palette PNG holds at most 256 classes, not {k}")
    elif task == "super_resolution":
        if outputs.dim() != 4 or (png_dir is not None and outputs.shape[1] not in (1, 3)):
            raise ValueError(
                f"super-resolution PNGs need (N, 1 or 3, H, W) images, got {tuple(outputs.shape)}"
            )
        img = outputs.clamp(0.0, 1.0).float()
        arrays["outputs"] = img.numpy()
        images = (img * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    else:
        arrays["outputs"] = outputs.float().numpy()
        arrays["predictions"] = outputs.argmax(-1).numpy()
    if out is not None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        atomic_write_bytes(Path(out), buf.getvalue(), mode=0o644)
    if png_dir is not None:
        folder = Path(png_dir)
        folder.mkdir(parents=True, exist_ok=True)
        width = max(5, len(str(len(names))))
        pal = voc_palette()
        for i, name in enumerate(names):
            if images is not None:
                im = images[i]
                data = png_bytes(im[:, :, 0] if im.shape[2] == 1 else im)
            else:
                data = png_bytes(arrays["masks"][i].astype(np.uint8), pal)
            (folder / _file_name(i, name, width)).write_bytes(data)
        result.update(png_dir=str(folder), pngs=len(names))
    return result
