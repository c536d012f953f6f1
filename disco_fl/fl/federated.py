"""What the Flower apps (``disco_fl/fl/server/``, ``clients/``) and the demo share.

- :class:`ModelSpec`: how every party rebuilds the same partitioned model (the server and each
  node partition the same registered model with the same example shape, so the program is
  identical everywhere; the plan sent by the server is checked against it).
- shard <-> ``ArrayRecord`` conversion (:func:`shard_arrays`, :func:`shard_from_record`; packed
  into two arrays, :func:`pack_state`) and the
  server's global record of all shards (keys ``"<k>/<shard key>"``).
- the budget schedule (:func:`round_budget`) and the round's gate mode (:func:`round_mode`).
- local data of a node (:func:`node_data`, from :mod:`disco_fl.fl.local_data`): a ``.npz``
  file or a partition of the private part of the built-in set (:func:`builtin_split`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from disco_fl.data import SEGMENTATION_CLASSES
from disco_fl.emulation.model import NodeShard, PartitionedModel, partition
from disco_fl.fl.local_data import (  # noqa: F401 (re-exported: their home before tasks)
    BUILTIN_FRACTIONS,
    BUILTIN_SEED,
    NodeData,
    builtin_split,
    builtin_tensors,
    node_data,
    parse_builtin,
)
from disco_fl.models import MODEL_TASKS, MODELS, build_model
from disco_fl.models import load_checkpoint_strict as load_model_checkpoint
from disco_fl.models.user import call_with_standard_args, is_import_path, load_model
from disco_fl.partition import Program
from disco_fl.tasks import get_task

#: The built-in model of each task, and the task's sample size and classes where they differ
#: from classification's (``ModelSpec.for_task``): segmentation has 11 classes (background +
#: 10 digits), super-resolution x2 takes the 14x14 image.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classification": {"name": "resnet_narrow"},
    "segmentation": {"name": "seg_small", "num_classes": SEGMENTATION_CLASSES},
    "super_resolution": {"name": "espcn", "image_size": 14},
}


@dataclass(frozen=True)
class ModelSpec:
    """The model every party partitions.

    Attributes
    ----------
    name : str
        A key of :data:`disco_fl.models.MODELS` (default ``"resnet_narrow"``) or a user's
        model as an import path ``"package.module:function"`` (a callable returning an
        ``nn.Module``, called with those of ``num_classes``, ``in_channels``, ``norm`` its
        signature names; see :mod:`disco_fl.models.user`). Only the process that builds the
        model imports it (the ServerApp's, the demo's): a node receives the partitioned
        program in the plan and never builds the model.
    num_nodes : int
        Nodes per household N; default 2.
    num_classes : int
        Default 10.
    in_channels : int
        Default 1.
    image_size : int
        Height = width of the input; default 28.
    norm : str
        ``"batch"`` (default) or ``"group"`` (required with differential privacy).
    input_shape : tuple of int or None
        The shape of one sample, e.g. ``(3, 32, 32)`` or ``(16,)``; default None:
        ``(in_channels, image_size, image_size)``. It fixes the example input the model is
        captured with (and the per-sample traffic), so it must be what the nodes' data holds.
    task : str
        ``"classification"`` (default), ``"segmentation"`` or ``"super_resolution"``
        (:mod:`disco_fl.tasks`): the nodes' loss, metric and built-in data. A built-in model
        must be one built for the task (:data:`disco_fl.models.MODEL_TASKS`);
        :meth:`for_task` gives the task's built-in model and sizes.
    """

    name: str = "resnet_narrow"
    num_nodes: int = 2
    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 28
    norm: str = "batch"
    input_shape: tuple[int, ...] | None = None
    task: str = "classification"

    def __post_init__(self) -> None:
        get_task(self.task)  # a known task, or a ValueError naming them
        if not self.is_user_model and self.name in MODELS:
            built_for = MODEL_TASKS.get(self.name, "classification")
            if built_for != self.task:
                raise ValueError(
                    f"model {self.name!r} is built for {built_for}, not {self.task}; the "
                    f"built-in model of {self.task} is {TASK_DEFAULTS[self.task]['name']!r} "
                    "(or give your own, 'package.module:function')"
                )
        if self.input_shape is not None:
            shape = tuple(int(d) for d in self.input_shape)
            if not shape or any(d < 1 for d in shape):
                raise ValueError(f"input_shape must be positive sizes, got {self.input_shape}")
            object.__setattr__(self, "input_shape", shape)

    @staticmethod
    def for_task(task: str = "classification", **kw: Any) -> ModelSpec:
        """The spec of ``task``'s built-in model and sizes (:data:`TASK_DEFAULTS`), ``kw``
        overriding them."""
        get_task(task)
        return ModelSpec(**{**TASK_DEFAULTS[task], "task": task, **kw})

    @staticmethod
    def from_config(cfg: Mapping[str, Any]) -> ModelSpec:
        """From a run config / ConfigRecord (keys ``model``, ``nodes``, ``num-classes``,
        ``in-channels``, ``image-size``, ``norm``, ``input-shape`` (``"3,32,32"``; empty:
        none), ``task``); missing keys take the defaults."""
        task = str(cfg.get("task", "classification"))
        get_task(task)
        d = ModelSpec(**TASK_DEFAULTS[task], task=task)
        return ModelSpec(
            name=str(cfg.get("model") or d.name),  # empty: the task's built-in
            num_nodes=int(cfg.get("nodes", d.num_nodes)),
            num_classes=int(cfg.get("num-classes", d.num_classes)),
            in_channels=int(cfg.get("in-channels", d.in_channels)),
            image_size=int(cfg.get("image-size", d.image_size)),
            norm=str(cfg.get("norm", d.norm)),
            input_shape=parse_input_shape(cfg.get("input-shape", "")),
            task=task,
        )

    def to_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.name,
            "nodes": self.num_nodes,
            "num-classes": self.num_classes,
            "in-channels": self.in_channels,
            "image-size": self.image_size,
            "norm": self.norm,
        }
        if self.input_shape is not None:
            out["input-shape"] = ",".join(str(d) for d in self.input_shape)
        if self.task != "classification":
            out["task"] = self.task
        return out

    def settings(self) -> dict[str, Any]:
        """What a run checkpoint records of the spec (``input_shape`` only when set, so that
        checkpoints of earlier versions still resume)."""
        out = asdict(self)
        if self.input_shape is None:
            del out["input_shape"]
        else:
            out["input_shape"] = list(self.input_shape)
        if self.task == "classification":
            del out["task"]
        return out

    @property
    def is_user_model(self) -> bool:
        """Whether :attr:`name` is an import path (a user's model), not a built-in."""
        return is_import_path(self.name)

    @property
    def capture(self) -> Literal["fx", "auto"]:
        """How the model is captured: ``"fx"`` for the built-in classifiers (as always),
        ``"auto"`` (fx, falling back to ``torch.export``) for a user's model and the built-in
        dense-prediction models (their upsampling and pixel shuffle need ``torch.export``)."""
        return "auto" if self.is_user_model or self.name in MODEL_TASKS else "fx"

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one input sample."""
        if self.input_shape is not None:
            return self.input_shape
        return (self.in_channels, self.image_size, self.image_size)

    def build_dense(self, seed: int = 0, checkpoint: str | Path | None = None) -> torch.nn.Module:
        """The dense model (seeded initialization; ``checkpoint``: a state dict loaded
        strictly, ``weights_only=True``). A user's model is imported here
        (:func:`disco_fl.models.user.load_model`)."""
        torch.manual_seed(seed)
        kw: dict[str, Any] = {"num_classes": self.num_classes, "in_channels": self.in_channels}
        if self.name != "vit_tiny_mnist":
            kw["norm"] = self.norm
        if self.is_user_model:
            return load_model(self.name, checkpoint=checkpoint, **kw)
        if self.name in MODEL_TASKS:  # seg_small takes no norm, espcn no num_classes either
            kw = call_with_standard_args(MODELS[self.name], kw)
        model = build_model(self.name, **kw)
        if checkpoint:
            load_model_checkpoint(model, checkpoint)
        return model

    def example(self) -> torch.Tensor:
        return torch.zeros(2, *self.sample_shape)

    def partition(
        self, dense: torch.nn.Module | None = None, capacities: Sequence[float] | None = None
    ) -> PartitionedModel:
        """The partitioned model (of ``dense``, default a freshly built one; slices
        proportional to ``capacities``, default equal): the server's (and the demo's) view. A
        node never calls this: the ClientApp rebuilds only its own shard from the round's plan
        and its record (:func:`shard_from_record`)."""
        model = dense if dense is not None else self.build_dense()
        return partition(
            model, self.num_nodes, self.example(), capacities=capacities, capture=self.capture
        )


def parse_input_shape(value: Any) -> tuple[int, ...] | None:
    """``"3,32,32"`` (or a list of ints) -> ``(3, 32, 32)``; ``""`` / None -> None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        if isinstance(value, str):
            shape = tuple(int(d) for d in value.replace("x", ",").split(",") if d.strip())
        else:
            shape = tuple(int(d) for d in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"input-shape {value!r}: expected sizes like '3,32,32'") from e
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input-shape {value!r}: expected positive sizes like '3,32,32'")
    return shape


