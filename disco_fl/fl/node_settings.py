"""A node's settings (``flower-supernode --node-config``, documented in
:mod:`disco_fl.fl.client_app`): who it is, its peer channel's TLS folder, and the device it
reports to the roster."""

from __future__ import annotations

from typing import Any

from flwr.app import Context


def node_setting(context: Context, key: str, default: Any = None) -> Any:
    """The node config's ``key`` (``default`` when absent); ``ValueError`` when it is absent
    without a default."""
    v = context.node_config.get(key, default)
    if v is None:
        raise ValueError(f"node config lacks {key!r} (flower-supernode --node-config '{key}=...')")
    return v


def node_identity(context: Context) -> tuple[str, int, str, str]:
    """``(household, shard, peer-address, peer-listen)`` of this node."""
    hh = str(node_setting(context, "household"))
    k = int(node_setting(context, "shard"))
    addr = str(node_setting(context, "peer-address"))
    listen = str(context.node_config.get("peer-listen", addr))
    return hh, k, addr, listen


def tls_folder(context: Context) -> str:
    """The ``tls-dir`` setting ("" : plaintext peer channel)."""
    return str(node_setting(context, "tls-dir", ""))


def device_report(context: Context) -> dict[str, Any]:
    """``capacity`` (node config: a number or ``"probe"``; absent: not reported) and
    ``memory-bytes`` (node config, else measured) for the roster."""
    from disco_fl.runtime.probe import available_memory, measure_compute

    out: dict[str, Any] = {}
    cap = context.node_config.get("capacity")
    if isinstance(cap, str) and cap.strip().lower() == "probe":
        cap = measure_compute(1.0).gflops
    if cap is not None:
        try:
            out["capacity"] = float(cap)
        except ValueError as e:
            raise ValueError(f"node config capacity={cap!r}: a number or 'probe'") from e
    mem = context.node_config.get("memory-bytes")
    if mem is None:
        mem = available_memory().bytes or None  # 0: unknown, not reported
    if mem is not None:
        if isinstance(mem, bool) or not isinstance(mem, (int, float)):
            raise ValueError(f"node config memory-bytes={mem!r}: a number of bytes")
        out["memory-bytes"] = int(mem)
    return out


__all__ = ["device_report", "node_identity", "node_setting", "tls_folder"]
