"""Tensors on the wire: encoding with the plan's codec, strict decoding of untrusted messages.

``decode_tensor(encode_tensor(x, c))`` is exactly ``get_codec(c).roundtrip(x)`` (bit for bit),
so a node that receives a message over the network sees what the emulation computes with.
Image pixels (codec and dtype UINT8, :mod:`disco_fl.core.pixels`) travel exactly; only the
model input may carry them, so a decoder refuses them unless its caller allows ``pixels``.
Every field of a received :class:`~disco_fl.proto_gen.disco.v1.peer_pb2.Tensor` is checked
with real checks before any byte is interpreted; a bad message raises :class:`WireError`.

Copies: encoding makes one copy of the payload (``tobytes``), written straight into the
message; decoding reads the payload bytes out of the message once and makes one conversion
into a fresh, writable tensor (so nothing aliases the message's buffer).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from disco_fl.core.codecs import CODECS, PIXELS, int8_dequantize, int8_quantize
from disco_fl.proto_gen.disco.v1 import peer_pb2

MAX_NDIM = 8
# default bound of one decoded peer message (``max_bytes``) in inference and training
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30

Tensor = peer_pb2.Tensor

DTYPES: dict[int, torch.dtype] = {
    Tensor.DTYPE_FLOAT32: torch.float32,
    Tensor.DTYPE_FLOAT16: torch.float16,
    Tensor.DTYPE_BFLOAT16: torch.bfloat16,
    Tensor.DTYPE_UINT8: torch.uint8,  # image pixels (codec UINT8 only)
}
_DTYPE_ENUM = {v: k for k, v in DTYPES.items()}

# the wire enum of every codec of :data:`disco_fl.core.codecs.CODECS` (``"fp16"`` -> CODEC_FP16)
_CODEC_ENUM: dict[str, int] = {name: Tensor.Codec.Value(f"CODEC_{name.upper()}") for name in CODECS}
_CODEC_ENUM[PIXELS.name] = Tensor.CODEC_UINT8  # "uint8": image pixels, the model input only
CODEC_NAMES = {v: k for k, v in _CODEC_ENUM.items()}
# bytes of one element of ``data`` and its little-endian numpy type, per codec
_ITEM: dict[int, tuple[int, np.dtype[Any]]] = {
    Tensor.CODEC_FP32: (4, np.dtype("<f4")),
    Tensor.CODEC_FP16: (2, np.dtype("<f2")),
    Tensor.CODEC_INT8: (1, np.dtype("i1")),
    Tensor.CODEC_UINT8: (1, np.dtype("u1")),
}
_SCALE = np.dtype("<f4")


class WireError(ValueError):
    """A tensor message that is malformed, inconsistent or too large (or cannot be encoded)."""


def codec_enum(codec: str) -> int:
    """The wire enum of codec ``codec`` (a name of :data:`disco_fl.core.codecs.CODECS`)."""
    try:
        return _CODEC_ENUM[codec]
    except KeyError:
        raise WireError(
            f"unknown codec {codec!r}; choose one of {sorted(CODECS)} (or uint8 for pixels)"
        ) from None


def encode_tensor(
    t: torch.Tensor, codec: str = "fp32", *, out: peer_pb2.Tensor | None = None
) -> peer_pb2.Tensor:
    """Encode ``t`` (float32 / float16 / bfloat16, any device) with ``codec``, or image
    pixels ``t`` (uint8) with codec ``"uint8"`` (and only they use it).

    Pass ``out`` (e.g. ``frame.tensor``) to fill a message in place instead of building a new
    one (protobuf copies a sub-message when it is assigned).
    """
    if not isinstance(t, torch.Tensor):
        raise WireError(f"expected a torch.Tensor, got {type(t).__name__}")
    dtype = _DTYPE_ENUM.get(t.dtype)
    if dtype is None:
        raise WireError(
            f"cannot send a {t.dtype} tensor (float32, float16, bfloat16; uint8 pixels)"
        )
    if t.dim() > MAX_NDIM:
        raise WireError(f"cannot send a {t.dim()}-d tensor (at most {MAX_NDIM} dimensions)")
    code = codec_enum(codec)
    if (code == Tensor.CODEC_UINT8) != (dtype == Tensor.DTYPE_UINT8):
        raise WireError(f"a {t.dtype} tensor cannot go with codec {codec} (uint8 pixels only)")
    x = t.detach().cpu()
    msg = peer_pb2.Tensor() if out is None else out
    msg.Clear()
    msg.dtype = dtype  # type: ignore[assignment]
    msg.codec = code  # type: ignore[assignment]
    msg.shape.extend(x.shape)
    if code == Tensor.CODEC_INT8:
        if x.dim() == 0:
            raise WireError("int8 needs a batch dimension (got a 0-d tensor)")
        if x.shape[0] == 0:  # no samples: nothing to quantize (int8_quantize needs one)
            q, scale = torch.empty(x.shape, dtype=torch.int8), torch.empty(0)
        else:
            q, scale = int8_quantize(x)
        msg.scales = scale.contiguous().numpy().astype(_SCALE, copy=False).tobytes()
        msg.data = q.contiguous().numpy().tobytes()
    elif code == Tensor.CODEC_UINT8:
        msg.data = x.contiguous().numpy().tobytes()
    else:
        wire_dtype = torch.float32 if code == Tensor.CODEC_FP32 else torch.float16
        arr = x.to(wire_dtype).contiguous().numpy()
        msg.data = arr.astype(_ITEM[code][1], copy=False).tobytes()
    return msg


def payload_bytes(msg: peer_pb2.Tensor) -> int:
    """Payload of a message: ``len(data) + len(scales)`` (what the plan's accounting counts)."""
    return len(msg.data) + len(msg.scales)


def check_header(msg: peer_pb2.Tensor) -> tuple[int, torch.dtype, list[int], int]:
    """Check the fields that do not need the payload: ``(codec, dtype, shape, elements)``."""
    if not isinstance(msg, peer_pb2.Tensor):
        raise WireError(f"expected a disco.v1.Tensor message, got {type(msg).__name__}")
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        raise WireError(f"unknown tensor dtype enum value {msg.dtype}")
    codec = msg.codec
    if codec not in _ITEM:
        raise WireError(f"unknown tensor codec enum value {codec}")
    shape = list(msg.shape)
    if len(shape) > MAX_NDIM:
        raise WireError(f"tensor has {len(shape)} dimensions (at most {MAX_NDIM})")
    if any(s < 0 for s in shape):
        raise WireError(f"tensor shape {shape} has a negative dimension")
    if codec == Tensor.CODEC_INT8 and not shape:
        raise WireError("int8 tensor without a batch dimension")
    if (codec == Tensor.CODEC_UINT8) != (msg.dtype == Tensor.DTYPE_UINT8):
        raise WireError(
            f"tensor codec {CODEC_NAMES[codec]} with dtype {dtype}: codec uint8 goes with "
            f"dtype uint8 (image pixels) and only with it"
        )
    return codec, dtype, shape, math.prod(shape)


def _check(
    msg: peer_pb2.Tensor, max_bytes: int, pixels: bool
) -> tuple[int, torch.dtype, list[int], bytes, bytes]:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
    codec, dtype, shape, n = check_header(msg)
    if codec == Tensor.CODEC_UINT8 and not pixels:
        raise WireError(
            "uint8 image pixels where they are not allowed (only the model input carries them: "
            "an INPUT frame or an inference request)"
        )
    data, scales = msg.data, msg.scales  # each read once (upb copies on access)
    size = len(data) + len(scales)
    if size > max_bytes:
        raise WireError(f"tensor payload of {size} bytes exceeds the limit of {max_bytes} bytes")
    item = _ITEM[codec][0]
    if n * item != len(data):
        raise WireError(
            f"tensor of shape {shape} with codec {CODEC_NAMES[codec]} needs {n * item} data "
            f"bytes, got {len(data)}"
        )
    want = 4 * shape[0] if codec == Tensor.CODEC_INT8 else 0
    if len(scales) != want:
        raise WireError(
            f"tensor with codec {CODEC_NAMES[codec]} and shape {shape} needs {want} scale "
            f"bytes, got {len(scales)}"
        )
    return codec, dtype, shape, data, scales


def validate_tensor(msg: peer_pb2.Tensor, *, max_bytes: int, pixels: bool = False) -> None:
    """Raise :class:`WireError` unless ``msg`` is a well-formed tensor of at most ``max_bytes``
    (uint8 pixels only with ``pixels``)."""
    _check(msg, max_bytes, pixels)


def decode_tensor(msg: peer_pb2.Tensor, *, max_bytes: int, pixels: bool = False) -> torch.Tensor:
    """Decode an untrusted message into a fresh CPU tensor of the sender's dtype.

    ``max_bytes`` bounds the payload (``data`` + ``scales``). ``pixels``: the message may be
    uint8 image pixels (the model input; decoded to a uint8 tensor, exactly), refused
    otherwise. Raises :class:`WireError`.
    """
    codec, dtype, shape, data, scales = _check(msg, max_bytes, pixels)
    if codec == Tensor.CODEC_UINT8:  # a fresh copy: never aliases ``data``
        return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()).reshape(shape)
    # one conversion into a fresh native-endian float32 array (never aliases ``data``)
    values = np.frombuffer(data, dtype=_ITEM[codec][1]).astype(np.float32)
    x = torch.from_numpy(values).reshape(shape)
    if codec == Tensor.CODEC_INT8:
        # ``values`` hold the int8 codes exactly; int8_dequantize multiplies them by the scales
        scale = torch.from_numpy(np.frombuffer(scales, dtype=_SCALE).astype(np.float32))
        x = int8_dequantize(x, scale)
    return x if dtype == torch.float32 else x.to(dtype)


