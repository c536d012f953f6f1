"""The typed control plane of training (issue 14 item 2).

Control messages travel as typed protobuf (``disco.v1.Control``: a vote, an abort naming the
failed node, a channel selection) on typed sub-channels of a step's session; malformed control
frames are refused on arrival with a clear error; an abort wakes a waiting node at once (no
polling); a peer speaking another protocol version (or another round) is refused at the
handshake.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from disco_fl.core.wire import (
    PROTOCOL_VERSION,
    WireError,
    abort_message,
    decode_selection,
    selection_message,
    vote_message,
)
from disco_fl.proto_gen.disco.v1 import peer_pb2, peer_pb2_grpc
from disco_fl.runtime.training.commit import ABORT, SELECTION, StepIO
from disco_fl.runtime.training.errors import PeerFailure
from disco_fl.runtime.transport.base import TransportError, check_incoming
from disco_fl.runtime.transport.grpc_transport import GrpcTransport, HandshakeError
from disco_fl.runtime.transport.inprocess import InProcessHub

Frame = peer_pb2.Frame
Control = peer_pb2.Control


def _control_frame(control: peer_pb2.Control, sub: int = ABORT, **kw: object) -> peer_pb2.Frame:
    fields: dict[str, object] = {
        "session_id": "s",
        "step": 0,
        "layer": 0,
        "direction": Frame.CONTROL,
        "src": 1,
        "dst": 0,
        "sub_channel": sub,
        **kw,
    }
    f = Frame(**fields)  # type: ignore[arg-type]
    f.control.CopyFrom(control)
    return f


# ---- malformed control frames are refused -------------------------------------------------


def _unknown_body() -> peer_pb2.Control:
    # a body of a newer protocol: field 9 of Control, which this node does not know
    return Control.FromString(bytes([0x4A, 0x00]))


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (_control_frame(Control()), "control message without a body"),
        (_control_frame(_unknown_body()), "a body this node does not know"),
        (_control_frame(Control(vote=peer_pb2.Vote())), "vote without its 'ok' field"),
        (_control_frame(Control(abort=peer_pb2.Abort(cause="x"))), "without its 'failed_node'"),
        (
            _control_frame(Control(abort=peer_pb2.Abort(failed_node=3, cause="x"))),
            "abort names node 3, out of range for 3 nodes",
        ),
        (
            _control_frame(Control(abort=peer_pb2.Abort(failed_node=0, cause="x" * 5000))),
            "abort cause longer than 4096",
        ),
        (
            _control_frame(
                Control(selection=peer_pb2.ChannelSelection(channels=[0, 2, 2])), SELECTION
            ),
            "channel selection repeats channel 2",
        ),
        (
            _control_frame(
                Control(selection=peer_pb2.ChannelSelection(channels=[3, 1])), SELECTION
            ),
            "channel selection is not increasing (3 then 1)",
        ),
        (
            Frame(session_id="s", layer=0, direction=Frame.CONTROL, src=1, dst=0),
            "CONTROL frame without a control message",
        ),
        (
            _control_frame(vote_message(), direction=Frame.NORMS),
            "control message in a frame of direction NORMS",
        ),
        (
            _control_frame(vote_message(), error="boom"),
            "control frame also carries a tensor or an error",
        ),
        (
            Frame(
                session_id="s",
                layer=0,
                direction=Frame.CONTROL,
                src=1,
                dst=0,
                sub_channel=17,
                control=vote_message(),
            ),  # fmt: skip
            "unknown frame sub-channel 17",
        ),
    ],
)
def test_malformed_control_frames_are_refused(frame: peer_pb2.Frame, why: str) -> None:
    reason = check_incoming(frame, 0, 3, 4)
    assert reason is not None and why in reason, reason
    # the same frame through a transport: refused on arrival, the sender told why
    with InProcessHub(3, num_layers=4) as hub:
        with pytest.raises(TransportError, match="refused a frame"):
            hub[1].send(frame)
        assert any(why in e for e in hub[0].errors), list(hub[0].errors)
        assert hub[0].mailbox.pending == 0


def test_well_formed_control_frames_are_accepted() -> None:
    for c in (vote_message(), abort_message(2, "x"), selection_message(torch.tensor([0, 4]))):
        assert check_incoming(_control_frame(c), 0, 3, 4) is None


def test_selection_out_of_range_is_refused_naming_the_sender() -> None:
    assert decode_selection(selection_message(torch.tensor([1, 4])), channels=5).tolist() == [1, 4]
    with pytest.raises(WireError, match="channel 5, out of range for a slice of 5 channels"):
        decode_selection(selection_message(torch.tensor([1, 5])), channels=5)
    with pytest.raises(WireError, match="expected a channel selection, got vote"):
        decode_selection(vote_message(), channels=5)
    with InProcessHub(2, num_layers=4) as hub:
        io0 = StepIO(hub[0], "run/s0", 0, time.monotonic() + 5.0, 5.0)
        io1 = StepIO(hub[1], "run/s0", 0, time.monotonic() + 5.0, 5.0)
        io1.send_selection(2, 0, torch.tensor([0, 7]))
        with pytest.raises(PeerFailure, match="out of range") as e:
            io0.recv_selection(2, 1, channels=5)
        assert e.value.peer == 1


# ---- aborts: a typed failed node, pushed to waiting nodes ---------------------------------


def test_abort_names_the_failed_node_from_the_typed_field() -> None:
    """The failed node comes from ``Abort.failed_node``, never from the cause's text."""
    with InProcessHub(3, num_layers=4) as hub:
        sent: list[peer_pb2.Frame] = []
        send = hub[1].send

        def spy(frame: peer_pb2.Frame) -> None:
            sent.append(frame)
            send(frame)

        hub[1].send = spy  # type: ignore[method-assign]
        io2 = StepIO(hub[2], "run/s3", 3, time.monotonic() + 5.0, 5.0)
        io1 = StepIO(hub[1], "run/s3", 3, time.monotonic() + 5.0, 5.0)
        io1.broadcast_abort(0, "[failed node 2] a cause that looks like the old text format")
        with pytest.raises(PeerFailure) as e:
            io2.recv(1, 1, direction=Frame.FORWARD)
        assert e.value.peer == 0
        assert "looks like the old text format" in str(e.value)
        assert len(sent) == 2  # one abort per peer, once
        for f in sent:
            assert f.direction == Frame.CONTROL and f.sub_channel == ABORT and not f.error
            assert f.control.WhichOneof("body") == "abort" and f.control.abort.failed_node == 0


