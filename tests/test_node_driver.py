"""The one node driver (disco_fl.node): sans-IO events, its message check, its deadline, and
the lock-step execution that the emulation and shard-only execution run on it."""

from __future__ import annotations

import ctypes
import threading
import time
from pathlib import Path

import pytest
import torch

import disco_fl
from disco_fl.emulation.export import ExportedShard, load_shard, run_shards
from disco_fl.models import vit_tiny_mnist
from disco_fl.node import TURN, Executor, MessageError, Recv, Send, drive, run_lockstep, schedule
from disco_fl.partition import plan_open_count
from tests.zoo import ZOO


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[ExportedShard], torch.Tensor]:
    torch.manual_seed(0)
    model = ZOO["resnet_narrow"][0]().eval()
    x = torch.randn(3, 1, 28, 28)
    pm = disco_fl.partition(model, 2, x).eval()
    g = torch.Generator().manual_seed(1)
    for _, _, d, gates in pm.gate_items():
        gates.set_mask(d, (torch.rand(gates.num_channels, generator=g) < 0.4).float())
    out = tmp_path_factory.mktemp("driver")
    pm.export(out)
    return [load_shard(out / "plan.json", k) for k in range(2)], x


def _drivers(nodes: list[ExportedShard], x: torch.Tensor, **kw: object) -> list:
    plan = nodes[0].plan
    return [
        drive(
            schedule(plan.program, k, plan_open_count(plan), plan.codec),
            Executor(plan.program, nodes[k]),
            x,
            **kw,  # type: ignore[arg-type]
        )
        for k in range(len(nodes))
    ]


def test_events_follow_the_schedule_and_give_the_emulation_result(shards) -> None:
    nodes, x = shards
    plan = nodes[0].plan
    steps = [schedule(plan.program, k, plan_open_count(plan), plan.codec) for k in range(2)]
    runs = _drivers(nodes, x)
    mail: dict[tuple[int, int, int], torch.Tensor] = {}
    sent: list[tuple[int, int, int]] = []
    results: list[object] = [None, None]
    pending: list[object] = [next(r) for r in runs]
    done = [False, False]
    for _ in range(10_000):  # bounded: two nodes of a small program
        if all(done):
            break
        for k in range(2):
            ev = pending[k]
            try:
                while not done[k]:
                    if isinstance(ev, Send):
                        assert ev.dest in ev.step.out_to and ev.step.node == k
                        sent.append((ev.step.layer, k, ev.dest))
                        mail[(ev.step.layer, k, ev.dest)] = ev.tensor
                        ev = next(runs[k])
                    elif isinstance(ev, Recv):
                        key = (ev.step.layer, ev.src, k)
                        if key not in mail:
                            break
                        ev = runs[k].send(mail.pop(key))
                    else:
                        ev = next(runs[k])
            except StopIteration as stop:
                results[k], done[k] = stop.value, True
            pending[k] = ev
    assert all(done) and not mail
    # every message the schedules announce was sent once, and nothing else
    announced = sorted((s.layer, s.node, d) for st in steps for s in st for d in s.out_to)
    assert sorted(sent) == announced
    out = results[plan.program.requester]
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, run_shards(nodes, x, overlap=False))


def test_a_message_of_the_wrong_shape_is_refused_naming_layer_and_sender(shards) -> None:
    nodes, x = shards
    k = 1 - nodes[0].plan.program.requester  # the node that receives the input first
    run = _drivers(nodes, x)[k]
    ev = next(run)
    while not isinstance(ev, Recv):
        ev = next(run)
    wrong = torch.zeros(3, 28, 28)  # the input without its channel dim
    with pytest.raises(MessageError, match=rf"layer {ev.step.layer} .* from node {ev.src}"):
        run.send(wrong)


def test_the_deadline_is_checked_before_every_op(shards) -> None:
    nodes, x = shards
    requester = nodes[0].plan.program.requester
    run = _drivers(nodes, x, deadline=time.monotonic() + 3600)[requester]
    assert isinstance(next(run), Send)  # the input goes out first
    late = _drivers(nodes, x, deadline=time.monotonic() - 1)[requester]
    with pytest.raises(TimeoutError, match="passed while computing, before layer 0"):
        next(late)


