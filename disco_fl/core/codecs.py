"""Wire codecs for activations: fp32 (bit-exact), fp16, int8 with one fp32 scale per sample.
The model input may also travel as raw image pixels (:data:`PIXELS`, ``"uint8"``: 1 exact byte
per element; never an activation codec, see :mod:`disco_fl.core.pixels`).

Each codec knows how many bytes a message costs (used by the plan's accounting) and how to
round-trip a tensor through its precision (used by the emulation to reproduce exactly what a
receiving node would see). The int8 codec is symmetric: for every sample ``b`` of a message,
``scale_b = max|x_b| / 127`` and ``q = round(x / scale_b)``; the error per element is at most
``scale_b / 2 = max|x_b| / 254``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_BYTES = 4  # one fp32 scale per sample per message (int8 only)


@dataclass(frozen=True)
class Codec:
    name: str
    bytes_per_element: int
    scale_bytes_per_sample: int  # per message

    def message_bytes(self, elements_per_sample: int, rows: int = 1) -> int:
        """Payload bytes of one message for one sample (0 elements: no message, 0 bytes);
        ``rows``: rows of dim 0 per sample, each with its own int8 scale."""
        if elements_per_sample <= 0:
            return 0
        return elements_per_sample * self.bytes_per_element + self.scale_bytes_per_sample * rows

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))`` in floating point, batch dimension first."""
        if self.name == "fp32":
            return x
        if self.name == "fp16":
            return x.to(torch.float16).to(x.dtype)
        if self.name == PIXELS.name:
            raise ValueError("the uint8 codec carries image pixels, not activations")
        q, scale = int8_quantize(x)
        return int8_dequantize(q, scale).to(x.dtype)


def int8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-sample int8 quantization; returns ``(q int8, scale float32[B])``."""
    b = x.shape[0]
    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.int8), torch.ones(b)
    flat = x.detach().reshape(b, -1).to(torch.float32)
    absmax = flat.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    shape = (b,) + (1,) * (x.dim() - 1)
    q = torch.clamp(torch.round(x.to(torch.float32) / scale.view(shape)), -127, 127)
    return q.to(torch.int8), scale


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    shape = (q.shape[0],) + (1,) * (q.dim() - 1)
    return q.to(torch.float32) * scale.view(shape)


CODECS: dict[str, Codec] = {
    "fp32": Codec("fp32", 4, 0),
    "fp16": Codec("fp16", 2, 0),
    "int8": Codec("int8", 1, SCALE_BYTES),
}


# image pixels (the model input only): 1 unsigned byte per element, exact, no scale
PIXELS = Codec("uint8", 1, 0)


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}") from None