# ---- shards as records -------------------------------------------------------------------


# tensors of a shard travel packed into two arrays (a JSON index and one byte buffer): Flower
# stores and moves every array of an ArrayRecord as its own object (one HTTP request and one
# database row per hop), which made ~100 small tensors per node cost seconds per round
PACK_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in PACK_DTYPES.items()}


def pack_state(state: Mapping[str, torch.Tensor]) -> Any:
    """``state`` as an ``ArrayRecord`` of two arrays: ``index`` (UTF-8 JSON: key, dtype,
    shape, byte offset of each tensor) and ``data`` (the tensors' bytes, concatenated)."""
    from flwr.app import Array, ArrayRecord

    index: list[list[Any]] = []
    chunks: list[bytes] = []
    offset = 0
    for key, v in state.items():
        t = v.detach().cpu().contiguous()
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{key}: dtype {t.dtype} cannot be packed")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        index.append([key, _DTYPE_NAMES[t.dtype], list(t.shape), offset])
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(index, separators=(",", ":")).encode()
    return ArrayRecord(
        {
            "index": Array(np.frombuffer(head, dtype=np.uint8).copy()),
            "data": Array(np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()),
        }
    )


def _bytes_view(array: Any) -> np.ndarray:
    """The bytes of a 1-D uint8 Flower ``Array`` as a read-only view of its serialized data
    (``Array.numpy()`` copies them: a shard's size more at the peak); other arrays go
    through ``numpy()``."""
    data = getattr(array, "data", None)
    if getattr(array, "stype", None) == "numpy.ndarray" and isinstance(data, bytes):
        f = io.BytesIO(data)
        try:
            fmt = np.lib.format
            major, _ = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except ValueError:
            return array.numpy()
        if dtype == np.uint8 and len(shape) == 1 and not fortran:
            return np.frombuffer(data, dtype=np.uint8, count=shape[0], offset=f.tell())
    return array.numpy()


