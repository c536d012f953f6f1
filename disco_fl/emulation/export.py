"""Shard export and loading; shard-only execution.

``export(pm, path)`` writes ``plan.json`` and ``node_<k>.pt`` per node. A node file holds only
that node's *compact* tensors: weights that read closed channels are dropped, gates are gone.
:func:`load_shard` rebuilds one node from the plan and its file alone, checking the plan hash,
the file's sha256, and every tensor name and shape against the plan. Files are written with
:func:`disco_fl.core.files.atomic_write_bytes` (temporary file, fsync, rename, fsync of the folder),
so a crash never leaves a half-written plan or shard.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from disco_fl.core.codecs import Codec
from disco_fl.core.files import atomic_write_bytes
from disco_fl.core.pixels import PIXEL_DTYPE, model_input
from disco_fl.node import run_lockstep
from disco_fl.node.shard import NodeShard
from disco_fl.partition import Op, Program, get_spec, plan_open_count
from disco_fl.partition.ops_comm import gathered_columns
from disco_fl.partition.outputs import restore_output
from disco_fl.partition.plan import Plan, PlanError, ShardManifest, plan_of


def _compact_state(pm: Any, plan: Plan, k: int) -> dict[str, torch.Tensor]:
    """Node ``k``'s tensors with the columns of closed channels dropped."""
    program: Program = pm.program
    out: dict[str, torch.Tensor] = {}
    shard = pm.shards[k]
    for op in program.ops:
        if op.name not in shard.ops:
            continue
        tensors = shard.ops[op.name].tensors()
        x = program.infos[op.inputs[0]] if op.inputs else None
        for pname, t in tensors.items():
            t = t.detach()
            if (
                pname == "weight"
                and x is not None
                and x.kind == "gathered"
                and get_spec(op.kind).mixing
            ):
                t = t.index_select(1, torch.tensor(compact_columns(plan, op, k), dtype=torch.long))
            out[f"{op.name}.{pname}"] = t.contiguous().clone()
    for missing, nodes in getattr(pm, "degraded_statistics", {}).items():
        for op_name, stats in nodes.get(k, {}).items():
            for sname, t in stats.items():
                out[f"{degraded_key(missing)}{op_name}.{sname}"] = t.detach().contiguous().clone()
    return out


DEGRADED = "@missing="  # shard tensor keys "@missing=1+3/<op>.<statistic>"


def degraded_key(missing: Collection[int]) -> str:
    """The prefix of a shard's BatchNorm statistics for the nodes ``missing``
    (:func:`~disco_fl.emulation.statistics.calibrate_degraded`)."""
    return DEGRADED + "+".join(str(k) for k in sorted(missing)) + "/"


def parse_degraded_key(key: str, num_nodes: int) -> tuple[frozenset[int], str]:
    """``(missing nodes, "<op>.<statistic>")`` of a degraded-statistics key."""
    label, sep, rest = key[len(DEGRADED) :].partition("/")
    try:
        missing = frozenset(int(v) for v in label.split("+"))
    except ValueError:
        missing = frozenset()
    if not sep or not missing or not all(0 <= k < num_nodes for k in missing):
        raise PlanError(f"malformed degraded-statistics key {key!r}")
    return missing, rest


def compact_columns(plan: Plan, op: Op, k: int) -> list[int]:
    """Positions, in the full gathered order, of the columns node ``k`` keeps for ``op``."""
    exch = op.inputs[0]
    layout = plan.program.infos[exch].layout
    assert layout is not None
    full = gathered_columns(layout, k)
    pos = {c: i for i, c in enumerate(full)}
    keep = gathered_columns(layout, k, lambda j: plan.open_channels(exch, j, k))
    return [pos[c] for c in keep]


def model_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's state (every tensor's name, dtype, shape and bytes, by name).

    Recorded as ``meta["model_sha256"]`` of an exported plan (``disco-fl train`` does, for
    the dense model its plan was fine-tuned from) so that plans of the same model can be
    recognized: a plan ladder (:mod:`disco_fl.runtime.serving.link_plans`) refuses plans
    of different models.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


@dataclass
class ExportResult:
    plan: Plan
    path: Path
    param_bytes_per_node: list[int]
    whole_model_param_bytes: int


