"""What a device can do: compute throughput and available memory (``disco-fl probe``).

A node reports two numbers to the household's partition (``capacity`` and ``memory-bytes``
in its Flower ``node_config``, see ``docs/deployment.md``):

- **capacity**: the throughput of a short, bounded benchmark in GFLOP/s (:func:`measure_compute`):
  a square fp32 matmul and a 3x3 convolution, each timed for half of ``seconds`` (default 1 s,
  at most a few more milliseconds for the last iteration) after one warm-up call, with the
  current ``torch`` thread settings. The capacity is the total of both kernels' FLOPs over
  their total time. Only ratios between nodes matter: slices are proportional to it.
- **memory_bytes**: the memory this process may still allocate (:func:`available_memory`):
  ``MemAvailable`` of ``/proc/meminfo``, or the headroom of the process's memory cgroup
  (limit minus current usage, v2 ``memory.max`` / ``memory.current`` or v1
  ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``), whichever is smaller: inside a
  container the cgroup limit is what the kernel enforces (the OOM killer), while
  ``/proc/meminfo`` shows the whole host.

With ``--peers`` (and the household's plan, for the peer channel's handshake), ``links``:
round-trip time and bandwidth to every peer (:func:`measure_links`), measured over the peer
channel itself by :mod:`~disco_fl.runtime.transport.link_probe` (the path, authentication
and link emulation of activation frames). The peers must be serving (``disco-fl serve``) the
same plan, and this process listens on its own node's address for their answers (run it on
the node's device while its own ``serve`` is not running, or let a serving requester probe:
``disco-fl serve --ladder``).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
import torch.nn.functional as F

from disco_fl.partition.plan import Plan
from disco_fl.runtime.transport.grpc_transport import GrpcTransport, LinkSchedule, LinkShape
from disco_fl.runtime.transport.link_probe import LinkProbe, probe_links

MATMUL_N = 256  # (n x n) @ (n x n): 2 n^3 FLOPs
CONV_SHAPE = (8, 32, 32, 32)  # batch, channels in = out, height, width; 3x3 kernel


@dataclass(frozen=True)
class ComputeProbe:
    """Throughput of the two kernels and of both together, GFLOP/s."""

    matmul_gflops: float
    conv_gflops: float
    gflops: float  # both kernels' FLOPs over both kernels' time
    threads: int  # torch.get_num_threads() during the measurement
    seconds: float  # wall time of the measurement, warm-up included


@dataclass(frozen=True)
class MemoryProbe:
    """Memory this process may still allocate, and where the number came from."""

    bytes: int
    source: str  # "meminfo", "cgroup" or "unknown"
    meminfo_bytes: int | None
    cgroup_bytes: int | None


@dataclass(frozen=True)
class ProbeResult:
    """What ``disco-fl probe`` prints: ``capacity`` and ``memory_bytes`` go into the node's
    ``node_config`` (``capacity=...``, ``memory-bytes=...``)."""

    capacity: float
    memory_bytes: int
    compute: ComputeProbe
    memory: MemoryProbe
    links: list[LinkProbe] | None = None  # with --peers: one per peer

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if self.links is None:
            del d["links"]
        return d


def _time_kernel(fn: Any, flops: float, budget: float) -> tuple[float, float]:
    """``(flops done, seconds)`` of repeated ``fn()`` for about ``budget`` seconds (at least
    one timed call), after one untimed warm-up call."""
    fn()
    done, t0 = 0.0, time.perf_counter()
    while True:
        fn()
        done += flops
        dt = time.perf_counter() - t0
        if dt >= budget:
            return done, dt


def measure_compute(seconds: float = 1.0) -> ComputeProbe:
    """Time a matmul and a convolution for about ``seconds`` in total (see the module)."""
    if not 0.0 < seconds <= 30.0:
        raise ValueError(f"probe seconds must be in (0, 30], got {seconds}")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    n = MATMUL_N
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    bsz, c, h, w = CONV_SHAPE
    x = torch.randn(bsz, c, h, w, generator=gen)
    k = torch.randn(c, c, 3, 3, generator=gen)
    with torch.no_grad():
        mm = _time_kernel(lambda: torch.mm(a, b), 2.0 * n**3, seconds / 2)
        conv = _time_kernel(
            lambda: F.conv2d(x, k, padding=1), 2.0 * bsz * c * c * 9 * h * w, seconds / 2
        )
    return ComputeProbe(
        matmul_gflops=mm[0] / mm[1] / 1e9,
        conv_gflops=conv[0] / conv[1] / 1e9,
        gflops=(mm[0] + conv[0]) / (mm[1] + conv[1]) / 1e9,
        threads=torch.get_num_threads(),
        seconds=time.perf_counter() - t0,
    )


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) -> None


def _read_meminfo(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _meminfo_available() -> int | None:
    return _read_meminfo(Path("/proc/meminfo"))


def _cgroup_at(folder: Path) -> int | None:
    """Limit minus usage of the memory cgroup in ``folder`` (v2 ``memory.max`` /
    ``memory.current``, or v1 ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``); None
    without a limit."""
    for limit_name, usage_name in (
        ("memory.max", "memory.current"),
        ("memory.limit_in_bytes", "memory.usage_in_bytes"),
    ):
        limit = _read_int(folder / limit_name)
        if limit is None or limit >= 1 << 60:  # "max", absent, or v1's "no limit"
            continue
        usage = _read_int(folder / usage_name) or 0
        return max(limit - usage, 0)
    return None


def _cgroup_headroom(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """:func:`_cgroup_at` of this process's memory cgroup (``/proc/self/cgroup``; v2 then
    v1), or of the cgroup root seen from inside a container; None without a limit."""
    rel: dict[str, str] = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                rel[c] = path.lstrip("/")
    except (OSError, ValueError):
        pass
    for folder in (
        root / rel.get("", ""),
        root,
        root / "memory" / rel.get("memory", ""),
        root / "memory",
    ):
        got = _cgroup_at(folder)
        if got is not None:
            return got
    return None


def available_memory() -> MemoryProbe:
    """Memory this process may still allocate (see the module): the smaller of
    ``MemAvailable`` and the memory cgroup's headroom."""
    info = _meminfo_available()
    cg = _cgroup_headroom()
    have = [(v, s) for v, s in ((info, "meminfo"), (cg, "cgroup")) if v is not None]
    if not have:
        return MemoryProbe(0, "unknown", None, None)
    value, source = min(have)
    return MemoryProbe(int(value), source, info, cg)