def test_trainer_abort_frames_are_typed() -> None:
    """A node failing in its backward pass: its abort frames carry ``failed_node`` typed, and
    every node's StepAborted names it."""
    from disco_fl.runtime.training import StepAborted
    from tests.test_training_distributed import _partition, _run, _trainers

    pm, batches = _partition("user", 3, 0.6)
    with InProcessHub(3, num_layers=len(pm.program.ops)) as hub:
        frames: list[peer_pb2.Frame] = []
        transmit = hub[1]._transmit

        def spy(frame: peer_pb2.Frame, size: int) -> None:
            frames.append(frame)
            transmit(frame, size)

        hub[1]._transmit = spy  # type: ignore[method-assign]
        trainers = _trainers(pm, list(hub), "sgd", "hard", 0.0, timeout=10.0)
        victim = next(p for p in pm.shard(1).ops.parameters() if p.dim() == 4)

        def boom(g: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("injected failure")

        victim.register_hook(boom)
        _, errors = _run(trainers, batches, range(1))
    assert all(isinstance(e, StepAborted) and e.failed_node == 1 for e in errors), errors
    aborts = [f for f in frames if f.sub_channel == ABORT]
    assert sorted(f.dst for f in aborts) == [0, 2]
    assert all(f.control.abort.failed_node == 1 and not f.error for f in aborts)
    assert all("injected failure" in f.control.abort.cause for f in aborts)


def test_abort_wakes_a_waiting_node_at_once() -> None:
    """An abort arriving while a node waits for a frame wakes it at once: no 50 ms polling
    (the old design looked for aborts every 50 ms, so it learned of this one ~40 ms late)."""
    lags: list[float] = []
    for trial in range(7):
        with InProcessHub(2, num_layers=4) as hub:
            sid = f"run/s{trial}"
            waiter = StepIO(hub[0], sid, trial, time.monotonic() + 10.0, 10.0)
            sender = StepIO(hub[1], sid, trial, time.monotonic() + 10.0, 10.0)
            woke: list[float] = []

            def wait(io: StepIO = waiter, out: list[float] = woke) -> None:
                with pytest.raises(PeerFailure):
                    io.recv(1, 1, direction=Frame.FORWARD)
                out.append(time.monotonic())

            th = threading.Thread(target=wait)
            th.start()
            time.sleep(0.01)  # the waiter is waiting
            t0 = time.monotonic()
            sender.broadcast_abort(1, "gone")
            th.join(5.0)
            assert woke, "the waiting node never learned of the abort"
            lags.append(woke[0] - t0)
    # a pushed abort takes well under a millisecond here; allow a loaded machine's scheduler
    assert statistics.median(lags) < 0.02, lags


# ---- protocol version and round at the handshake ----------------------------------------


@pytest.fixture
def node1() -> Iterator[GrpcTransport]:
    t = GrpcTransport(
        1, 2, plan_hash="p" * 64, num_layers=4, household_token="tok", training_round=3
    )
    try:
        yield t
    finally:
        t.close(1.0)


def test_old_protocol_peer_is_refused(node1: GrpcTransport) -> None:
    old = peer_pb2.Hello(plan_hash="p" * 64, node=0, household_token="tok", expected_node=1)
    with grpc.insecure_channel(node1.address) as ch:
        stub = peer_pb2_grpc.PeerStub(ch)
        with pytest.raises(grpc.RpcError) as e:  # version 1 sent no version (it reads 0)
            stub.Handshake(old, timeout=5.0)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "speaks disco peer protocol 1" in e.value.details()
        assert f"this node speaks {PROTOCOL_VERSION}" in e.value.details()
        # and an Exchange stream without the protocol metadata
        md = [
            ("disco-plan-hash", "p" * 64),
            ("disco-node", "0"),
            ("disco-expected-node", "1"),
            ("disco-token", "tok"),
            ("disco-round", "3"),
        ]
        call = stub.Exchange(iter(()), metadata=md, timeout=5.0)
        with pytest.raises(grpc.RpcError) as e2:
            list(call)
        assert e2.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "speaks disco peer protocol 1" in e2.value.details()
        new = peer_pb2.Hello(plan_hash="p" * 64, node=0, household_token="tok", expected_node=1,
                             protocol_version=PROTOCOL_VERSION, round=3)  # fmt: skip
        reply = stub.Handshake(new, timeout=5.0)
        assert reply.protocol_version == PROTOCOL_VERSION and reply.round == 3


class _OldPeer(peer_pb2_grpc.PeerServicer):
    """A node of protocol version 1: its HelloReply states no version."""

    def Handshake(self, request: peer_pb2.Hello, context: object) -> peer_pb2.HelloReply:
        return peer_pb2.HelloReply(plan_hash=request.plan_hash, node=1)


def test_new_node_refuses_an_old_peer_that_answers() -> None:
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    peer_pb2_grpc.add_PeerServicer_to_server(_OldPeer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    t = GrpcTransport(0, 2, plan_hash="p" * 64, num_layers=4, connect_timeout=5.0)
    try:
        t.set_peers([t.address, f"127.0.0.1:{port}"])
        with pytest.raises(HandshakeError, match="speaks disco peer protocol 1"):
            t.connect()
    finally:
        t.close(1.0)
        server.stop(0)


def test_peer_of_another_round_is_refused(node1: GrpcTransport) -> None:
    t = GrpcTransport(
        0, 2, plan_hash="p" * 64, num_layers=4, household_token="tok", training_round=2
    )
    try:
        t.set_peers([t.address, node1.address])
        with pytest.raises(HandshakeError, match="the caller is in round 2, this node in round 3"):
            t.connect()
    finally:
        t.close(1.0)