def export(
    pm: Any, path: str | Path, codec: str = "fp32", meta: dict[str, Any] | None = None
) -> ExportResult:
    """Write ``plan.json`` and ``node_<k>.pt`` for every node under ``path``.

    ``meta`` (JSON-serializable, part of the plan's hash) describes the model's interface for
    callers, e.g. ``{"input": {"mean": [0.1307], "std": [0.3081]}, "classes": [...]}``
    (read by ``disco-fl infer`` to preprocess images).
    """
    path = Path(path)
    plan = plan_of(pm, codec, meta)
    states = [_compact_state(pm, plan, k) for k in range(pm.num_nodes)]
    for k, state in enumerate(states):
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        name = f"node_{k}.pt"
        atomic_write_bytes(path / name, data)
        plan.shards.append(
            ShardManifest(
                name,
                hashlib.sha256(data).hexdigest(),
                {key: list(t.shape) for key, t in state.items()},
                sum(t.numel() * t.element_size() for t in state.values()),
            )
        )
    plan.save(path / "plan.json")
    whole = sum(
        p.numel() * p.element_size()
        for s in pm.shards
        for p in list(s.ops.parameters()) + list(s.ops.buffers())
    )
    # the whole model = the union of the dense slices (gates excluded); replicated tensors once
    return ExportResult(plan, path, [s.param_bytes for s in plan.shards], whole)


class ExportedShard:
    """One node rebuilt from the plan and its own weights file (no other node's data): the
    :class:`~disco_fl.node.shard.NodeShard` of the plan's compact tensors (``shard``), and
    the plan's hard masks as the node context of inference."""

    def __init__(self, plan: Plan, k: int, state: Mapping[str, torch.Tensor]) -> None:
        self.plan = plan
        self.program = plan.program
        self.index = k
        self.num_nodes = plan.num_nodes
        self.training = False
        ops = {op.name: op for op in self.program.ops}
        tensors: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        degraded: dict[frozenset[int], dict[str, dict[str, torch.Tensor]]] = {}
        for key, t in state.items():
            if key.startswith(DEGRADED):
                missing, rest = parse_degraded_key(key, self.num_nodes)
                name, _, tname = rest.rpartition(".")
                if name not in ops or ops[name].kind != "batch_norm" or k in missing:
                    raise PlanError(f"shard {k}: {key!r} is no statistic of a BatchNorm op")
                degraded.setdefault(missing, {}).setdefault(name, {})[tname] = t
                continue
            name, _, tname = key.rpartition(".")
            if name not in ops:
                raise PlanError(f"shard {k}: {key!r} is no tensor of an op of the plan")
            params, buffers = tensors.setdefault(name, ({}, {}))
            is_buffer = tname in get_spec(ops[name].kind).buffer_names(ops[name])
            (buffers if is_buffer else params)[tname] = t
        self.shard = NodeShard(self.program, k, tensors=tensors).requires_grad_(False)
        self._state = {name: self.shard.op_tensors(name) for name in self.shard.ops}
        for missing, by_op in degraded.items():
            for name, stats in by_op.items():
                own = self._state.get(name, {})
                if {n: list(t.shape) for n, t in stats.items()} != {
                    n: list(own[n].shape) for n in stats if n in own
                }:
                    raise PlanError(f"shard {k}: statistics of {name} for missing "
                                    f"{sorted(missing)} do not match its own")  # fmt: skip
        self._degraded = degraded
        self._contexts: dict[frozenset[int], ExportedShard] = {}
        self._send: dict[str, dict[int, torch.Tensor]] = {}
        self._sources: dict[str, list[int]] = {}
        for e in self.program.exchanges:
            self._send[e.name] = {
                d: torch.tensor(plan.open_local(e.name, k, d), dtype=torch.long)
                for d in range(self.num_nodes)
                if d != k and plan.open_channels(e.name, k, d)
            }
            self._sources[e.name] = plan.open_sources(e.name, k)

    def state(self, op: Op) -> Mapping[str, torch.Tensor]:
        return self._state.get(op.name, {})

    @property
    def degraded_sets(self) -> list[frozenset[int]]:
        """The sets of missing nodes this shard holds BatchNorm statistics for."""
        return sorted(self._degraded, key=lambda s: (len(s), sorted(s)))

    def context(self, missing: Collection[int]) -> ExportedShard:
        """This node as it computes a session that starts without the nodes ``missing``:
        itself, or, when the shard holds statistics for exactly that set
        (:func:`~disco_fl.emulation.statistics.calibrate_degraded`), a view of it whose
        BatchNorm ops normalize with them."""
        key = frozenset(missing)
        stats = self._degraded.get(key)
        if not stats:
            return self
        view = self._contexts.get(key)
        if view is None:
            view = copy.copy(self)
            view._state = {n: {**st, **stats.get(n, {})} for n, st in self._state.items()}
            self._contexts[key] = view
        return view

    def send_selection(
        self, op: Op, dest: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        idx = self._send[op.name].get(dest)
        return None if idx is None else (idx, None)

    def sources(self, op: Op) -> list[int]:
        return self._sources[op.name]

    def shared_generator(self, op: Op) -> None:
        return None  # inference only (training False): stochastic depth is the identity

    @property
    def param_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self._state.values() for t in s.values())


