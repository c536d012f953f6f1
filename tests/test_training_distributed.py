"""Distributed training: N nodes as threads, each training only its shard over a transport.

After k steps from the same seed and data every shard (weights, buffers, gate logits) equals
the emulation trained in one process with the same optimizer; counted bytes equal the
prediction; a failing node aborts the step everywhere and changes no shard; training resumes
from a checkpoint.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import disco_fl
from disco_fl.core.gates import dropped_nodes
from disco_fl.emulation.model import PartitionedModel
from disco_fl.models import build_model
from disco_fl.runtime.training import (
    NodeTrainer,
    StepAborted,
    StepResult,
    default_param_groups,
    plan_of,
    plan_open_count,
    predict_step_bytes,
)
from disco_fl.runtime.transport import InProcessHub, Transport
from disco_fl.runtime.transport.grpc_transport import GrpcTransport
from tests.test_shards import _random_masks
from tests.zoo import ZOO

STEPS = 3
BATCH = 4
# (weights, gates) learning rates; Adam's are smaller: it turns float noise in near-zero
# gradients into steps of size lr, so its comparison tolerance scales with lr
LRS = {"sgd": (0.05, 0.1), "adam": (0.005, 0.01)}
# Adam's eps. Adam's step is independent of the gradient's scale only where |g| >> eps; below
# that it is about lr * g / eps, so a rounding difference dg between two summation orders
# (~1e-9 here: sums of ~1e-3 terms in fp32) moves a weight by up to lr * dg / eps. With the
# default 1e-8 that is 5e-4 per step, far above the 1e-4 relative tolerance; with 1e-5 it is
# 5e-7. It matters for gradients that are exactly zero in exact arithmetic yet computed as
# rounding noise, e.g. the key bias of attention (softmax ignores the q.b_k added to every
# score of a query), and for entries that happen to be near zero (|g| ~ eps).
ADAM_EPS = 1e-5
JOIN_S = 60.0
# the CNNs of the zoo and the ViT preset (transformer blocks partitioned by heads)
_ZOO: dict[str, tuple[Any, tuple[int, ...]]] = {
    **ZOO,
    "vit": (lambda: build_model("vit_tiny_mnist", dropout=0.0), (2, 1, 28, 28)),
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = _ZOO[name][0]()
    for m in model.modules():
        if isinstance(m, nn.Dropout):  # dropout masks are drawn per node: off for equality
            m.p = 0.0
    if name == "user":
        # a conv bias followed by BatchNorm has a zero true gradient: Adam would amplify float
        # noise in it into lr-sized steps (ResNets have no such bias either)
        model.pw.bias = None  # type: ignore[assignment]
    return model


def _partition(name: str, n: int, p_open: float) -> tuple[PartitionedModel, list[Any]]:
    model = _model(name)
    shape = _ZOO[name][1]
    pm = disco_fl.partition(model, n, torch.randn(*shape)).train()
    _random_masks(pm, p_open, seed=n)
    g = torch.Generator().manual_seed(5)
    batches = [
        (torch.randn(BATCH, *shape[1:], generator=g), torch.randint(0, 10, (BATCH,), generator=g))
        for _ in range(STEPS + 2)
    ]
    return pm, batches


def _optimizer(kind: str, shards: Sequence[nn.Module]) -> torch.optim.Optimizer:
    lr, gate_lr = LRS[kind]
    groups = [g for s in shards for g in default_param_groups(s, lr, gate_lr)]  # type: ignore[arg-type]
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=0.9)
    return torch.optim.Adam(groups, eps=ADAM_EPS)


def _emulate(
    pm: PartitionedModel,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    opt_kind: str,
    mode: str,
    steps: range,
    penalty: float,
    owners: Sequence[int] = (0,),
    rate: float = 0.0,
) -> list[frozenset[int]]:
    """Train the emulation in one process (the reference); ``rate``: node dropout with the
    trainers' draw (``gate_seed`` 7). Returns the nodes dropped at each step."""
    pm.gate_mode = mode  # type: ignore[assignment]
    pm.gate_seed = 7
    # Adam: compare with the lock-step emulation (each node's math, same summation order);
    # the fused one sums differently, and Adam divides by tiny gradients' magnitudes. "auto"
    # is the fused one, or the lock step while dropped nodes share normalization statistics
    pm.execution = "lockstep" if opt_kind == "adam" else "auto"
    opt = _optimizer(opt_kind, list(pm.shards))
    draws = []
    for t in steps:
        pm.gate_step = t
        x, y = batches[t]
        pm.dropped_nodes = dropped_nodes(7, t, pm.num_nodes, rate, pm.program.requester)
        draws.append(pm.dropped_nodes)
        try:
            out = pm(x)
        finally:
            pm.dropped_nodes = frozenset()
        loss = F.cross_entropy(out, y)
        if mode == "stochastic":
            loss = loss + penalty * pm.expected_exchange_fraction()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return draws


