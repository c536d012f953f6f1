"""Fault hardening of ``disco-fl serve`` (issue 13, items 2, 3 and 7), with real processes.

- Failed requests free their tensors at once: eight batch-1024 requests failing on a stalled
  peer leave the requester's RSS near where it started, without anyone calling
  ``gc.collect()``.
- Only the requester's INPUT frame at the input layer opens a session, and a node holds a
  bounded number of sessions whose deadline counts from their arrival: a burst of INPUT frames
  from a peer does not delay a real request beyond its deadline.
- Computation counts against the deadline (checked between ops; large batches run in chunks):
  a request whose compute alone exceeds its deadline fails within deadline + 0.5 s, and a
  small request beside it is served.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

import disco_fl
from disco_fl.core.wire import encode_tensor
from disco_fl.emulation.export import ExportedShard, load_shard, run_shards
from disco_fl.partition.plan import Plan
from disco_fl.proto_gen.disco.v1 import peer_pb2, peer_pb2_grpc
from disco_fl.runtime.inference import run_node, run_node_async
from disco_fl.runtime.serving import InferenceError, InferenceSession
from disco_fl.runtime.transport import InProcessHub
from disco_fl.runtime.transport.grpc_transport import GrpcTransport
from tests.test_serve import Household, _export, _recovers
from tests.zoo import ZOO

# timed against tight bounds (failures within a deadline + 0.5 s): alone under xdist
# (tests/conftest.py)
pytestmark = pytest.mark.exclusive

DEADLINE_S = 2.0  # the node's deadline (--deadline) in these tests
SLACK_S = 0.5  # the bar: a failure arrives within deadline + 0.5 s
# the caller's time also holds the upload of the input (12.8 MB for 4096 inputs) and the
# answer's way back; with two cores shared by several test runs, that alone took up to 0.3 s
TRANSFER_S = 1.5
INPUT = peer_pb2.Frame.INPUT
MD_SERVER_MS = "disco-server-ms"  # a failed Infer's trailing metadata: the node's own time


@dataclass
class Outcome:
    caller_s: float  # the call, as the caller timed it (input already encoded)
    node_s: float | None  # the node's own time, arrival to answer (failures only)
    code: grpc.StatusCode | None  # None: answered
    message: str


def _call(addr: str, x: torch.Tensor, deadline_s: float | None = None) -> Outcome:
    """One ``Infer`` call to ``addr``, timed from after the input is encoded."""
    with InferenceSession(addr, timeout=60) as s:
        request = s._request(x, deadline_s)
        t0 = time.monotonic()
        try:
            s._stub.Infer(request, metadata=s._md, timeout=60)
            return Outcome(time.monotonic() - t0, None, None, "")
        except grpc.RpcError as e:
            took = time.monotonic() - t0
            assert isinstance(e, grpc.Call)
            trailing = dict(e.trailing_metadata() or ())
            ms = trailing.get(MD_SERVER_MS)
            node_s = float(ms) / 1e3 if isinstance(ms, str) else None
            return Outcome(took, node_s, e.code(), e.details() or "")


@pytest.fixture
def household3(
    tmp_path: Path,
) -> Iterator[Callable[..., tuple[Household, torch.Tensor, torch.Tensor]]]:
    """Start a 3-node ``resnet_narrow`` household: ``(household, x, reference output)``."""
    made: list[Household] = []

    def start(*extra: str) -> tuple[Household, torch.Tensor, torch.Tensor]:
        plan_dir, _, x = _export(tmp_path / "plan", "resnet_narrow", 3)
        ref = run_shards([load_shard(plan_dir / "plan.json", k) for k in range(3)], x)
        work = tmp_path / "hh"
        work.mkdir()
        hh = Household(plan_dir, 3, work, list(extra))
        made.append(hh)
        return hh, x, ref

    yield start
    for hh in made:
        hh.stop()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _input_frames(n: int, src: int, dst: int, tag: str) -> list[peer_pb2.Frame]:
    frames = []
    for i in range(n):
        f = peer_pb2.Frame(session_id=f"{tag}-{i}", layer=0, src=src, dst=dst, direction=INPUT)
        encode_tensor(torch.zeros(1, 1, 28, 28), "fp32", out=f.tensor)
        frames.append(f)
    return frames


def _exchange(
    addr: str, plan_hash: str, src: int, dst: int, frames: list[peer_pb2.Frame]
) -> list[peer_pb2.Frame]:
    """Send ``frames`` on an authenticated ``Exchange`` stream as node ``src`` (plaintext,
    empty token); returns the frames the node refused (its replies)."""
    md = [
        ("disco-plan-hash", plan_hash),
        ("disco-node", str(src)),
        ("disco-expected-node", str(dst)),
        ("disco-token", ""),
        ("disco-protocol", "2"),  # the current peer protocol version
    ]
    with grpc.insecure_channel(addr) as ch:
        stub = peer_pb2_grpc.PeerStub(ch)
        return list(stub.Exchange(iter(frames), metadata=md, timeout=20))


# ---- item 2: failed requests free their tensors ---------------------------------------------


def test_failed_requests_free_their_tensors(
    household3: Callable[..., tuple[Household, torch.Tensor, torch.Tensor]],
) -> None:
    hh, x, ref = household3("--deadline", str(DEADLINE_S), "--max-inflight", "8")
    assert _recovers(hh.addrs[0], x, ref) == 0
    pid = hh.procs[0].pid  # type: ignore[union-attr]
    start = _rss_mb(pid)
    stalled = hh.procs[1]
    assert stalled is not None
    big = torch.randn(1024, *x.shape[1:])
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def call() -> None:
        outcome = _call(hh.addrs[0], big)
        with lock:
            outcomes.append(outcome)

    stalled.send_signal(signal.SIGSTOP)
    try:
        callers = [threading.Thread(target=call, daemon=True) for _ in range(8)]
        for t in callers:
            t.start()
        peak = start
        while any(t.is_alive() for t in callers):
            peak = max(peak, _rss_mb(pid))
            time.sleep(0.05)
        for t in callers:
            t.join(30)
        # a short settle (the node gives memory back once idle); no gc.collect() anywhere
        settle = time.monotonic() + 5.0
        rss = _rss_mb(pid)
        while rss - start > 200 and time.monotonic() < settle:
            time.sleep(0.2)
            rss = _rss_mb(pid)
        print(
            f"node 0 RSS: start {start:.0f} MB, peak {peak:.0f} MB, after {rss:.0f} MB; "
            f"failed after {sorted(round(o.caller_s, 2) for o in outcomes)} s (caller), "
            f"{sorted(round(o.node_s or -1, 2) for o in outcomes)} s (node 0)"
        )
        assert rss - start <= 200, (start, peak, rss)
        assert len(outcomes) == 8
        for o in outcomes:
            assert o.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE), o
            assert o.node_s is not None and o.node_s <= DEADLINE_S + SLACK_S, o
            assert o.caller_s <= DEADLINE_S + SLACK_S + TRANSFER_S, o
    finally:
        stalled.send_signal(signal.SIGCONT)
    assert _recovers(hh.addrs[0], x, ref) <= 2


# ---- item 3: only the requester's INPUT frames open sessions, and boundedly -----------------


def test_input_frame_burst_does_not_delay_a_request(
    household3: Callable[..., tuple[Household, torch.Tensor, torch.Tensor]],
) -> None:
    hh, x, ref = household3("--deadline", str(DEADLINE_S), "--max-inflight", "4")
    plan = Plan.load(hh.plan_dir / "plan.json")
    assert _recovers(hh.addrs[0], x, ref) == 0
    # 200 INPUT frames from node 2, a peer but not the requester: each refused, none queued
    replies = _exchange(hh.addrs[1], plan.hash, 2, 1, _input_frames(200, 2, 1, "burst"))
    with InferenceSession(hh.addrs[0], timeout=30) as s:
        t0 = time.monotonic()
        out = s.infer(x)
        took = time.monotonic() - t0
    assert (out - ref).abs().max().item() <= 1e-5
    assert took <= DEADLINE_S, took
    assert len(replies) == 200
    assert all("only node 0 sends the input" in r.error for r in replies), replies[0].error

    # 200 from the requester's identity (a plaintext household cannot tell it from node 0):
    # at most max_inflight + max_queued (4 + 4) sessions are admitted, the rest refused at once
    t_burst = time.monotonic()
    replies = _exchange(hh.addrs[1], plan.hash, 0, 1, _input_frames(200, 0, 1, "forged"))
    assert not replies  # well-formed: accepted by the transport, then admitted or refused
    with InferenceSession(hh.addrs[0], timeout=30) as s:
        t0 = time.monotonic()
        try:
            out = s.infer(x)
            assert (out - ref).abs().max().item() <= 1e-5
        except InferenceError as e:  # no room on node 1: said at once, not after a wait
            assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
        took = time.monotonic() - t0
    assert took <= DEADLINE_S + SLACK_S, took
    with InferenceSession(hh.addrs[1], timeout=30) as s:
        stats = s.status()["stats"]
    assert stats["sessions_refused"] >= 200 - 8, stats
    # the admitted ones expire by their deadline, counted from their arrival (queued or not)
    time.sleep(max(0.0, t_burst + DEADLINE_S + 0.2 - time.monotonic()))
    with InferenceSession(hh.addrs[1], timeout=30) as s:
        status = s.status()
    assert status["active_sessions"] == 0, status
    assert status["stats"]["sessions_refused"] + status["stats"]["sessions_failed"] >= 200
    with InferenceSession(hh.addrs[0], timeout=30) as s:
        t0 = time.monotonic()
        out = s.infer(x)
        took = time.monotonic() - t0
    assert (out - ref).abs().max().item() <= 1e-5
    assert took <= DEADLINE_S, took


# ---- item 7: computation counts against the deadline ----------------------------------------


def test_deadline_met_by_a_request_whose_compute_exceeds_it(
    household3: Callable[..., tuple[Household, torch.Tensor, torch.Tensor]],
) -> None:
    hh, x, ref = household3("--deadline", str(DEADLINE_S))
    assert _recovers(hh.addrs[0], x, ref) == 0
    # 4096 inputs: 5-6 s end to end here when alone (~3.7 s of CPU over the three nodes, in
    # chunks; ~13 s in one batch), against a deadline of 1 s: compute alone exceeds it
    deadline = 1.0
    big = torch.randn(4096, *x.shape[1:])
    results: list[Outcome] = []
    lock = threading.Lock()

    def call() -> None:
        outcome = _call(hh.addrs[0], big, deadline)
        with lock:
            results.append(outcome)

    callers = [threading.Thread(target=call, daemon=True) for _ in range(2)]
    for t in callers:
        t.start()
    time.sleep(0.3)  # the large requests are computing
    with InferenceSession(hh.addrs[0], timeout=30) as s:
        t0 = time.monotonic()
        out = s.infer(x)  # beside them: the node's own deadline
        small_took = time.monotonic() - t0
    for t in callers:
        t.join(60)
    assert not any(t.is_alive() for t in callers), "a large request hung"
    print(
        f"large: failed after {[round(r.caller_s, 2) for r in results]} s (caller), "
        f"{[round(r.node_s or -1, 2) for r in results]} s (node 0); small: {small_took:.2f} s"
    )
    assert (out - ref).abs().max().item() <= 1e-5
    assert small_took <= DEADLINE_S, small_took
    assert len(results) == 2
    for r in results:
        assert r.code is not None, f"a 4096-input request finished in {r.caller_s:.2f} s"
        assert r.code == grpc.StatusCode.DEADLINE_EXCEEDED, r
        assert r.node_s is not None and r.node_s <= deadline + SLACK_S, r
        assert r.caller_s <= deadline + SLACK_S + TRANSFER_S, r


# ---- the runtime: the deadline between ops, a failed run's frames ----------------------------


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory) -> ExportedShard:
    """``resnet_narrow`` as a one-node plan: a run is computation only (no peer to wait for)."""
    build, shape = ZOO["resnet_narrow"]
    torch.manual_seed(0)
    model = build().eval()
    pm = disco_fl.partition(model, 1, torch.randn(*shape)).eval()
    out = tmp_path_factory.mktemp("one_node")
    pm.export(out)
    return load_shard(out / "plan.json", 0)


def test_runtime_checks_the_deadline_between_ops(one_node: ExportedShard) -> None:
    x = torch.randn(2048, 1, 28, 28)  # about a second of computation here; the deadline 0.1 s
    with InProcessHub(1, num_layers=len(one_node.program.ops)) as hub:
        (t,) = list(hub)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="passed while computing") as info:
            run_node(one_node, t, x, session_id="blocking", timeout=0.1)
        took = time.monotonic() - t0
    assert took <= 0.1 + SLACK_S, took
    # the failed run left no activations in its traceback (no gc.collect() needed)
    tb = info.value.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in ("_node_steps", "drive"):  # the program's frames
            assert not tb.tb_frame.f_locals, sorted(tb.tb_frame.f_locals)
        tb = tb.tb_next
    plan_hash = one_node.plan.hash
    g = GrpcTransport(0, 1, plan_hash=plan_hash, num_layers=len(one_node.program.ops))
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="passed while computing"):
            g.run(run_node_async(one_node, g, x, session_id="loop", timeout=0.1), timeout=30)
        took = time.monotonic() - t0
        assert took <= 0.1 + SLACK_S, took
        small = g.run(run_node_async(one_node, g, x[:4], session_id="small", timeout=30), 30)
        assert small is not None and small.shape[0] == 4
    finally:
        g.close()


def test_wait_for_peers_keeps_waiting_through_the_retry_window() -> None:
    """A peer slow to start: the first handshake times out, the next finds nothing listening
    (``HandshakeError``: unreachable), and the one after that, inside the transport's retry
    window, gets a plain ``TransportError``; ``wait_for_peers`` keeps waiting through all of
    them (it used to stop at the last one) and still gives up at once on a refused handshake."""
    from types import SimpleNamespace

    from disco_fl.runtime.serving.node_server import NodeServer
    from disco_fl.runtime.transport.grpc_transport import HandshakeError, TransportError

    def server(errors: list[Exception]) -> SimpleNamespace:
        def connect(peers: list[int]) -> None:
            if errors:
                raise errors.pop(0)

        return SimpleNamespace(index=0, num_nodes=2, transport=SimpleNamespace(connect=connect))

    slow = [
        HandshakeError("node 0: peer 1 at 127.0.0.1:1 did not answer within 3 s"),
        HandshakeError("node 0: peer 1 at 127.0.0.1:1 is unreachable: [Errno 111] Connect"),
        TransportError("node 0: peer 1 at 127.0.0.1:1 is unreachable: [Errno 111] Connect"),
    ]
    said: list[str] = []
    NodeServer.wait_for_peers(server(slow), timeout=10, progress=said.append)  # type: ignore[arg-type]
    assert not slow and said[-1] == "node 0: connected to peer 1"
    refused = [HandshakeError("node 0: peer 1 at x refused the handshake (X): wrong plan")]
    with pytest.raises(HandshakeError, match="refused the handshake"):
        NodeServer.wait_for_peers(server(refused), timeout=10)  # type: ignore[arg-type]
    never = [TransportError("unreachable")] * 100
    with pytest.raises(TimeoutError, match="not reachable within"):
        NodeServer.wait_for_peers(server(never), timeout=0.3)  # type: ignore[arg-type]
