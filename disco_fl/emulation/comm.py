"""Communication accounting: what crosses the network for one sample under the hard masks.

Counted per sample (payload only; framing is the transport's business):

- ``input``: the requesting node sends the model input to each of the other N-1 nodes, with
  the plan's codec (a float input) or as uint8 image pixels (``input_codec="uint8"``: 1 byte
  per element, no scale; :mod:`disco_fl.core.pixels`).
- ``exchange``: for each exchanged tensor and ordered pair ``j -> k``, the open channels of
  ``j`` (a channel of a ``(B, C, H, W)`` tensor is ``H * W`` elements) with the codec; int8
  adds one fp32 scale per sample per non-empty message.
- ``stats``: GroupNorm / LayerNorm partial statistics (fp32, 2 values per shared group).
- ``output``: every other node sends its slice of the output to the requester.

``dense_*`` figures are the same with every gate open (dense tensor parallelism, same codec).
``sync_points`` counts the layers (exchanges and cross-node norms) where any message is sent;
input distribution and output gathering are reported separately.
``exchange_fraction`` is exchange bytes / dense exchange bytes, the quantity a budget targets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from disco_fl.core.codecs import PIXELS, Codec, get_codec
from disco_fl.partition import Program, Traffic, full_open_count, op_traffic, plan_open_count

if TYPE_CHECKING:
    from collections.abc import Callable


@dataclass
class LayerComm:
    op: str  # program op (exchange or norm)
    kind: str  # "exchange" | "stats" | "input" | "output"
    readers: list[str]  # modules that read the exchanged tensor
    bytes: int
    dense_bytes: int
    pairs: dict[str, int] = field(default_factory=dict)  # "j->k": bytes
    channels: dict[str, int] = field(default_factory=dict)  # "j->k": open channels


@dataclass
class CommReport:
    codec: str
    bytes_per_sample: int
    dense_bytes_per_sample: int
    sync_points: int
    dense_sync_points: int
    input_bytes: int
    output_bytes: int
    exchange_bytes: int
    dense_exchange_bytes: int
    stats_bytes: int
    layers: list[LayerComm]

    @property
    def exchange_fraction(self) -> float:
        return self.exchange_bytes / self.dense_exchange_bytes if self.dense_exchange_bytes else 0.0

    @property
    def reduction(self) -> float:
        """dense bytes / bytes (how many times less than dense tensor parallelism)."""
        return self.dense_bytes_per_sample / max(self.bytes_per_sample, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exchange_fraction"] = self.exchange_fraction
        d["reduction"] = self.reduction
        return d


def _bytes(traffic: list[Traffic], codec: Codec) -> tuple[int, dict[str, int], dict[str, int]]:
    total = 0
    pairs: dict[str, int] = {}
    chans: dict[str, int] = {}
    for t in traffic:
        b = codec.message_bytes(t.elements, t.rows) if t.coded else 4 * t.elements
        key = f"{t.src}->{t.dst}"
        pairs[key] = pairs.get(key, 0) + b
        chans[key] = chans.get(key, 0) + t.channels
        total += b
    return total, pairs, chans


def program_traffic(
    program: Program,
    open_count: Callable[[str, int, int], int],
    codec: str,
    input_dtype: str = "float32",
) -> CommReport:
    """Account a program given ``open_count(exchange, src, dst)`` open channels.

    ``input_dtype``: the requests' input, ``"float32"`` (sent with ``codec``, the default) or
    ``"uint8"`` (image pixels, 1 byte per element whatever ``codec``)."""
    if input_dtype not in ("float32", "uint8"):
        raise ValueError(f"input_dtype must be 'float32' or 'uint8', got {input_dtype!r}")
    plan_codec = get_codec(codec)
    in_codec = PIXELS if input_dtype == "uint8" else plan_codec
    readers: dict[str, list[str]] = {}
    for op in program.ops:
        for i in op.inputs:
            readers.setdefault(i, []).append(op.module or op.name)
    layers: list[LayerComm] = []
    tot = {"input": 0, "output": 0, "exchange": 0, "stats": 0}
    dense = dict(tot)
    sync = dense_sync = 0
    dense_count = full_open_count(program)
    for op in program.ops:
        t_live = op_traffic(program, op, open_count)
        t_dense = op_traffic(program, op, dense_count)
        if not t_dense:
            continue
        kind = op.kind if op.kind in ("input", "output", "exchange") else "stats"
        if op.kind == "gather_pixel_shuffle":  # the output, gathered before its last op
            kind = "output"
        c = in_codec if op.kind == "input" else plan_codec
        b, pairs, chans = _bytes(t_live, c)
        db, _, _ = _bytes(t_dense, c)
        tot[kind] += b
        dense[kind] += db
        if kind in ("exchange", "stats"):
            sync += 1 if b else 0
            dense_sync += 1
        layers.append(LayerComm(op.name, kind, readers.get(op.name, []), b, db, pairs, chans))
    return CommReport(
        codec=codec,
        bytes_per_sample=sum(tot.values()),
        dense_bytes_per_sample=sum(dense.values()),
        sync_points=sync,
        dense_sync_points=dense_sync,
        input_bytes=tot["input"],
        output_bytes=tot["output"],
        exchange_bytes=tot["exchange"],
        dense_exchange_bytes=dense["exchange"],
        stats_bytes=tot["stats"],
        layers=layers,
    )


def comm_report(pm: Any, codec: str = "fp32") -> CommReport:
    """:class:`CommReport` of a :class:`~disco_fl.emulation.model.PartitionedModel`'s hard masks."""
    return program_traffic(pm.program, plan_open_count(pm), codec)
