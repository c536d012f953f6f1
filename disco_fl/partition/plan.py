"""The plan: everything the nodes of a household must agree on, identified by a hash.

JSON fields: ``format``, ``program`` (ops and channel ownership), ``masks`` (for every exchange
and ordered pair ``"j->k"``, the global channel indices of ``j`` sent to ``k``), ``codec``,
``shards`` (per node: weights file, sha256, and every tensor's name and shape) and ``hash``
(sha256 of the canonical JSON of all other fields). Peers refuse a mismatched hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from disco_fl.core.codecs import get_codec
from disco_fl.partition import InferContext, PartitionError, Program, get_spec
from disco_fl.partition.head import head_op
from disco_fl.partition.registry import HasOpenChannels, infer_info

PLAN_FORMAT = "disco_fl.plan/1"


class PlanError(ValueError):
    """A plan file that is malformed, inconsistent or does not match its hash."""


@dataclass
class ShardManifest:
    file: str
    sha256: str
    tensors: dict[str, list[int]]  # "op.param" -> shape
    param_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "tensors": self.tensors,
            "param_bytes": self.param_bytes,
        }


@dataclass
class Plan:
    program: Program
    masks: dict[str, dict[str, list[int]]]  # exchange -> "j->k" -> open global channels
    codec: str = "fp32"
    shards: list[ShardManifest] = field(default_factory=list)
    # the model's interface for callers (input normalization, class names); JSON, hashed
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_nodes(self) -> int:
        return self.program.num_nodes

    def open_channels(self, exchange: str, src: int, dst: int) -> list[int]:
        return self.masks.get(exchange, {}).get(f"{src}->{dst}", [])

    def open_local(self, exchange: str, src: int, dst: int) -> list[int]:
        """:meth:`open_channels` as local indices, positions in ``src``'s slice."""
        layout = self.program.infos[exchange].layout
        assert layout is not None
        local = {c: i for i, c in enumerate(layout.indices(src))}
        return [local[c] for c in self.open_channels(exchange, src, dst)]

    def open_sources(self, exchange: str, dst: int) -> list[int]:
        """Peers that send ``dst`` at least one channel of ``exchange``, ascending."""
        return [
            j for j in range(self.num_nodes) if j != dst and self.open_channels(exchange, j, dst)
        ]

    def body(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "program": self.program.to_json(),
            "masks": self.masks,
            "codec": self.codec,
            "shards": [s.to_json() for s in self.shards],
            "meta": self.meta,
        }

    @property
    def hash(self) -> str:
        canon = json.dumps(self.body(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        d = self.body()
        d["hash"] = self.hash
        return d

    def save(self, path: str | Path) -> None:
        from disco_fl.core.files import atomic_write_bytes

        atomic_write_bytes(Path(path), json.dumps(self.to_json(), indent=1).encode())

    @staticmethod
    def from_json(d: Any) -> Plan:
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a disco_fl plan (format must be {PLAN_FORMAT!r})")
        try:
            program = Program.from_json(d["program"])
            get_codec(d["codec"])
            masks = {
                str(e): {str(p): [int(c) for c in chans] for p, chans in pairs.items()}
                for e, pairs in d["masks"].items()
            }
            shards = [
                ShardManifest(
                    str(s["file"]),
                    str(s["sha256"]),
                    {str(k): [int(x) for x in v] for k, v in s["tensors"].items()},
                    int(s["param_bytes"]),
                )
                for s in d["shards"]
            ]
            meta = d.get("meta", {})
            if not isinstance(meta, dict):
                raise TypeError(f"meta must be an object, got {type(meta).__name__}")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"malformed plan: {e}") from e
        plan = Plan(program, masks, d["codec"], shards, meta)
        validate_program(program)
        _validate_masks(plan)
        if d.get("hash") != plan.hash:
            raise PlanError("plan hash does not match its contents (edited or corrupt plan)")
        return plan

    @staticmethod
    def load(path: str | Path) -> Plan:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"cannot read plan {path}: {e}") from e
        return Plan.from_json(raw)


