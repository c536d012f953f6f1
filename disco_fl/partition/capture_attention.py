"""fx capture rules for attention: ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` /
``nn.TransformerEncoder`` and hand-written qkv attention, emitted as the ``attention`` op of
:mod:`disco_fl.partition.ops_attention` plus ordinary ops. Registered at import (through
:mod:`disco_fl.partition`).

Captured forms:

- ``nn.MultiheadAttention`` called as self-attention (query, key and value the same tensor),
  without masks, ``bias_k``/``bias_v`` or ``add_zero_attn``; ``batch_first`` True or False.
- ``nn.TransformerEncoderLayer`` (decomposed into LayerNorm, attention, exchange + linear,
  dropout, residual adds and the MLP; ``norm_first`` True/False, activation relu/gelu,
  ``batch_first`` True/False) and ``nn.TransformerEncoder`` (its layers, then its norm). The
  ops compute the documented (slow-path) math; PyTorch's eval-mode fast path computes the same
  function to float rounding.
- hand-written (timm-style) attention: any module with ``nn.Linear`` attributes ``qkv``
  (``3 * D`` outputs) and ``proj`` and an int ``num_heads``, taking one ``(B, T, D)`` tensor.
  It is traced as a leaf and *verified* at capture: its own forward on the example input must
  equal ``proj(attention(qkv(x)))`` (q, k, v = the three D-slices of ``qkv``'s output, heads
  contiguous in each, ``softmax(q k^T * scale) v`` with ``scale = module.scale`` or
  ``head_dim ** -0.5``) within 1e-5, or a :class:`PartitionError` names the module. Its
  ``attn_drop`` / ``proj_drop`` dropout modules are honoured.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from disco_fl.partition.capture import Capturer, capture_leaf, capture_module
from disco_fl.partition.ops_attention import attend
from disco_fl.partition.registry import PartitionError

VERIFY_TOLERANCE = 1e-5


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _refuse_if_set(cap: Capturer, node: fx.Node, where: str, **args: Any) -> None:
    for name, value in args.items():
        v = cap.const(value) if not cap.is_tensor(value) else value
        if v is not None and v is not False:
            raise PartitionError(
                f"{where}: argument {name} is not supported (attention masks cannot be "
                "partitioned yet)"
            )


def emit_self_attention(
    cap: Capturer,
    node: fx.Node,
    x: str,
    *,
    module: str,
    heads: int,
    embed_dim: int,
    seq_first: bool,
    weight: str,
    bias: str | None,
    out_proj: str,
    scale: float | None = None,
    dropout: float = 0.0,
    prefix: str | None = None,
) -> str:
    """Emit ``attention`` (heads split across nodes) then the output projection (an exchange +
    ``linear`` reading ``out_proj``); returns the projection's value (sharded along D)."""
    shape = cap.info(x).shape
    where = f"module {module!r}"
    if len(shape) != 3:
        raise PartitionError(f"{where}: attention needs a 3-d input, got shape {shape}")
    if shape[-1] != embed_dim:
        raise PartitionError(f"{where}: input has {shape[-1]} features, expected {embed_dim}")
    if embed_dim % heads:
        raise PartitionError(f"{where}: embed dim {embed_dim} not divisible by {heads} heads")
    prefix = prefix or node.name
    attrs = {
        "num_heads": heads,
        "head_dim": embed_dim // heads,
        "seq_first": seq_first,
        "scale": scale,
        "dropout": dropout,
        "weight": weight,
        "bias": bias,
    }
    a = cap.add(node, "attention", [x], attrs, module, name=f"{prefix}_heads", shape=shape)
    proj = cap.gm.get_submodule(out_proj)
    if not isinstance(proj, nn.Linear) or proj.in_features != embed_dim:
        raise PartitionError(
            f"{where}: output projection {out_proj!r} is not a Linear({embed_dim}, .)"
        )
    out_shape = shape[:-1] + (proj.out_features,)
    return cap.add(node, "linear", [a], {}, out_proj, name=f"{prefix}_proj", shape=out_shape)


def _check_mha(m: nn.MultiheadAttention, name: str) -> None:
    where = f"module {name!r} (MultiheadAttention)"
    if not m._qkv_same_embed_dim or m.in_proj_weight is None:
        raise PartitionError(f"{where}: kdim/vdim different from embed_dim are not supported")
    if m.bias_k is not None or m.bias_v is not None or m.add_zero_attn:
        raise PartitionError(f"{where}: add_bias_kv / add_zero_attn are not supported")


def _emit_mha(
    cap: Capturer, node: fx.Node, x: str, m: nn.MultiheadAttention, name: str, prefix: str
) -> str:
    _check_mha(m, name)
    return emit_self_attention(
        cap,
        node,
        x,
        module=name,
        heads=m.num_heads,
        embed_dim=m.embed_dim,
        seq_first=not m.batch_first,
        weight="in_proj_weight",
        bias="in_proj_bias" if m.in_proj_bias is not None else None,
        out_proj=f"{name}.out_proj",
        dropout=float(m.dropout),
        prefix=prefix,
    )