# ---- typed control messages of a training step (disco.v1.Control) ---------------------------

PROTOCOL_VERSION = 2  # of the peer protocol (protos/disco/v1/peer.proto); 1 had no number
MAX_CAUSE = 4096  # characters of an abort's cause
MAX_SELECTION = 1 << 20  # channel indices in one selection

Control = peer_pb2.Control


def check_control(msg: peer_pb2.Control, *, num_nodes: int) -> str | None:
    """Why a control message must be refused, or ``None``: exactly one known body with its
    required fields (a vote's ``ok``, an abort's ``failed_node`` naming one of ``num_nodes``
    nodes and a cause of at most :data:`MAX_CAUSE` characters, a selection of strictly
    increasing channel indices, so no duplicates; a missing set of strictly increasing node
    indices). A selection's indices are checked against
    the sender's slice by :func:`decode_selection`, which knows it."""
    if not isinstance(msg, peer_pb2.Control):
        return f"expected a disco.v1.Control message, got {type(msg).__name__}"
    body = msg.WhichOneof("body")
    if body is None:
        # fields this node does not know still count in the serialized size
        unknown = " (a body this node does not know)" if msg.ByteSize() else ""
        return f"control message without a body{unknown}"
    if body == "vote":
        if not msg.vote.HasField("ok"):
            return "vote without its 'ok' field"
        return None
    if body == "abort":
        a = msg.abort
        if not a.HasField("failed_node"):
            return "abort without its 'failed_node' field"
        if not a.failed_node < num_nodes:
            return f"abort names node {a.failed_node}, out of range for {num_nodes} nodes"
        if len(a.cause) > MAX_CAUSE:
            return f"abort cause longer than {MAX_CAUSE} characters"
        return None
    if body == "missing":
        nodes = list(msg.missing.nodes)
        if any(b <= a for a, b in zip(nodes, nodes[1:], strict=False)):
            return f"missing set {nodes} is not strictly increasing"
        if nodes and not nodes[-1] < num_nodes:
            return f"missing set names node {nodes[-1]}, out of range for {num_nodes} nodes"
        return None
    chans = msg.selection.channels
    if len(chans) > MAX_SELECTION:
        return f"channel selection of {len(chans)} indices (at most {MAX_SELECTION})"
    for i in range(1, len(chans)):
        if chans[i] == chans[i - 1]:
            return f"channel selection repeats channel {chans[i]}"
        if chans[i] < chans[i - 1]:
            return f"channel selection is not increasing ({chans[i - 1]} then {chans[i]})"
    return None