def _trainers(
    pm: PartitionedModel,
    transports: Sequence[Transport],
    opt_kind: str,
    mode: str,
    penalty: float,
    **kw: Any,
) -> list[NodeTrainer]:
    plan = plan_of(pm)
    return [
        NodeTrainer(
            pm.shard(k),
            plan,
            transports[k],
            _optimizer(opt_kind, [pm.shard(k)]),
            gate_mode=mode,  # type: ignore[arg-type]
            gate_seed=7,
            gate_penalty=penalty,
            **kw,
        )
        for k in range(pm.num_nodes)
    ]


def run_nodes(n: int, go: Callable[[int], None], join_s: float = JOIN_S) -> None:
    """``go(k)`` for every node k in its own thread; all must finish within ``join_s``."""
    threads = [threading.Thread(target=go, args=(k,), daemon=True) for k in range(n)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + join_s
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
    assert not any(th.is_alive() for th in threads), "a node thread did not finish"


def _run(
    trainers: Sequence[NodeTrainer],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    steps: range,
) -> tuple[list[list[StepResult]], list[BaseException | None]]:
    """Every node in its own thread, stepping through ``steps``; the owner feeds the batch."""
    n = len(trainers)
    results: list[list[StepResult]] = [[] for _ in range(n)]
    errors: list[BaseException | None] = [None] * n

    def go(k: int) -> None:
        tr = trainers[k]
        try:
            for t in steps:
                own = tr.owner_of(t) == k
                x, y = batches[t] if own else (None, None)
                results[k].append(tr.step(t, x, y))
        except BaseException as e:
            errors[k] = e

    run_nodes(n, go)
    return results, errors


def _assert_shards_equal(a: PartitionedModel, b: PartitionedModel, rel: float = 1e-4) -> None:
    for k in range(a.num_nodes):
        sa, sb = a.shard(k).state_dict(), b.shard(k).state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            scale = max(float(sb[key].abs().max()), 1e-6) if sb[key].numel() else 1.0
            err = float((sa[key] - sb[key]).abs().max()) if sa[key].numel() else 0.0
            assert err <= rel * scale, f"node {k} {key}: max diff {err:.3g} (scale {scale:.3g})"


def _snapshot(pm: PartitionedModel) -> list[dict[str, torch.Tensor]]:
    return [
        {k: v.clone() for k, v in pm.shard(j).state_dict().items()} for j in range(pm.num_nodes)
    ]


def _same_snapshot(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return all(torch.equal(x[key], y[key]) for x, y in zip(a, b, strict=True) for key in x)


# ---- equality with the emulation -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "n", "opt_kind", "mode"),
    [
        ("resnet_narrow", 2, "sgd", "hard"),
        ("resnet_narrow", 2, "adam", "hard"),
        ("resnet_narrow", 3, "sgd", "stochastic"),
        ("resnet_narrow", 3, "adam", "hard"),
        ("user", 2, "adam", "hard"),
        ("user", 2, "sgd", "stochastic"),
        ("user", 3, "sgd", "hard"),
        ("user", 3, "adam", "hard"),
        ("vit", 2, "sgd", "hard"),
        ("vit", 2, "adam", "hard"),
        ("vit", 2, "sgd", "stochastic"),
    ],
)
def test_distributed_steps_equal_emulation(name: str, n: int, opt_kind: str, mode: str) -> None:
    pm, batches = _partition(name, n, 0.6)
    ref = copy.deepcopy(pm)
    before = _snapshot(pm)
    penalty = 0.5 if mode == "stochastic" else 0.0
    _emulate(ref, batches, opt_kind, mode, range(STEPS), penalty)
    with InProcessHub(n, num_layers=len(pm.program.ops)) as hub:
        trainers = _trainers(pm, list(hub), opt_kind, mode, penalty)
        results, errors = _run(trainers, batches, range(STEPS))
    assert errors == [None] * n
    assert not _same_snapshot(before, _snapshot(pm))  # it trained
    _assert_shards_equal(pm, ref)
    if mode == "stochastic":  # the gates trained too, and equal the emulation's
        moved = [float((g.log_alpha[str(d)] - 4.0).abs().max()) for _, _, d, g in pm.gate_items()]
        assert max(moved) > 1e-4
    owner_losses = [r.loss for r in results[0]]
    assert all(v is not None for v in owner_losses)
    assert all(r.loss is None for k in range(1, n) for r in results[k])


def test_equality_test_detects_a_wrong_gradient() -> None:
    """The comparison fails when one node's backward is wrong (here: a doubled gradient)."""
    pm, batches = _partition("resnet_narrow", 2, 0.6)
    ref = copy.deepcopy(pm)
    _emulate(ref, batches, "sgd", "hard", range(1), 0.0)
    conv = next(iter(pm.shard(1).ops.values())).weight
    conv.register_hook(lambda g: g * 2.0)
    with InProcessHub(2, num_layers=len(pm.program.ops)) as hub:
        _, errors = _run(_trainers(pm, list(hub), "sgd", "hard", 0.0), batches, range(1))
    assert errors == [None, None]
    with pytest.raises(AssertionError, match="node 1"):
        _assert_shards_equal(pm, ref)


def test_batch_owners_take_turns() -> None:
    """Nodes 0 and 2 own data; steps alternate between them and still equal the emulation."""
    pm, batches = _partition("user", 3, 0.6)
    ref = copy.deepcopy(pm)
    _emulate(ref, batches, "sgd", "hard", range(STEPS), 0.0)
    with InProcessHub(3, num_layers=len(pm.program.ops)) as hub:
        trainers = _trainers(pm, list(hub), "sgd", "hard", 0.0, owners=[2, 0])
        results, errors = _run(trainers, batches, range(STEPS))
    assert errors == [None] * 3
    assert [r.owner for r in results[1]] == [0, 2, 0]
    assert [r.loss is not None for r in results[2]] == [False, True, False]
    _assert_shards_equal(pm, ref)


# ---- communication ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
def test_bytes_counted_equal_predicted_and_shrink(n: int) -> None:
    sent: dict[float, int] = {}
    for p_open in (0.8, 0.3):
        pm, batches = _partition("user", n, p_open)
        plan = plan_of(pm)
        with InProcessHub(n, num_layers=len(pm.program.ops)) as hub:
            results, errors = _run(_trainers(pm, list(hub), "sgd", "hard", 0.0), batches, range(2))
        assert errors == [None] * n
        pred = predict_step_bytes(pm.program, plan_open_count(plan), BATCH)
        for k in range(n):
            for r in results[k]:
                assert (r.forward_bytes, r.backward_bytes) == pred.per_sender[k]
                # a commit vote to the owner (fp32 scalar); the owner answers every peer
                assert r.control_bytes == (4 * (n - 1) if k == 0 else 4)
        step0 = sum(res[0].forward_bytes + res[0].backward_bytes for res in results)
        assert step0 == pred.forward + pred.backward
        sent[p_open] = step0
    assert sent[0.3] < sent[0.8]


# ---- failures, all-or-nothing, resume --------------------------------------------------


def _fail_and_resume(
    n: int, make_transports: Callable[[int, int], list[Transport]], tmp_path: Path
) -> None:
    pm, batches = _partition("resnet_narrow", n, 0.6)
    ref = copy.deepcopy(pm)
    _emulate(ref, batches, "adam", "hard", range(STEPS), 0.0)
    transports = make_transports(n, len(pm.program.ops))
    trainers = _trainers(pm, transports, "adam", "hard", 0.0, timeout=20.0)
    _, errors = _run(trainers, batches, range(1))
    assert errors == [None] * n
    for k, tr in enumerate(trainers):
        tr.save_checkpoint(tmp_path / f"node_{k}.ckpt")
    before = _snapshot(pm)
    opt_before = [copy.deepcopy(tr.optimizer.state_dict()) for tr in trainers]
    # node 1 fails in its backward pass at step 1
    victim = next(p for p in pm.shard(1).ops.parameters() if p.dim() == 4)

    def boom(g: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected failure in backward")

    handle = victim.register_hook(boom)
    _, errors = _run(trainers, batches, range(1, 2))
    handle.remove()
    assert all(isinstance(e, StepAborted) for e in errors), errors
    for k, e in enumerate(errors):
        assert isinstance(e, StepAborted)
        assert e.failed_node == 1 and e.node == k and e.step == 1
        assert "injected failure in backward" in str(e)
        assert "node 1" in str(e)
    assert _same_snapshot(before, _snapshot(pm))  # no shard changed
    for tr, saved in zip(trainers, opt_before, strict=True):
        now = tr.optimizer.state_dict()
        for pid, st in saved["state"].items():
            assert all(torch.equal(v, now["state"][pid][key]) for key, v in st.items())
        assert all(p.grad is None for p in tr.shard.parameters())
    # scramble, then resume every node from its checkpoint and finish the run
    with torch.no_grad():
        for p in pm.parameters():
            p.add_(1.0)
    nxt = [tr.load_checkpoint(tmp_path / f"node_{k}.ckpt") for k, tr in enumerate(trainers)]
    assert nxt == [1] * n
    _, errors = _run(trainers, batches, range(1, STEPS))
    assert errors == [None] * n
    _assert_shards_equal(pm, ref)


def test_failure_aborts_everywhere_and_resume_inprocess(tmp_path: Path) -> None:
    hub = InProcessHub(3)

    def make(n: int, layers: int) -> list[Transport]:
        return list(hub)

    try:
        _fail_and_resume(3, make, tmp_path)
    finally:
        hub.close()


def test_dead_peer_aborts_the_step(tmp_path: Path) -> None:
    """Node 2's transport closes in the middle of its backward pass (the node dies)."""
    pm, batches = _partition("user", 3, 0.6)
    with InProcessHub(3, num_layers=len(pm.program.ops)) as hub:
        trainers = _trainers(pm, list(hub), "sgd", "hard", 0.0, timeout=10.0)
        before = _snapshot(pm)
        victim = next(p for p in pm.shard(2).ops.parameters() if p.dim() == 4)

        def die(g: torch.Tensor) -> torch.Tensor:
            hub[2].close()
            return g

        victim.register_hook(die)
        _, errors = _run(trainers, batches, range(1))
    assert all(isinstance(e, StepAborted) for e in errors), errors
    for k in (0, 1):
        e = errors[k]
        assert isinstance(e, StepAborted) and e.failed_node == 2, e
        assert "node 2" in str(e)
    assert _same_snapshot(before, _snapshot(pm))


def test_bad_batch_on_the_owner_aborts_the_peers_at_once() -> None:
    """The owner refuses its own arguments (labels that do not fit the batch): it says so
    with a ValueError, and its peers, who wait for its input, abort at once naming it
    instead of waiting for the step's deadline."""
    pm, batches = _partition("resnet_narrow", 2, 0.6)
    x, y = batches[0]
    with InProcessHub(2, num_layers=len(pm.program.ops)) as hub:
        trainers = _trainers(pm, list(hub), "sgd", "hard", 0.0, timeout=30.0)
        owner = trainers[0].owner_of(0)
        bad = [(x, y[:-1])]
        t0 = time.monotonic()
        _, errors = _run(trainers, bad, range(1))
        took = time.monotonic() - t0
    assert isinstance(errors[owner], ValueError) and "labels of shape" in str(errors[owner])
    peer = errors[1 - owner]
    assert isinstance(peer, StepAborted) and peer.failed_node == owner, peer
    assert took < 10.0, took  # not the 30 s deadline


def test_checkpoint_of_another_node_is_refused(tmp_path: Path) -> None:
    pm, _ = _partition("resnet_narrow", 2, 0.6)
    with InProcessHub(2) as hub:
        trainers = _trainers(pm, list(hub), "sgd", "hard", 0.0)
        trainers[0].save_checkpoint(tmp_path / "n0.ckpt")
        with pytest.raises(ValueError, match="does not belong to node 1"):
            trainers[1].load_checkpoint(tmp_path / "n0.ckpt")
        (tmp_path / "bad.ckpt").write_bytes(b"garbage")
        with pytest.raises(ValueError, match="cannot read training checkpoint"):
            trainers[0].load_checkpoint(tmp_path / "bad.ckpt")


# ---- gRPC on loopback --------------------------------------------------------------------


@pytest.fixture
def grpc_transports() -> Iterator[Callable[[int, int], list[Transport]]]:
    made: list[GrpcTransport] = []

    def make(n: int, layers: int) -> list[Transport]:
        ts = [GrpcTransport(k, n, plan_hash="train", num_layers=layers) for k in range(n)]
        made.extend(ts)
        for t in ts:
            t.set_peers([u.address for u in ts])
        return list(ts)

    yield make
    closers = [threading.Thread(target=t.close, args=(2.0,), daemon=True) for t in made]
    for c in closers:
        c.start()
    for c in closers:
        c.join(10.0)


def test_grpc_training_equals_emulation_and_resumes(
    grpc_transports: Callable[[int, int], list[Transport]], tmp_path: Path
) -> None:
    _fail_and_resume(2, grpc_transports, tmp_path)


# ---- differential privacy ----------------------------------------------------------------


def _dp_setup(n: int, sigma: float, clip: float) -> tuple[PartitionedModel, nn.Module, Any]:
    from disco_fl.runtime.training.dp import DPConfig, fix_batchnorm
    from tests.zoo import UserNet

    torch.manual_seed(0)
    model = UserNet()
    model.drop.p = 0.0
    model = fix_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    dense = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, 16, 16, generator=g)
    y = torch.randint(0, 11, (8,), generator=g)
    pm = disco_fl.partition(model, n, x[:2]).train()
    cfg = DPConfig(dataset_sizes={0: 800}, max_grad_norm=clip, noise_multiplier=sigma, batch_size=8)
    return pm, dense, (x, y, cfg)


def _dp_distributed_grads(
    pm: PartitionedModel, xy: Any
) -> tuple[list[dict[str, torch.Tensor]], list[StepResult]]:
    """One DP step with SGD(lr=1): the applied gradient of every shard tensor."""
    x, y, cfg = xy
    before = _snapshot(pm)
    plan = plan_of(pm)
    n = pm.num_nodes
    with InProcessHub(n) as hub:
        trainers = [
            NodeTrainer(
                pm.shard(k), plan, hub[k], torch.optim.SGD(pm.shard(k).parameters(), lr=1.0), dp=cfg
            )
            for k in range(n)
        ]
        results, errors = _run(trainers, [(x, y)], range(1))
    assert errors == [None] * n
    after = _snapshot(pm)
    grads = [
        {k: b[k] - a[k] for k in b if "gates" not in k} for b, a in zip(before, after, strict=True)
    ]
    return grads, [res[0] for res in results]


@pytest.mark.parametrize("n", [2, 3])
def test_dp_noise_zero_equals_opacus(n: int) -> None:
    from opacus import PrivacyEngine

    pm, dense, xy = _dp_setup(n, 0.0, 15.0)  # C between per-sample norms: some are clipped
    grads, results = _dp_distributed_grads(pm, xy)
    x, y, _ = xy
    opt = torch.optim.SGD(dense.parameters(), lr=1.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    dm, opt, loader = PrivacyEngine().make_private(
        module=dense,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=15.0,
        poisson_sampling=False,
    )
    start = copy.deepcopy(dm._module)
    for xb, yb in loader:
        opt.zero_grad()
        F.cross_entropy(dm(xb), yb).backward()
        opt.step()
    gmod = copy.deepcopy(start)  # the dense model holding Opacus's applied gradient
    with torch.no_grad():
        for p0, p1, pg in zip(
            start.parameters(), dm._module.parameters(), gmod.parameters(), strict=True
        ):
            pg.copy_(p0 - p1)
    ref = disco_fl.partition(gmod, n, x[:2])  # cut into shards exactly like the weights
    info = results[0].dp
    assert info is not None and 0.0 < info.clipped_fraction < 1.0
    for k in range(n):
        want = ref.shard(k).state_dict()
        for key, got in grads[k].items():
            err = float((got - want[key]).abs().max())
            assert err <= 1e-5, f"node {k} {key}: {err:.3g}"


def test_dp_noise_scale_and_epsilon() -> None:
    sigma, clip = 0.5, 2.0
    pm0, _, xy0 = _dp_setup(3, 0.0, clip)
    g0, _ = _dp_distributed_grads(pm0, xy0)
    pm1, _, xy1 = _dp_setup(3, sigma, clip)
    g1, results = _dp_distributed_grads(pm1, xy1)
    noise = torch.cat([(g1[k][key] - g0[k][key]).flatten() for k in range(3) for key in g0[k]])
    expected = sigma * clip / 8
    assert noise.numel() > 5000
    # std of n normal samples: relative standard error ~ 1/sqrt(2n) < 1%; allow 5%
    assert abs(float(noise.std()) / expected - 1.0) < 0.05
    assert abs(float(noise.mean())) < 5 * expected / noise.numel() ** 0.5
    # every node adds noise to its own coordinates only, from its own generator
    per_node = [torch.cat([(g1[k][key] - g0[k][key]).flatten() for key in g0[k]]) for k in range(3)]
    assert all(abs(float(t.std()) / expected - 1.0) < 0.15 for t in per_node)
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.step(noise_multiplier=sigma, sample_rate=8 / 800)
    info = results[0].dp
    assert info is not None and info.epsilon is not None
    assert info.epsilon == pytest.approx(acc.get_epsilon(delta=1e-5))


def test_dp_refuses_batchnorm_and_calibrates_target_epsilon() -> None:
    from opacus.accountants.utils import get_noise_multiplier

    from disco_fl.runtime.training.dp import DPConfig

    pm, _ = _partition("resnet_narrow", 2, 1.0)
    cfg = DPConfig(dataset_sizes={0: 1000}, target_epsilon=3.0, batch_size=10, planned_steps=50)
    with InProcessHub(2) as hub, pytest.raises(ValueError, match="BatchNorm.*fix_batchnorm"):
        NodeTrainer(pm.shard(0), plan_of(pm), hub[0], torch.optim.SGD(pm.parameters()), dp=cfg)
    want = get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=0.01, steps=50, accountant="rdp"
    )
    assert cfg.resolved_noise_multiplier() == pytest.approx(want)
    with pytest.raises(ValueError, match="exactly one"):
        DPConfig(dataset_sizes={0: 100}, batch_size=10)


# ---- compact weights (hard gates) --------------------------------------------------------


def _closed_columns(trainer: NodeTrainer) -> dict[str, torch.Tensor]:
    """Full-width weight key -> the positions of its closed columns (nonempty)."""
    return {f"ops.{name}.weight": c.closed for name, c in trainer._cols.items() if c.closed.numel()}


@pytest.mark.parametrize(
    ("name", "n", "opt_kind"),
    [
        ("resnet_narrow", 2, "sgd"),
        ("resnet_narrow", 2, "adam"),
        ("resnet_narrow", 3, "adam"),
        ("user", 2, "adam"),
        ("user", 3, "sgd"),
        ("vit", 3, "sgd"),
    ],
)
def test_compact_steps_equal_emulation(name: str, n: int, opt_kind: str) -> None:
    """Compact trainers hold and train only the open columns; after the steps the full-width
    shards equal the emulation's, their closed columns are bit-identical to the start, and the
    trained parameters and optimizer state are exactly the closed columns smaller."""
    pm, batches = _partition(name, n, 0.6)
    ref = copy.deepcopy(pm)
    before = _snapshot(pm)
    full_numel = [sum(p.numel() for p in pm.shard(k).ops.parameters()) for k in range(n)]
    gates_numel = [sum(p.numel() for p in pm.shard(k).gates.parameters()) for k in range(n)]
    pm.gate_mode = "hard"
    _emulate(ref, batches, opt_kind, "hard", range(STEPS), 0.0)
    plan = plan_of(pm)
    with InProcessHub(n, num_layers=len(pm.program.ops)) as hub:
        optimizers = [_optimizer(opt_kind, [pm.shard(k)]) for k in range(n)]
        trainers = [
            NodeTrainer(pm.shard(k), plan, hub[k], optimizers[k], gate_seed=7, compact=True)
            for k in range(n)
        ]
        _, errors = _run(trainers, batches, range(STEPS))
    assert errors == [None] * n
    for k, tr in enumerate(trainers):
        assert tr.compact and tr.shard is pm.shard(k) and tr.optimizer is optimizers[k]
        closed = _closed_columns(tr)
        assert closed, "the masks close channels: some weights are compact"
        # element counts: the compact parameters are the full ones minus the closed columns
        dropped = 0
        for key, cols in closed.items():
            w = before[k][key]
            dropped += w.numel() // w.shape[1] * cols.numel()
            assert tr.shard.state_dict()[key].shape[1] == w.shape[1] - cols.numel()
        assert tr.param_numel() == full_numel[k] + gates_numel[k] - dropped
        assert sum(p.numel() for p in tr.shard.ops.parameters()) == full_numel[k] - dropped
        # the optimizer holds state for the compact parameters only
        trained = {id(p) for p in tr.shard.parameters()}
        assert all(id(p) in trained for p in tr.optimizer.state)
        if opt_kind == "adam":
            state = sum(
                st["exp_avg"].numel() + st["exp_avg_sq"].numel()
                for p, st in tr.optimizer.state.items()
                if p in set(tr.shard.ops.parameters())
            )
            assert state == 2 * (full_numel[k] - dropped)
        full = tr.full_state_dict()
        assert full.keys() == before[k].keys()
        for key, cols in closed.items():  # never trained, bit-identical
            assert torch.equal(
                full[key].index_select(1, cols), before[k][key].index_select(1, cols)
            )
    for k, tr in enumerate(trainers):
        full = tr.full_state_dict()
        want = ref.shard(k).state_dict()
        for key, v in want.items():
            scale = max(float(v.abs().max()), 1e-6) if v.numel() else 1.0
            err = float((full[key] - v).abs().max()) if v.numel() else 0.0
            assert err <= 1e-4 * scale, f"node {k} {key}: max diff {err:.3g}"
    assert not _same_snapshot(before, [tr.full_state_dict() for tr in trainers])  # it trained
    # back to full width: the shards themselves equal the emulation's
    for tr in trainers:
        assert tr.expand() is tr.shard and not tr.compact
    _assert_shards_equal(pm, ref)


def test_compact_equals_full_width_training() -> None:
    """SGD with momentum: compact and full-width trainers agree to float rounding, also after
    ``expand`` (training on at full width from the compact run's optimizer state)."""
    pm, batches = _partition("user", 3, 0.5)
    pm_full = copy.deepcopy(pm)
    with InProcessHub(3, num_layers=len(pm.program.ops)) as hub:
        trainers = _trainers(pm, list(hub), "sgd", "hard", 0.0, compact=True)
        _, errors = _run(trainers, batches, range(2))
        assert errors == [None] * 3
        for tr in trainers:
            tr.expand()
            assert all(
                st["momentum_buffer"].shape == p.shape for p, st in tr.optimizer.state.items()
            )
        _, errors = _run(trainers, batches, range(2, STEPS))
    assert errors == [None] * 3
    with InProcessHub(3, num_layers=len(pm.program.ops)) as hub:
        _, errors = _run(_trainers(pm_full, list(hub), "sgd", "hard", 0.0), batches, range(STEPS))
    assert errors == [None] * 3
    _assert_shards_equal(pm, pm_full, rel=1e-5)


def test_compact_needs_hard_gates() -> None:
    pm, _ = _partition("user", 2, 0.6)
    with InProcessHub(2) as hub, pytest.raises(ValueError, match="compact=True needs"):
        _trainers(pm, list(hub), "sgd", "stochastic", 0.0, compact=True)


def test_compact_abort_and_resume_across_modes(tmp_path: Path) -> None:
    """A compact node fails in its backward: no node changes anything (closed columns
    included). Checkpoints hold the full-width shard: compact trainers resume from them, and
    full-width trainers resume from a compact run's checkpoint (the Adam state widened)."""
    n = 3
    pm, batches = _partition("resnet_narrow", n, 0.6)
    ref = copy.deepcopy(pm)
    _emulate(ref, batches, "adam", "hard", range(STEPS), 0.0)
    plan = plan_of(pm)

    def make(hub: InProcessHub, compact: bool) -> list[NodeTrainer]:
        return [
            NodeTrainer(
                pm.shard(k),
                plan,
                hub[k],
                _optimizer("adam", [pm.shard(k)]),
                gate_seed=7,
                timeout=20.0,
                compact=compact,
            )
            for k in range(n)
        ]

    with InProcessHub(n) as hub:
        trainers = make(hub, True)
        _, errors = _run(trainers, batches, range(1))
        assert errors == [None] * n
        for k, tr in enumerate(trainers):
            tr.save_checkpoint(tmp_path / f"node_{k}.ckpt")
            ckpt = torch.load(tmp_path / f"node_{k}.ckpt", weights_only=False)
            assert ckpt["compact"] is True
            assert {key: v.shape for key, v in ckpt["shard"].items()} == {
                key: v.shape for key, v in ref.shard(k).state_dict().items()
            }
        before = [tr.full_state_dict() for tr in trainers]
        opt_before = [copy.deepcopy(tr.optimizer.state_dict()) for tr in trainers]
        victim = next(p for p in trainers[1].shard.ops.parameters() if p.dim() == 4)

        def boom(g: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("injected failure in backward")

        handle = victim.register_hook(boom)
        _, errors = _run(trainers, batches, range(1, 2))
        handle.remove()
        assert all(isinstance(e, StepAborted) and e.failed_node == 1 for e in errors), errors
        assert _same_snapshot(before, [tr.full_state_dict() for tr in trainers])
        for tr, saved in zip(trainers, opt_before, strict=True):
            now = tr.optimizer.state_dict()
            for pid, st in saved["state"].items():
                assert all(torch.equal(v, now["state"][pid][key]) for key, v in st.items())
        # scramble, resume the compact trainers from their checkpoints and finish one step
        with torch.no_grad():
            for p in pm.parameters():
                p.add_(1.0)
        nxt = [tr.load_checkpoint(tmp_path / f"node_{k}.ckpt") for k, tr in enumerate(trainers)]
        assert nxt == [1] * n
        _, errors = _run(trainers, batches, range(1, 2))
        assert errors == [None] * n
        for k, tr in enumerate(trainers):
            tr.save_checkpoint(tmp_path / f"node_{k}.ckpt")
            tr.expand()
    # full-width trainers (fresh optimizers) resume from the compact checkpoints of step 2
    with InProcessHub(n) as hub:
        trainers = make(hub, False)
        nxt = [tr.load_checkpoint(tmp_path / f"node_{k}.ckpt") for k, tr in enumerate(trainers)]
        assert nxt == [2] * n
        _, errors = _run(trainers, batches, range(2, STEPS))
    assert errors == [None] * n
    _assert_shards_equal(pm, ref)


def test_compact_dp_equals_full_width_dp() -> None:
    """DP with compact weights (closed channels): with noise 0 the applied gradient equals
    the full-width trainer's (closed columns: zero per-sample gradients, so the same norms);
    with noise, the closed columns (unused by the plan) stay unchanged."""
    from tests.test_shards import _random_masks

    def run(sigma: float, compact: bool) -> tuple[list[dict[str, torch.Tensor]], list[Any]]:
        pm, _, xy = _dp_setup(3, sigma, 15.0)
        _random_masks(pm, 0.5, seed=3)
        x, y, cfg = xy
        start = _snapshot(pm)
        plan = plan_of(pm)
        with InProcessHub(3) as hub:
            trainers = [
                NodeTrainer(
                    pm.shard(k),
                    plan,
                    hub[k],
                    torch.optim.SGD(pm.shard(k).parameters(), lr=1.0),
                    dp=cfg,
                    compact=compact,
                )
                for k in range(3)
            ]
            _, errors = _run(trainers, [(x, y)], range(1))
        assert errors == [None] * 3
        grads = [
            {key: s[key] - v for key, v in tr.full_state_dict().items() if "gates" not in key}
            for s, tr in zip(start, trainers, strict=True)
        ]
        return grads, trainers

    g_full, _ = run(0.0, False)
    g_compact, trainers = run(0.0, True)
    assert any(_closed_columns(tr) for tr in trainers)
    for k in range(3):
        for key, g in g_full[k].items():
            err = float((g_compact[k][key] - g).abs().max())
            assert err <= 1e-5, f"node {k} {key}: {err:.3g}"
    g_noisy, trainers = run(0.5, True)
    for k, tr in enumerate(trainers):
        for key, cols in _closed_columns(tr).items():
            assert not bool(g_noisy[k][key].index_select(1, cols).any())
            assert bool(g_noisy[k][key].any())