@capture_module(nn.MultiheadAttention)
def _mha(cap: Capturer, node: fx.Node, m: nn.MultiheadAttention) -> str:
    name = str(node.target)
    where = f"module {name!r} (MultiheadAttention)"
    q, k, v = _arg(node, 0, "query"), _arg(node, 1, "key"), _arg(node, 2, "value")
    if not (q is k and k is v):
        raise PartitionError(
            f"{where}: only self-attention (query, key and value the same tensor) is supported"
        )
    _refuse_if_set(
        cap,
        node,
        where,
        key_padding_mask=_arg(node, 3, "key_padding_mask"),
        attn_mask=_arg(node, 5, "attn_mask"),
        is_causal=_arg(node, 7, "is_causal", False),
    )
    out = _emit_mha(cap, node, cap.value(q, node), m, name, node.name)
    cap.tuples[node] = [out, None]  # (attn_output, attn_weights): weights unsupported
    return ""


def _activation(m: nn.TransformerEncoderLayer, name: str) -> dict[str, Any]:
    act: Any = m.activation
    if act is F.relu or isinstance(act, nn.ReLU):
        return {"fn": "relu"}
    if act is F.gelu:
        return {"fn": "gelu", "approximate": "none"}
    if isinstance(act, nn.GELU):
        return {"fn": "gelu", "approximate": act.approximate}
    raise PartitionError(
        f"module {name!r} (TransformerEncoderLayer): activation {act!r} is not supported "
        "(relu or gelu)"
    )


def emit_encoder_layer(
    cap: Capturer, node: fx.Node, x: str, m: nn.TransformerEncoderLayer, name: str, prefix: str
) -> str:
    """``nn.TransformerEncoderLayer`` as ops (its documented math, without masks)."""
    act = _activation(m, name)

    def add(
        op: str, kind: str, ins: list[str], attrs: dict[str, Any] | None = None, **kw: Any
    ) -> str:
        shape = kw.pop("shape", cap.info(ins[0]).shape)
        return cap.add(node, kind, ins, attrs, name=f"{prefix}_{op}", shape=shape, **kw)

    def norm(v: str, which: str) -> str:
        ln = getattr(m, which)
        if not isinstance(ln, nn.LayerNorm) or len(ln.normalized_shape) != 1:
            raise PartitionError(f"module {name!r}.{which}: expected a LayerNorm over the last dim")
        attrs = {"eps": ln.eps, "normalized_shape": list(ln.normalized_shape)}
        return add(which, "layer_norm", [v], attrs, module=f"{name}.{which}")

    def sa(v: str) -> str:
        o = _emit_mha(cap, node, v, m.self_attn, f"{name}.self_attn", f"{prefix}_attn")
        return add("dropout1", "dropout", [o], {"p": m.dropout1.p})

    def ff(v: str) -> str:
        shape = cap.info(v).shape[:-1] + (m.linear1.out_features,)
        h = add("linear1", "linear", [v], {}, module=f"{name}.linear1", shape=shape)
        h = add("act", "act", [h], act)
        h = add("dropout", "dropout", [h], {"p": m.dropout.p})
        shape = shape[:-1] + (m.linear2.out_features,)
        h = add("linear2", "linear", [h], {}, module=f"{name}.linear2", shape=shape)
        return add("dropout2", "dropout", [h], {"p": m.dropout2.p})

    def residual(a: str, b: str, op: str) -> str:
        return add(op, "binary", [a, b], {"fn": "add"}, shape=cap.info(b).shape)

    if m.norm_first:
        x = residual(x, sa(norm(x, "norm1")), "add1")
        return residual(x, ff(norm(x, "norm2")), "add2")
    x = norm(residual(x, sa(x), "add1"), "norm1")
    return norm(residual(x, ff(x), "add2"), "norm2")


@capture_module(nn.TransformerEncoderLayer)
def _encoder_layer(cap: Capturer, node: fx.Node, m: nn.TransformerEncoderLayer) -> str:
    name = str(node.target)
    _refuse_if_set(
        cap,
        node,
        f"module {name!r} (TransformerEncoderLayer)",
        src_mask=_arg(node, 1, "src_mask"),
        src_key_padding_mask=_arg(node, 2, "src_key_padding_mask"),
        is_causal=_arg(node, 3, "is_causal", False),
    )
    return emit_encoder_layer(cap, node, cap.value(node.args[0], node), m, name, node.name)


