"""The partitioned program: a flat list of ops in the registry's vocabulary.

A :class:`Program` is what every node of a household executes (each on its own slice). It is
independent of ``torch.fx`` (which only *captures* it) and serializes to JSON, so an exported
plan carries the program and a node needs nothing but the plan and its own weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from disco_fl.core.layout import Layout

ValueKind = Literal["replicated", "sharded", "gathered"]


@dataclass(frozen=True)
class TensorInfo:
    """What a value looks like across the household.

    kind
        ``replicated``: every node holds the whole tensor (the model input and what is computed
        from it alone). ``sharded``: node ``k`` holds the channels ``layout.indices(k)`` along
        ``cdim``. ``gathered``: the input of a mixing layer on node ``k``: its own channels
        followed by those received from each peer (only mixing ops consume it).
    shape
        Global shape measured on the example input (batch and token counts are free at run
        time; channel counts are fixed).
    batch_mult
        Rows of dim 0 per sample: dim 0 holds ``batch * batch_mult`` rows, sample-major (row
        ``r`` belongs to sample ``r // batch_mult``). 1 for every value whose dim 0 is the
        batch; a window partition (Swin: ``(B, H, W, C) -> (B * nW, ws * ws, C)``) merges the
        windows of each sample into dim 0 and sets it to ``nW``.
    """

    kind: ValueKind
    shape: tuple[int, ...]
    cdim: int | None = None  # channel dimension (non-negative) for sharded / gathered
    layout: Layout | None = None
    batch_mult: int = 1

    @property
    def elements_per_channel(self) -> int:
        """Elements of one channel of one sample (product of dims other than batch and cdim,
        times the rows per sample)."""
        n = self.batch_mult
        for d, s in enumerate(self.shape):
            if d not in (0, self.cdim):
                n *= s
        return n

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "shape": list(self.shape), "cdim": self.cdim}
        if self.layout is not None:
            out["layout"] = self.layout.to_json()
        if self.batch_mult != 1:
            out["batch_mult"] = self.batch_mult
        return out

    @staticmethod
    def from_json(d: dict[str, Any], num_nodes: int) -> TensorInfo:
        kind = d.get("kind")
        if kind not in ("replicated", "sharded", "gathered"):
            raise ValueError(f"invalid value kind {kind!r}")
        layout = Layout.from_json(d["layout"], num_nodes) if "layout" in d else None
        cdim = d.get("cdim")
        mult = int(d.get("batch_mult", 1))
        if mult < 1:
            raise ValueError(f"invalid batch_mult {mult}")
        return TensorInfo(
            kind,
            tuple(int(s) for s in d["shape"]),
            None if cdim is None else int(cdim),
            layout,
            mult,
        )


@dataclass
class Op:
    """One step of the program.

    ``inputs`` name earlier ops; ``attrs`` are JSON-serializable constants; ``module`` is the
    qualified name of the original ``nn.Module`` whose parameters the op slices (if any).
    """

    name: str
    kind: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    module: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "inputs": list(self.inputs),
            "attrs": self.attrs,
            "module": self.module,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> Op:
        return Op(
            str(d["name"]),
            str(d["kind"]),
            [str(i) for i in d["inputs"]],
            dict(d["attrs"]),
            d.get("module"),
        )


@dataclass
class Program:
    """Ops in execution order, the value info of every op, and the number of nodes."""

    num_nodes: int
    ops: list[Op]
    infos: dict[str, TensorInfo]
    requester: int = 0  # node that holds the input and gathers the output

    def op(self, name: str) -> Op:
        for o in self.ops:
            if o.name == name:
                return o
        raise KeyError(name)

    @property
    def exchanges(self) -> list[Op]:
        return [o for o in self.ops if o.kind == "exchange"]

    def to_json(self) -> dict[str, Any]:
        return {
            "num_nodes": self.num_nodes,
            "requester": self.requester,
            "ops": [o.to_json() for o in self.ops],
            "infos": {k: v.to_json() for k, v in self.infos.items()},
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> Program:
        n = int(d["num_nodes"])
        if n < 1:
            raise ValueError("num_nodes must be >= 1")
        ops = [Op.from_json(o) for o in d["ops"]]
        infos = {k: TensorInfo.from_json(v, n) for k, v in d["infos"].items()}
        names = set()
        for o in ops:
            for i in o.inputs:
                if i not in names:
                    raise ValueError(f"op {o.name!r} reads {i!r} before it is defined")
            if o.name not in infos:
                raise ValueError(f"op {o.name!r} has no value info")
            names.add(o.name)
        return Program(n, ops, infos, int(d.get("requester", 0)))