def test_a_thread_that_drives_computes_on_the_process_torch_thread_count(shards) -> None:
    # torch.set_num_threads reaches OpenMP only in the calling thread: a thread started later
    # (a node's event loop) computed on every core (pytorch/pytorch#37259)
    omp_threads = ctypes.CDLL(None).omp_get_max_threads  # the OpenMP that torch loaded
    nodes, x = shards
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    seen: list[int] = []

    def work() -> None:
        next(_drivers(nodes, x)[nodes[0].plan.program.requester])
        seen.append(omp_threads())

    try:
        t = threading.Thread(target=work)
        t.start()
        t.join(60)
    finally:
        torch.set_num_threads(before)
    assert seen == [1]  # (without the driver's setting: OpenMP's default, the core count)


class _Mute(ExportedShard):
    """A node whose exchanges send nothing, whatever the plan says."""

    def send_selection(self, op, dest):  # type: ignore[no-untyped-def]
        return None


def test_sends_that_differ_from_the_schedule_are_refused(shards) -> None:
    nodes, x = shards
    plan = nodes[0].plan
    nodes[0].__class__ = _Mute  # node 0 drops every exchange message
    try:
        with pytest.raises(RuntimeError, match="the plan's traffic says"):
            run_lockstep(plan.program, nodes, x, plan.codec, open_count=plan_open_count(plan))
    finally:
        nodes[0].__class__ = ExportedShard


def test_one_node_yields_only_turns(tmp_path: Path) -> None:
    x = torch.randn(2, 1, 28, 28)
    model = ZOO["resnet_narrow"][0]().eval()
    disco_fl.partition(model, 1, x).eval().export(tmp_path)
    node = load_shard(tmp_path / "plan.json", 0)
    run = drive(
        schedule(node.program, 0, plan_open_count(node.plan), "fp32"),
        Executor(node.program, node),
        x,
    )
    events = []
    with torch.no_grad():
        try:
            while True:
                events.append(next(run))
        except StopIteration as stop:
            out = stop.value
    assert events == [TURN] * len(node.program.ops)
    with torch.no_grad():
        assert torch.allclose(out, model(x), atol=1e-5)


class _SlowOp(Executor):
    """Computes op ``slow`` 30 ms longer than it takes; ``last``: the op computed last."""

    slow = ""
    last = ""

    def compute(self, step, xs, received):  # type: ignore[no-untyped-def]
        if step.op.name == self.slow:
            time.sleep(0.03)
        self.last = step.op.name
        return super().compute(step, xs, received)