@capture_module(nn.TransformerEncoder)
def _encoder(cap: Capturer, node: fx.Node, m: nn.TransformerEncoder) -> str:
    name = str(node.target)
    _refuse_if_set(
        cap,
        node,
        f"module {name!r} (TransformerEncoder)",
        mask=_arg(node, 1, "mask"),
        src_key_padding_mask=_arg(node, 2, "src_key_padding_mask"),
        is_causal=_arg(node, 3, "is_causal"),
    )
    x = cap.value(node.args[0], node)
    for i, layer in enumerate(m.layers):
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise PartitionError(f"module {name!r}: layer {i} is not a TransformerEncoderLayer")
        x = emit_encoder_layer(cap, node, x, layer, f"{name}.layers.{i}", f"{node.name}_{i}")
    if m.norm is not None:
        if not isinstance(m.norm, nn.LayerNorm) or len(m.norm.normalized_shape) != 1:
            raise PartitionError(f"module {name!r}.norm: expected a LayerNorm over the last dim")
        attrs = {"eps": m.norm.eps, "normalized_shape": list(m.norm.normalized_shape)}
        x = cap.add(
            node,
            "layer_norm",
            [x],
            attrs,
            f"{name}.norm",
            name=f"{node.name}_norm",
            shape=cap.info(x).shape,
        )
    return x


def is_qkv_attention(m: nn.Module) -> bool:
    """Structural test of the hand-written (timm-style) attention: ``qkv`` and ``proj``
    Linears and an int ``num_heads`` (the capture then verifies the computation)."""
    return (
        isinstance(getattr(m, "qkv", None), nn.Linear)
        and isinstance(getattr(m, "proj", None), nn.Linear)
        and isinstance(getattr(m, "num_heads", None), int)
        and not isinstance(getattr(m, "num_heads", None), bool)
    )


@capture_leaf(is_qkv_attention)
def _qkv_attention(cap: Capturer, node: fx.Node, m: nn.Module) -> str:
    name = str(node.target)
    where = f"module {name!r} ({type(m).__name__})"
    qkv, proj, heads = m.qkv, m.proj, m.num_heads
    assert isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int)
    extra = {f"argument {i}": a for i, a in enumerate(node.args[1:], 1)} | dict(node.kwargs)
    if not node.args or any(cap.is_tensor(a) or cap.const(a) is not None for a in extra.values()):
        raise PartitionError(
            f"{where}: hand-written attention must take one tensor (other arguments, e.g. "
            f"attention masks, must be None); got {sorted(extra)}"
        )
    d = qkv.in_features
    if qkv.out_features != 3 * d or heads < 1 or d % heads or proj.in_features != d:
        raise PartitionError(
            f"{where}: expected qkv = Linear(D, 3 D), proj = Linear(D, .) and num_heads "
            f"dividing D; got qkv {qkv.in_features}->{qkv.out_features}, proj "
            f"{proj.in_features}->{proj.out_features}, num_heads {heads}"
        )
    hd = d // heads
    raw_scale = getattr(m, "scale", None)
    scale = float(raw_scale) if isinstance(raw_scale, (int, float)) else None
    drop = getattr(m, "attn_drop", None)
    p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
    example = node.meta.get("disco_example")
    if example is None:
        raise PartitionError(f"{where}: no example input was recorded")
    args, _, out = example
    err, tol = float("inf"), 0.0
    with torch.no_grad():
        ref = None
        if isinstance(out, torch.Tensor) and isinstance(args[0], torch.Tensor):
            ex = args[0]
            if ex.dim() == 3 and ex.shape[-1] == d:
                ref = F.linear(
                    attend(ex, qkv.weight, qkv.bias, heads, hd, scale=scale), proj.weight, proj.bias
                )
        if ref is not None and ref.shape == out.shape:
            err = float((ref - out).abs().max())
            tol = VERIFY_TOLERANCE * max(1.0, float(out.abs().max()))
    if not err <= tol:
        raise PartitionError(
            f"{where} has qkv, proj and num_heads but its forward differs from standard "
            f"multi-head self-attention (qkv -> q, k, v -> softmax(q k^T * scale) v -> proj) by "
            f"{err:.3g} on the example input; refusing to partition an unrecognised variant"
        )
    out_value = emit_self_attention(
        cap,
        node,
        cap.value(node.args[0], node),
        module=name,
        heads=heads,
        embed_dim=d,
        seq_first=False,
        weight="qkv.weight",
        bias="qkv.bias" if qkv.bias is not None else None,
        out_proj=f"{name}.proj",
        scale=scale,
        dropout=p,
    )
    pdrop = getattr(m, "proj_drop", None)
    if isinstance(pdrop, nn.Dropout):
        out_value = cap.add(
            node,
            "dropout",
            [out_value],
            {"p": pdrop.p},
            name=f"{node.name}_proj_drop",
            shape=cap.info(out_value).shape,
        )
    return out_value