def measure_links(
    plan: str | Path,
    node: int,
    peers: Sequence[str],
    *,
    listen: str | None = None,
    token: str = "",
    server_credentials: grpc.ServerCredentials | None = None,
    channel_credentials: grpc.ChannelCredentials | None = None,
    link_shape: LinkShape | LinkSchedule | None = None,
    connect_timeout: float = 3.0,
    data_path: str = "socket",
    data_ssl: tuple[ssl.SSLContext, ssl.SSLContext] | None = None,
    **probe_kwargs: Any,
) -> list[LinkProbe]:
    """Round trip and bandwidth from node ``node`` to every other node of ``peers``, over a
    peer endpoint of this process on ``listen`` (default: its own ``peers`` entry) that
    speaks the household's ``plan`` (its hash) with its token and credentials, on its data
    path (``data_path``, ``data_ssl``: as the nodes serve it, ``disco-fl serve``'s default
    ``"socket"``; see the module; ``probe_kwargs``:
    :func:`~disco_fl.runtime.transport.link_probe.probe_link_async`'s)."""
    p = Path(plan)
    the_plan = Plan.load(p / "plan.json" if p.is_dir() else p)
    if len(peers) != the_plan.num_nodes or not 0 <= node < len(peers):
        raise ValueError(
            f"the plan has {the_plan.num_nodes} nodes: give that many peer addresses and a node "
            f"index among them (got {len(peers)} addresses, node {node})"
        )
    t = GrpcTransport(
        node,
        the_plan.num_nodes,
        plan_hash=the_plan.hash,
        listen=listen or peers[node],
        peers=list(peers),
        household_token=token,
        num_layers=len(the_plan.program.ops),
        server_credentials=server_credentials,
        channel_credentials=channel_credentials,
        link_shape=link_shape,
        connect_timeout=connect_timeout,
        data_path=data_path,
        data_ssl=data_ssl,
    )
    try:
        return list(probe_links(t, **probe_kwargs).values())
    finally:
        t.close(0.5)


def probe(seconds: float = 1.0, links: list[LinkProbe] | None = None) -> ProbeResult:
    """Compute throughput and available memory of this device (``disco-fl probe``), with the
    ``links`` measured by :func:`measure_links` if given."""
    compute = measure_compute(seconds)
    memory = available_memory()
    return ProbeResult(round(compute.gflops, 3), memory.bytes, compute, memory, links)


__all__ = [
    "ComputeProbe",
    "MemoryProbe",
    "ProbeResult",
    "available_memory",
    "measure_compute",
    "measure_links",
    "probe",
]