def load_shard(
    plan_path: str | Path,
    k: int,
    shard_path: str | Path | None = None,
    *,
    plan: Plan | None = None,
) -> ExportedShard:
    """Rebuild node ``k`` from ``plan.json`` and its own file, checking everything strictly.

    ``plan``: the plan already loaded from ``plan_path`` (:meth:`Plan.load`), to load several
    shards of one plan in one process without parsing and validating it again."""
    plan_path = Path(plan_path)
    plan = Plan.load(plan_path) if plan is None else plan
    if not 0 <= k < plan.num_nodes:
        raise PlanError(f"node index {k} out of range for a {plan.num_nodes}-node plan")
    if len(plan.shards) != plan.num_nodes:
        raise PlanError("plan has no shard manifest")
    man = plan.shards[k]
    shard_path = Path(shard_path) if shard_path else plan_path.parent / man.file
    try:
        data = shard_path.read_bytes()
    except OSError as e:
        raise PlanError(f"cannot read shard file {shard_path}: {e}") from e
    if hashlib.sha256(data).hexdigest() != man.sha256:
        raise PlanError(f"shard file {shard_path} does not match the plan (sha256 differs)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt files
        raise PlanError(f"corrupt shard file {shard_path}: {e}") from e
    if not isinstance(state, dict):
        raise PlanError(f"shard file {shard_path} does not hold a tensor dict")
    missing = sorted(set(man.tensors) - set(state))
    unexpected = sorted(set(state) - set(man.tensors))
    wrong = [
        f"{key}: expected {man.tensors[key]}, got {list(t.shape)}"
        for key, t in state.items()
        if key in man.tensors and list(t.shape) != man.tensors[key]
    ]
    if missing or unexpected or wrong:
        raise PlanError(
            f"shard {shard_path} does not match the plan: missing {missing}, unexpected "
            f"{unexpected}, shape mismatches {wrong}"
        )
    return ExportedShard(plan, k, state)


def run_shards(
    nodes: Sequence[ExportedShard],
    x: torch.Tensor,
    codec: Codec | str | None = None,
    *,
    overlap: bool = True,
    missing: Collection[int] = (),
    meter: Callable[[int], contextlib.AbstractContextManager[Any]] | None = None,
) -> Any:
    """Shard-only execution of all nodes in this process (in-process exchange), with the
    arithmetic of the network runtime (``overlap`` as :func:`~disco_fl.runtime.inference.run_node`:
    equal to it bit for bit); returns what the model returns (a tensor, or a dict / tuple /
    list of tensors). ``missing``: nodes that do not run (their channels closed, as the
    runtime's degraded mode, each node normalizing with its statistics for that set when its
    shard has them: :meth:`ExportedShard.context`); ``nodes`` may hold anything at their
    places. ``x`` may be uint8 image pixels, as a request may carry them: normalized with the
    plan's input normalization, and sent to the other nodes exactly, whatever the codec
    (:func:`~disco_fl.core.pixels.model_input`). ``meter``: as
    :func:`~disco_fl.node.lockstep.run_lockstep` (per-node timing)."""
    if not nodes:
        raise ValueError("no nodes")
    present = [n for k, n in enumerate(nodes) if k not in set(missing)]
    plan = present[0].plan
    if any(n.plan.hash != plan.hash for n in present):
        raise PlanError("nodes were loaded from different plans")
    gone = set(missing)
    contexts = [n.context(gone) if gone and k not in gone else n for k, n in enumerate(nodes)]
    pixels = x.dtype == PIXEL_DTYPE
    if pixels:
        x = model_input(x, plan.program.infos[plan.program.ops[0].name].shape, plan.meta)
    with torch.no_grad():
        y = run_lockstep(
            plan.program,
            contexts,
            x,
            codec or plan.codec,
            open_count=plan_open_count(plan),
            overlap=overlap,
            missing=missing,
            meter=meter,
            exact_input=pixels,
        )
    return restore_output(plan.program, y)