def unpack_state(record: Any) -> dict[str, torch.Tensor]:
    """The tensors of a record made by :func:`pack_state`; every field is checked (known
    dtype, non-negative shape, offsets contiguous and within the buffer)."""
    try:
        head = bytes(record["index"].numpy().tobytes())
        data = _bytes_view(record["data"])
        index = json.loads(head.decode())
    except (KeyError, ValueError, UnicodeDecodeError, TypeError, AttributeError) as e:
        raise ValueError(f"not a packed shard record: {e}") from e
    if set(record.keys()) != {"index", "data"} or not isinstance(index, list):
        raise ValueError(f"not a packed shard record (arrays {sorted(record.keys())})")
    with warnings.catch_warnings():  # a read-only view: only read here, every tensor cloned
        warnings.simplefilter("ignore", UserWarning)
        buf = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8).reshape(-1))
    out: dict[str, torch.Tensor] = {}
    pos = 0
    for entry in index:
        if not (isinstance(entry, list) and len(entry) == 4):
            raise ValueError(f"packed record: bad index entry {entry!r}")
        key, dname, shape, offset = entry
        if not isinstance(key, str) or key in out or dname not in PACK_DTYPES:
            raise ValueError(f"packed record: bad key or dtype in {entry!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)) or (
            offset != pos
        ):
            raise ValueError(f"packed record: bad shape or offset in {entry!r}")
        dtype = PACK_DTYPES[dname]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if pos + nbytes > buf.numel():
            raise ValueError(f"packed record: {key} runs past the end of the data")
        out[key] = buf[pos : pos + nbytes].clone().view(dtype).reshape(shape)
        pos += nbytes
    if pos != buf.numel():
        raise ValueError(f"packed record: {buf.numel() - pos} trailing bytes")
    return out