def test_turns_come_after_ops_that_end_turn_after_seconds_after_the_last(tmp_path: Path) -> None:
    """``turn_after``: a TURN only after an op ending that long after the driver's previous
    TURN (a network node's program yields a few events per exchange, not one per op)."""
    x = torch.randn(2, 1, 28, 28)
    model = ZOO["resnet_narrow"][0]().eval()
    disco_fl.partition(model, 1, x).eval().export(tmp_path)
    node = load_shard(tmp_path / "plan.json", 0)
    steps = schedule(node.program, 0, plan_open_count(node.plan), "fp32")
    ex = _SlowOp(node.program, node)
    ex.slow = node.program.ops[len(node.program.ops) // 2].name

    def turned_after(turn_after: float | None) -> list[str]:
        """The op computed last before each TURN."""
        out: list[str] = []
        run = drive(steps, ex, x, turn_after=turn_after)
        with torch.no_grad():
            try:
                while True:
                    assert next(run) == TURN
                    out.append(ex.last)
            except StopIteration as stop:
                assert torch.allclose(stop.value, model(x), atol=1e-5)
        return out

    assert turned_after(None) == []
    assert len(turned_after(0.0)) == len(node.program.ops)
    # the ops before the slow one take far less than 20 ms, those after it too
    assert turned_after(0.02) == [ex.slow]
    assert turned_after(60.0) == []


MODELS = {**ZOO, "vit": (vit_tiny_mnist, (2, 1, 28, 28))}


@pytest.mark.parametrize("name", ["resnet_narrow", "user", "vit"])
@pytest.mark.parametrize("nodes", [2, 3])
def test_overlap_on_equals_off_equals_emulation(name: str, nodes: int, tmp_path: Path) -> None:
    build, shape = MODELS[name]
    torch.manual_seed(nodes)
    model = build().eval()
    x = torch.randn(*shape)
    pm = disco_fl.partition(model, nodes, x).eval()
    g = torch.Generator().manual_seed(nodes)
    for _, _, d, gates in pm.gate_items():
        gates.set_mask(d, (torch.rand(gates.num_channels, generator=g) < 0.5).float())
    with torch.no_grad():
        ref = pm(x)
    pm.export(tmp_path)
    shard_nodes = [load_shard(tmp_path / "plan.json", k) for k in range(nodes)]
    on = run_shards(shard_nodes, x, overlap=True)
    off = run_shards(shard_nodes, x, overlap=False)
    assert torch.allclose(on, off, atol=1e-5, rtol=0), (on - off).abs().max()
    assert torch.allclose(on, ref, atol=1e-5, rtol=0), (on - ref).abs().max()
    assert torch.allclose(off, ref, atol=1e-5, rtol=0), (off - ref).abs().max()


def _recv_after_its_op(nodes: list[ExportedShard], x: torch.Tensor, overlap: bool) -> int:
    """Messages node 0 receives after the op they belong to has ended (i.e. during a reader's
    turn): what overlap defers."""
    plan = nodes[0].plan
    n = len(nodes)
    runs = [
        drive(
            schedule(plan.program, k, plan_open_count(plan), plan.codec),
            Executor(plan.program, nodes[k], overlap=overlap),
            x,
        )
        for k in range(n)
    ]
    mail: dict[tuple[int, int, int], torch.Tensor] = {}
    turns = [0] * n
    late = 0
    pending: list[object] = [next(r) for r in runs]
    done = [False] * n
    with torch.no_grad():
        for _ in range(100_000):
            if all(done):
                break
            for k in range(n):
                ev = pending[k]
                try:
                    while not done[k]:
                        if isinstance(ev, Send):
                            mail[(ev.step.layer, k, ev.dest)] = ev.tensor
                            ev = next(runs[k])
                        elif isinstance(ev, Recv):
                            key = (ev.step.layer, ev.src, k)
                            if key not in mail:
                                break
                            if k == 0 and ev.step.layer < turns[k]:
                                late += 1
                            ev = runs[k].send(mail.pop(key))
                        else:
                            if ev == TURN:
                                turns[k] += 1
                            ev = next(runs[k])
                except StopIteration:
                    done[k] = True
                pending[k] = ev
    assert all(done)
    return late


def test_overlap_receives_exchanged_channels_after_the_own_part(shards) -> None:
    nodes, x = shards
    assert _recv_after_its_op(nodes, x, overlap=False) == 0
    assert _recv_after_its_op(nodes, x, overlap=True) > 0


def test_overlap_accumulates_in_place_without_gradients() -> None:
    """An overlapped mixing layer adds a peer's part into its partial sum in place (batch slice
    by batch slice) when no gradient flows, and out of place when one does; same values."""
    from disco_fl.partition.ops_comm import _accumulate

    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=g)
    part = torch.randn(19, 3, generator=g)  # 19: the slices do not divide the batch
    partial = torch.randn(19, 5, generator=g)
    want = partial + part @ w.T
    with torch.no_grad():
        got = _accumulate(partial.clone(), part, lambda p: p @ w.T)
        buf = partial.clone()
        assert _accumulate(buf, part, lambda p: p @ w.T) is buf  # in place
    torch.testing.assert_close(got, want)
    leaf = partial.clone().requires_grad_()
    out = _accumulate(leaf, part, lambda p: p @ w.T)
    assert out is not leaf and out.grad_fn is not None  # autograd keeps its graph
    torch.testing.assert_close(out.detach(), want)
