"""The structure of a model's output: one tensor, or a dict / tuple / list of tensors.

A program has one ``output`` op and every driver (emulation, shard-only execution, runtime,
training) moves one tensor to the requester. A model that returns several tensors (a
segmentation model's ``{"out": y, "aux": a}``, a ``(logits, features)`` tuple) is captured
with its output leaves flattened to ``(B, -1)`` and concatenated along dim 1 before the
``output`` op; the op's ``attrs`` record the structure and every leaf's per-sample shape
(JSON), and :func:`restore_output` rebuilds the structure from the gathered tensor. A model
returning one plain tensor records nothing (its plan is unchanged).

Structure (JSON): ``{"leaf": i}``, ``{"tuple": [...]}``, ``{"list": [...]}``,
``{"dict": [[key, ...], ...]}`` (string keys, in order; ``"odict"`` for an ``OrderedDict``, as
torchvision's segmentation models return).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch

from disco_fl.partition.program import Program
from disco_fl.partition.registry import PartitionError

_SEQUENCES = {tuple: "tuple", list: "list"}


def structure_of(spec: Any) -> dict[str, Any] | None:
    """The JSON structure of a ``torch.utils._pytree.TreeSpec`` (``ExportedProgram``'s
    ``call_spec.out_spec``); ``None`` for a single plain tensor."""
    count = [0]

    def walk(s: Any) -> dict[str, Any]:
        if s.is_leaf():
            count[0] += 1
            return {"leaf": count[0] - 1}
        subs = s.children() if hasattr(s, "children") else s.children_specs
        children = [walk(c) for c in subs]
        if s.type in _SEQUENCES:
            return {_SEQUENCES[s.type]: children}
        if s.type in (dict, OrderedDict):
            keys = list(s.context)
            if not all(isinstance(k, str) for k in keys):
                raise PartitionError(f"the model returns a dict with non-string keys {keys}")
            kind = "dict" if s.type is dict else "odict"
            return {kind: [[k, c] for k, c in zip(keys, children, strict=True)]}
        raise PartitionError(
            f"the model returns a {getattr(s.type, '__name__', s.type)}; supported outputs: "
            "a tensor, or dicts (string keys), tuples and lists of tensors"
        )

    tree = walk(spec)
    return None if "leaf" in tree else tree


def _build(tree: Any, leaves: list[torch.Tensor]) -> Any:
    if not isinstance(tree, dict) or len(tree) != 1:
        raise ValueError(f"malformed output structure {tree!r}")
    ((kind, body),) = tree.items()
    if kind == "leaf":
        if not isinstance(body, int) or not 0 <= body < len(leaves):
            raise ValueError(f"output structure names leaf {body!r} of {len(leaves)}")
        return leaves[body]
    if kind in ("tuple", "list") and isinstance(body, list):
        items = [_build(t, leaves) for t in body]
        return tuple(items) if kind == "tuple" else items
    if kind in ("dict", "odict") and isinstance(body, list):
        out: dict[str, Any] = {} if kind == "dict" else OrderedDict()
        for item in body:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                raise ValueError(f"malformed dict entry {item!r} in the output structure")
            out[item[0]] = _build(item[1], leaves)
        return out
    raise ValueError(f"malformed output structure {tree!r}")


def restore_output(program: Program, y: Any) -> Any:
    """The model's output structure from the program's output tensor ``y`` (``y`` itself for
    a model returning one tensor, or where ``y`` is not a tensor: a node without output)."""
    attrs = program.ops[-1].attrs if program.ops else {}
    tree = attrs.get("structure")
    if tree is None or not isinstance(y, torch.Tensor):
        return y
    shapes = [[int(s) for s in shape] for shape in attrs["leaves"]]
    if len(shapes) == 1:
        leaves = [y]
    else:
        sizes = [math.prod(s) for s in shapes]
        if y.dim() != 2 or y.shape[1] != sum(sizes):
            raise ValueError(f"packed output of shape {tuple(y.shape)}, expected {sum(sizes)}")
        parts = y.split(sizes, dim=1)
        leaves = [p.reshape(y.shape[0], *s) for p, s in zip(parts, shapes, strict=True)]
    return _build(tree, leaves)