def validate_control(msg: peer_pb2.Control, *, num_nodes: int) -> None:
    """Raise :class:`WireError` unless ``msg`` passes :func:`check_control`."""
    why = check_control(msg, num_nodes=num_nodes)
    if why is not None:
        raise WireError(why)


def decode_selection(msg: peer_pb2.Control, *, channels: int) -> torch.Tensor:
    """The channel indices of a selection message (``int64``, strictly increasing), each below
    ``channels`` (the sender's slice width). Raises :class:`WireError`."""
    if not isinstance(msg, peer_pb2.Control) or msg.WhichOneof("body") != "selection":
        body = msg.WhichOneof("body") if isinstance(msg, peer_pb2.Control) else None
        raise WireError(f"expected a channel selection, got {body or 'no body'}")
    why = check_control(msg, num_nodes=1)
    if why is not None:
        raise WireError(why)
    chans = list(msg.selection.channels)
    if chans and chans[-1] >= channels:
        raise WireError(
            f"channel selection names channel {chans[-1]}, out of range for a slice of "
            f"{channels} channels"
        )
    return torch.tensor(chans, dtype=torch.long)


def selection_message(idx: torch.Tensor) -> peer_pb2.Control:
    """A selection message of local channel indices ``idx`` (1-d, strictly increasing)."""
    return Control(selection=peer_pb2.ChannelSelection(channels=[int(i) for i in idx.tolist()]))


def vote_message(ok: bool = True) -> peer_pb2.Control:
    return Control(vote=peer_pb2.Vote(ok=ok))


def missing_message(nodes: Iterable[int]) -> peer_pb2.Control:
    """Degraded training: a missing set (proposed or decided), as sorted node indices."""
    return Control(missing=peer_pb2.MissingSet(nodes=sorted(set(nodes))))


def abort_message(failed_node: int, cause: str) -> peer_pb2.Control:
    return Control(abort=peer_pb2.Abort(failed_node=failed_node, cause=cause[:MAX_CAUSE]))


def frame_payload_bytes(frame: peer_pb2.Frame) -> int:
    """Payload of a frame: its tensor's (:func:`payload_bytes`) or its control message's
    serialized size (a commit vote: 4 bytes)."""
    if frame.HasField("control"):
        return frame.control.ByteSize()
    return payload_bytes(frame.tensor) if frame.HasField("tensor") else 0


def frame_kind_problem(
    frame: peer_pb2.Frame, direction: int, codec: int, *, pixels: bool = False
) -> str | None:
    """Why a tensor frame is not of the ``direction`` and wire ``codec`` (enum) the plan says
    the receiver expects, or ``None``; ``pixels`` (the model input's frames): uint8 pixels
    are expected too."""
    if frame.direction == direction and (
        frame.tensor.codec == codec or (pixels and frame.tensor.codec == Tensor.CODEC_UINT8)
    ):
        return None
    return (
        f"frame direction {frame.direction} / codec {frame.tensor.codec}, "
        f"expected {direction} / {codec}"
    )