def shard_arrays(shard: NodeShard) -> Any:
    """Node ``k``'s shard (weights, buffers, gate logits, hard masks) as an ``ArrayRecord``
    (packed, :func:`pack_state`)."""
    return pack_state(shard.state_dict())


def shard_from_record(program: Program, k: int, record: Any) -> NodeShard:
    """Node ``k``'s shard rebuilt from the program (of the round's plan) and the
    ``ArrayRecord`` made by :func:`shard_arrays`: no model is built or partitioned, no other
    node's tensor is held, nothing is unpickled. ``ValueError`` when the record does not fit."""
    return NodeShard.from_state_dict(program, k, unpack_state(record))


def global_state(pm: PartitionedModel) -> dict[str, torch.Tensor]:
    """Every shard's state, keys ``"<k>/<shard key>"``."""
    return {
        f"{k}/{key}": v.detach().clone()
        for k in range(pm.num_nodes)
        for key, v in pm.shard(k).state_dict().items()
    }


def split_global_state(state: Mapping[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, v in state.items():
        k, _, rest = key.partition("/")
        out[int(k)][rest] = v
    return out


# ---- schedule ----------------------------------------------------------------------------


def round_budget(server_round: int, num_rounds: int, budget: float, finetune_rounds: int) -> float:
    """Target fraction of dense exchange bytes for round ``server_round`` (1-based).

    Geometric from 1 to ``budget`` over the gate rounds: round ``r`` of ``G = num_rounds -
    finetune_rounds`` gate rounds gets ``budget ** (r / G)``; the fine-tuning rounds (the last
    ``finetune_rounds``) and every round when ``G <= 0`` get ``budget``.

    :class:`~disco_fl.fl.server.strategy.DiscoStrategy` uses it so: the gate penalty is
    ``lam / target``, with ``lam`` (start ``init_penalty``) following dual ascent once per
    round, ``lam += dual_lr * (E / target - 1)`` (``E``: expected exchange fraction of the
    aggregated gates). Before every round and every evaluation the hard masks are set to the
    highest gate logits that fit the round's target
    (:func:`~disco_fl.emulation.budget.calibrate_masks`); the last ``finetune_rounds`` (and
    every round under DP) train the weights with the masks fixed.
    """
    gate_rounds = num_rounds - finetune_rounds
    if gate_rounds <= 0 or server_round > gate_rounds:
        return float(budget)
    return float(budget ** (server_round / gate_rounds))


def round_mode(server_round: int, num_rounds: int, finetune_rounds: int, dp: bool) -> str:
    """``"stochastic"`` (gates train) in the gate rounds, ``"hard"`` (masks fixed) in the last
    ``finetune_rounds`` and always under differential privacy (DP trains weights only)."""
    if dp or server_round > num_rounds - finetune_rounds:
        return "hard"
    return "stochastic"


def derive_seed(*parts: object) -> int:
    key = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(key[:8], "little") >> 1


# ---- privacy ---------------------------------------------------------------------------


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """epsilon of an Opacus RDP accountant with ``history`` ((sigma, q, steps) entries)."""
    if not history or all(h[2] == 0 for h in history):
        return 0.0
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [h for h in history if h[2] > 0]
    eps = float(acc.get_epsilon(delta=delta))
    return eps if math.isfinite(eps) else float("inf")


# ---- typed access to Flower records ------------------------------------------------------


def rec_int(rec: Mapping[str, Any], key: str, default: int | None = None) -> int:
    """``rec[key]`` as an int (a clear error when absent or not a number)."""
    return int(_number(rec, key, default))


def rec_float(rec: Mapping[str, Any], key: str, default: float | None = None) -> float:
    return float(_number(rec, key, default))


def _number(rec: Mapping[str, Any], key: str, default: float | None) -> float:
    v = rec.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"record entry {key!r} must be a number, got {v!r}")
    return v


def rec_list(rec: Mapping[str, Any], key: str) -> list[Any]:
    v = rec.get(key)
    if not isinstance(v, list):
        raise ValueError(f"record entry {key!r} must be a list, got {v!r}")
    return list(v)