def validate_program(program: Program) -> None:
    """Re-derive every op's value info from its inputs and compare with the recorded one, so a
    forged or inconsistent program (wrong ownership, channel dims, op kinds) is refused."""
    ops = program.ops
    if not ops or ops[0].kind != "input" or ops[-1].kind != "output":
        raise PlanError("program must start with its input and end with its output")
    if not 0 <= program.requester < program.num_nodes:
        raise PlanError("requester node out of range")
    for op in ops:
        rec = program.infos[op.name]
        try:
            spec = get_spec(op.kind)
            ins = [program.infos[i] for i in op.inputs]
            got = infer_info(spec, op, ins, InferContext(program.num_nodes, rec.shape))
        except (PartitionError, KeyError, TypeError, ValueError, IndexError) as e:
            raise PlanError(f"invalid op {op.name!r} ({op.kind}): {e}") from None
        if spec.mixing and "layout" not in op.attrs:
            # slice sizes may be uneven (capacities): check the structure only
            lay = rec.layout
            ok = (
                rec.kind == got.kind
                and rec.cdim == got.cdim
                and lay is not None
                and rec.cdim is not None
                and lay.is_contiguous()
                and lay.num_channels == rec.shape[rec.cdim]
                and (
                    all(lay.count(k) > 0 for k in range(program.num_nodes))
                    or (set(lay.owners) == {program.requester} and _is_head(program, op.name))
                )
                and rec.batch_mult == got.batch_mult
            )
            if ok:
                try:
                    spec.check_layout(op, rec)
                except PartitionError as e:
                    raise PlanError(f"invalid op {op.name!r} ({op.kind}): {e}") from None
        else:
            ok = rec == got
        if not ok:
            raise PlanError(f"op {op.name!r}: recorded ownership does not follow from its inputs")


def _is_head(program: Program, name: str) -> bool:
    """``name`` is the program's head (the requester may own all of it: ``head="requester"``)."""
    try:
        return head_op(program) == name
    except PartitionError:
        return False


def _validate_masks(plan: Plan) -> None:
    names = {o.name for o in plan.program.exchanges}
    n = plan.num_nodes
    for e, pairs in plan.masks.items():
        if e not in names:
            raise PlanError(f"mask for unknown exchange {e!r}")
        layout = plan.program.infos[e].layout
        if layout is None:
            raise PlanError(f"exchange {e!r} has no layout")
        for key, chans in pairs.items():
            try:
                j, k = (int(v) for v in key.split("->"))
            except ValueError:
                raise PlanError(f"bad pair key {key!r}") from None
            if not (0 <= j < n and 0 <= k < n and j != k):
                raise PlanError(f"pair {key!r} out of range for {n} nodes")
            own = set(layout.indices(j))
            if any(c not in own for c in chans) or chans != sorted(set(chans)):
                raise PlanError(
                    f"mask {e!r} {key}: channels must be sorted, unique and owned by {j}"
                )
    if plan.shards and len(plan.shards) != n:
        raise PlanError(f"plan lists {len(plan.shards)} shards for {n} nodes")


def plan_of(pm: HasOpenChannels, codec: str = "fp32", meta: dict[str, Any] | None = None) -> Plan:
    """The :class:`Plan` (program, hard masks, codec, ``meta``) of a partitioned model
    (anything with ``program`` and ``open_channels``), without shard manifests: what the nodes
    of a household agree on before training, and what :func:`~disco_fl.emulation.export.export_plan`
    completes with the shards."""
    n = pm.program.num_nodes
    masks = {
        e.name: {
            f"{j}->{k}": pm.open_channels(e.name, j, k)
            for j in range(n)
            for k in range(n)
            if j != k
        }
        for e in pm.program.exchanges
    }
    return Plan(pm.program, masks, codec, meta=dict(meta or {}))
