"""System-level checks of model families captured with ``torch.export`` (issue 15).

- Runtime over real gRPC servers on loopback (one per node, as ``tests/test_runtime_local.py``)
  and over real ``disco-fl serve`` processes (as ``tests/test_serve.py``) == the emulation for
  torchvision's LR-ASPP segmentation model (random sparse hard masks, N = 2), its
  ``OrderedDict`` output rebuilt from the runtime's output tensor; the same (gRPC servers and
  ``disco-fl serve`` processes) for a small Swin transformer (shifted windows, relative
  position bias).
- Joint training over the peer channel == the emulation after k steps, and DP with noise 0
  == Opacus, for a small ConvNeXt-style network built from torchvision's own ``CNBlock``
  (depthwise 7x7 conv, channels-last LayerNorm, permutes, layer scale, stochastic depth);
  joint training == the emulation for a dense-prediction model with per-pixel labels.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import disco_fl
from disco_fl.emulation.export import load_shard, run_shards
from disco_fl.partition.outputs import restore_output
from disco_fl.runtime.inference import run_node
from disco_fl.runtime.transport.grpc_transport import GrpcTransport
from tests.conftest import import_torchvision, run_nodes
from tests.test_runtime_local import Household, _counted_payload, _expected_payload
from tests.test_serve import Household as ServeHousehold
from tests.test_serve import _expected_payload as _serve_expected
from tests.test_serve import _payload as _serve_payload
from tests.test_shards import _random_masks
from tests.test_training_distributed import (
    _assert_shards_equal,
    _dp_distributed_grads,
    _emulate,
    _optimizer,
    _run,
    _same_snapshot,
    _snapshot,
    _trainers,
)

# ---- runtime over gRPC == emulation -------------------------------------------------------


@pytest.fixture
def grpc_nodes() -> Iterator[Any]:
    """Factory of N connected gRPC transports (a server per node on loopback)."""
    made: list[GrpcTransport] = []

    def make(n: int, plan_hash: str, num_layers: int) -> list[GrpcTransport]:
        ts = [
            GrpcTransport(k, n, plan_hash=plan_hash, num_layers=num_layers, household_token="t")
            for k in range(n)
        ]
        made.extend(ts)
        for t in ts:
            t.set_peers([u.address for u in ts])
        return ts

    yield make
    closers = [threading.Thread(target=t.close, args=(2.0,), daemon=True) for t in made]
    for c in closers:
        c.start()
    for c in closers:
        c.join(10.0)
    assert all(t.closed for t in made)


def _runtime_equals_emulation(
    model: nn.Module, x: torch.Tensor, n: int, tmp_path: Path, make: Any
) -> None:
    """Random sparse hard masks; the exported shards run over gRPC, one thread per node; the
    requester's output (the model's structure restored) equals the emulation within 1e-5 of
    its scale, the payload bytes equal the plan's."""
    pm = disco_fl.partition(model, n, x, capture="export").eval()
    _random_masks(pm, 0.35, seed=n)
    with torch.no_grad():
        want = pm(x)
        assert not torch.allclose(_leaf(want), _leaf(model(x)), atol=1e-4)  # masks matter
    pm.export(tmp_path)
    nodes = [load_shard(tmp_path / "plan.json", k) for k in range(n)]
    plan = nodes[0].plan
    ts = make(n, plan.hash, len(plan.program.ops))

    def go(k: int) -> Any:
        inp = x if k == plan.program.requester else None
        return run_node(nodes[k], ts[k], inp, session_id="zoo", timeout=60.0)

    outs = run_nodes(go, n, timeout=90.0)
    assert all(o is None for k, o in enumerate(outs) if k != plan.program.requester)
    got = restore_output(plan.program, outs[plan.program.requester])
    assert type(got) is type(want) and _keys(got) == _keys(want)
    scale = float(_leaf(want).abs().max())
    err = float((_leaf(got) - _leaf(want)).abs().max())
    assert _leaf(got).shape == _leaf(want).shape and err <= 1e-5 * scale, err / scale
    # == shard-only execution; not bit for bit: the nodes here compute at the same time in one
    # process, and two threads sharing the OpenMP pool may split a large convolution's sums
    # differently (seen once under heavy load), so within 1e-6 of the output's scale
    shards = _leaf(run_shards(nodes, x))
    assert float((_leaf(got) - shards).abs().max()) <= 1e-6 * scale
    assert _counted_payload(ts) == _expected_payload(Household(nodes, x, _leaf(want)))
    for t in ts:
        assert not t.errors, list(t.errors)


def _leaf(y: Any) -> torch.Tensor:
    return y["out"] if isinstance(y, dict) else y


def _keys(y: Any) -> list[str] | None:
    return list(y) if isinstance(y, dict) else None


def test_grpc_runtime_equals_emulation_segmentation(tmp_path: Path, grpc_nodes: Any) -> None:
    """torchvision's LR-ASPP (MobileNetV3-Large backbone: SE blocks, hardswish, dilated
    depthwise convs, a pooled attention branch, bilinear upsampling), 32 px, N = 2."""
    tv = import_torchvision()
    torch.manual_seed(0)
    model = tv.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)
    _randomize_bn(model.eval())
    x = torch.randn(1, 3, 32, 32)
    _runtime_equals_emulation(model, x, 2, tmp_path, grpc_nodes)


@pytest.fixture
def serve_household(tmp_path: Path) -> Iterator[Callable[[Path, int], ServeHousehold]]:
    """``disco-fl serve`` processes of a plan (``tests/test_serve.py``); stopped at the end."""
    made: list[ServeHousehold] = []

    def start(plan_dir: Path, n: int) -> ServeHousehold:
        work = tmp_path / f"hh{len(made)}"
        work.mkdir()
        made.append(ServeHousehold(plan_dir, n, work, []))
        return made[-1]

    yield start
    for hh in made:
        hh.stop()


def _serve_equals_emulation(
    model: nn.Module,
    x: torch.Tensor,
    tmp_path: Path,
    serve_household: Callable[[Path, int], ServeHousehold],
) -> None:
    """``model``'s plan (N = 2, random sparse masks) served by two real ``disco-fl serve``
    processes (each loads only its shard; no torchvision there), queried with
    ``InferenceSession``: == the emulation, payload bytes counted by each process == the
    plan's."""
    from disco_fl.partition.plan import Plan
    from disco_fl.runtime.serving import InferenceSession

    pm = disco_fl.partition(model, 2, x, capture="export").eval()
    _random_masks(pm, 0.35, seed=2)
    pm.export(tmp_path / "plan")
    plan = Plan.load(tmp_path / "plan" / "plan.json")
    with torch.no_grad():
        want = pm(x)
    hh = serve_household(tmp_path / "plan", 2)
    with InferenceSession(hh.addrs[0]) as s:
        got = restore_output(plan.program, s.infer(x))
    assert type(got) is type(want) and _keys(got) == _keys(want)
    assert _leaf(got).shape == _leaf(want).shape
    scale = float(_leaf(want).abs().max())
    assert float((_leaf(got) - _leaf(want)).abs().max()) <= 1e-5 * scale
    counted = {**_serve_payload(hh.addrs[0], 0), **_serve_payload(hh.addrs[1], 1)}
    assert counted == _serve_expected(plan, x.shape[0])


def test_serve_processes_equal_emulation_segmentation(
    tmp_path: Path, serve_household: Callable[[Path, int], ServeHousehold]
) -> None:
    """LR-ASPP (dict output ``{"out": ...}``) over two ``disco-fl serve`` processes."""
    tv = import_torchvision()
    torch.manual_seed(0)
    model = tv.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)
    _randomize_bn(model.eval())
    _serve_equals_emulation(model, torch.randn(1, 3, 32, 32), tmp_path, serve_household)


def _small_swin() -> nn.Module:
    """torchvision's Swin transformer (shifted windows, relative position bias, patch
    merging) at a small width and depth."""
    tv = import_torchvision()
    torch.manual_seed(0)
    swin = tv.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=[4, 4],
        stochastic_depth_prob=0.0,
        num_classes=10,
    )
    return swin.eval()


def test_grpc_runtime_equals_emulation_swin(tmp_path: Path, grpc_nodes: Any) -> None:
    _runtime_equals_emulation(_small_swin(), torch.randn(1, 3, 32, 32), 2, tmp_path, grpc_nodes)


def test_serve_processes_equal_emulation_swin(
    tmp_path: Path, serve_household: Callable[[Path, int], ServeHousehold]
) -> None:
    """A windowed transformer (shifted windows, relative position bias) over two real
    ``disco-fl serve`` processes."""
    _serve_equals_emulation(_small_swin(), torch.randn(1, 3, 32, 32), tmp_path, serve_household)


def _randomize_bn(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial BatchNorm statistics, so that equality can fail."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


# ---- joint training == emulation; DP == Opacus ------------------------------------------


class TinyConvNeXt(nn.Module):
    """ConvNeXt at a small width from torchvision's own blocks: patchify stem, ``LayerNorm2d``,
    two ``CNBlock`` stages (depthwise 7x7 conv, permute to channels last, LayerNorm, MLP,
    permute back, layer scale, stochastic depth) with a downsampling layer between them, a
    squeeze-excitation (``torchvision.ops.SqueezeExcitation``), pooled head."""

    def __init__(self, classes: int = 10, drop_path: float = 0.0) -> None:
        super().__init__()
        tv = import_torchvision()
        from torchvision.models.convnext import CNBlock, LayerNorm2d
        from torchvision.ops.misc import SqueezeExcitation

        assert tv.models.convnext.CNBlock is CNBlock
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 2, stride=2), LayerNorm2d(12))
        self.stage1 = CNBlock(12, 0.5, drop_path)
        self.down = nn.Sequential(LayerNorm2d(12), nn.Conv2d(12, 16, 2, stride=2))
        self.stage2 = CNBlock(16, 0.5, drop_path)
        self.se = SqueezeExcitation(16, 4)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stage1(self.stem(x))
        return self.head(self.se(self.stage2(self.down(h))))


def _contiguous_ln2d() -> type[nn.Module]:
    from torchvision.models.convnext import LayerNorm2d

    class ContiguousLayerNorm2d(LayerNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).contiguous()

    return ContiguousLayerNorm2d


STEPS = 3
CN_SHAPE = (2, 3, 16, 16)


def _tiny_convnext(seed: int = 0, drop_path: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyConvNeXt(drop_path=drop_path)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial LayerNorm affines
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def _cn_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [
        (torch.randn(4, *CN_SHAPE[1:], generator=g), torch.randint(0, 10, (4,), generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    ("n", "opt_kind", "mode", "wire", "drop"),
    [
        (2, "sgd", "hard", "grpc", 0.0),
        (2, "adam", "hard", "inprocess", 0.0),
        (3, "sgd", "stochastic", "inprocess", 0.0),
        (2, "sgd", "hard", "inprocess", 0.5),
        (3, "sgd", "stochastic", "inprocess", 0.5),
    ],
)
def test_convnext_joint_training_equals_emulation(
    n: int, opt_kind: str, mode: str, wire: str, drop: float, grpc_nodes: Any
) -> None:
    """Every node trains its shard over the peer channel (gRPC servers on loopback, or the
    in-process transport); after k steps every shard tensor (weights, layer scales, gate
    logits) equals the emulation trained in one process. With stochastic depth (``drop``)
    every node drops the same samples as the emulation (seeded by gate_seed and the step)."""
    from disco_fl.core.gates import gate_generator
    from disco_fl.partition.ops_drop import drop_path_mask
    from disco_fl.runtime.transport import InProcessHub

    model = _tiny_convnext(drop_path=drop)
    pm = disco_fl.partition(model, n, torch.randn(*CN_SHAPE), capture="export")
    pm.train()
    assert {"param", "layer_norm", "permute"} <= {op.kind for op in pm.program.ops}
    drops = [i for i, op in enumerate(pm.program.ops) if op.kind == "drop_path"]
    assert [pm.program.ops[i].attrs["p"] for i in drops] == [drop, drop]
    if drop:  # the steps drop some samples' residual and keep others (seed 7 as _emulate)
        x4 = torch.zeros(4, 1)
        masks = [
            drop_path_mask(x4, drop, "row", True, gate_generator(7, t, i, -1, -1))
            for t in range(STEPS)
            for i in drops
        ]
        assert set(torch.cat(masks).flatten().tolist()) == {0.0, 2.0}
    _random_masks(pm, 0.6, seed=n)
    batches = _cn_batches(STEPS)
    ref = copy.deepcopy(pm)
    before = _snapshot(pm)
    penalty = 0.5 if mode == "stochastic" else 0.0
    _emulate(ref, batches, opt_kind, mode, range(STEPS), penalty)
    layers = len(pm.program.ops)
    if wire == "grpc":
        trainers = _trainers(pm, grpc_nodes(n, "train", layers), opt_kind, mode, penalty)
        _, errors = _run(trainers, batches, range(STEPS))
    else:
        with InProcessHub(n, num_layers=layers) as hub:
            trainers = _trainers(pm, list(hub), opt_kind, mode, penalty)
            _, errors = _run(trainers, batches, range(STEPS))
    assert errors == [None] * n
    assert not _same_snapshot(before, _snapshot(pm))  # it trained
    _assert_shards_equal(pm, ref)


@pytest.mark.parametrize("n", [2, 3])
def test_convnext_dp_noise_zero_equals_opacus(n: int) -> None:
    """One distributed DP step (noise 0, whole-model clipping with some samples clipped) applies
    exactly the gradient of Opacus's ``make_private`` on the same model in one process
    (Opacus: its grad samplers for Conv2d / Linear, functorch for ``LayerNorm2d``, the blocks'
    layer scales and the rest)."""
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    from disco_fl.runtime.training.dp import DPConfig

    model = _tiny_convnext()
    assert ModuleValidator.validate(model, strict=False) == []
    dense = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    batch = 8
    x = torch.randn(batch, *CN_SHAPE[1:], generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    clip = 1.4  # per-sample norms 1.22 ... 1.49: some clipped
    pm = disco_fl.partition(model, n, x[:2], capture="export").train()
    cfg = DPConfig(
        dataset_sizes={0: 800}, max_grad_norm=clip, noise_multiplier=0.0, batch_size=batch
    )
    grads, results = _dp_distributed_grads(pm, (x, y, cfg))
    info = results[0].dp
    assert info is not None and 0.0 < info.clipped_fraction < 1.0, info
    # Opacus 1.6 computes wrong per-sample gradients for a Conv2d whose input is strided
    # channels-last, as LayerNorm2d's output is (permute, layer_norm, permute): here the
    # downsampling conv's, off by up to 0.1. The same function with LayerNorm2d's output made
    # contiguous gets the per-sample gradients of one backward per sample.
    contiguous = _contiguous_ln2d()
    for m in dense.modules():
        if type(m).__name__ == "LayerNorm2d":
            m.__class__ = contiguous
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    opt = torch.optim.SGD(dense.parameters(), lr=1.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    dm, opt, loader = PrivacyEngine().make_private(
        module=dense,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        poisson_sampling=False,
    )
    for xb, yb in loader:
        opt.zero_grad()
        F.cross_entropy(dm(xb), yb).backward()
        opt.step()
    assert all(getattr(p, "grad_sample", None) is not None for p in dense.parameters())
    applied = {k: before[k] - v for k, v in dense.state_dict().items()}
    gref = _tiny_convnext()  # the model holding Opacus's applied gradient
    gref.load_state_dict(applied)
    ref = disco_fl.partition(gref, n, x[:2], capture="export")  # cut like the weights
    checked = 0
    for k in range(n):
        want = ref.shard(k).state_dict()
        assert {key for key in want if "gates" not in key} == set(grads[k])
        for key, got in grads[k].items():
            err = float((got - want[key]).abs().max())
            assert err <= 1e-5, f"node {k} {key}: {err:.3g}"
            checked += int(float(want[key].abs().max()) > 1e-4)
    assert checked > 10  # the comparison is not between zeros


def test_stochastic_depth_is_captured_by_the_export_capture() -> None:
    """torchvision's ``StochasticDepth`` is its identity in eval mode, where the export runs;
    the capture keeps it as a ``drop_path`` op (the identity at eval, per-sample drops in
    training) and leaves the user's modules as they were."""
    import warnings

    x = torch.randn(*CN_SHAPE)
    model = _tiny_convnext(drop_path=0.1).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm = disco_fl.partition(model, 2, x, capture="export")
    assert model.training
    assert all("forward" not in m.__dict__ for m in model.modules())
    drops = [op for op in pm.program.ops if op.kind == "drop_path"]
    assert [op.attrs for op in drops] == [{"p": 0.1, "mode": "row", "scale": True}] * 2
    model.eval()
    with torch.no_grad():
        assert float((pm.eval()(x) - model(x)).abs().max()) <= 1e-5
        pm.train()
        pm.gate_seed = 0
        assert torch.equal(pm(x), pm(x))  # same seed and step: the same samples dropped
        outs = []
        for step in range(8):
            pm.gate_step = step
            outs.append(pm(x))
        assert not all(torch.equal(o, outs[0]) for o in outs)  # the draws differ by step
        assert not torch.equal(outs[0], pm.eval()(x))  # training scales kept paths by 1/0.9


@pytest.mark.parametrize("n", [2, 3])
def test_segmentation_joint_training_equals_emulation(n: int) -> None:
    """A dense-prediction model (tests/test_capture_export.py's SegNet: squeeze-excitation,
    pixel (un)shuffle, transposed conv, padding, bilinear resizing, ``{"out": y}``) trained
    for k steps with per-pixel labels: every node over the in-process peer channel == the
    emulation (whose output is the model's dict)."""
    from disco_fl.runtime.transport import InProcessHub
    from tests.test_capture_export import SegNet

    torch.manual_seed(0)
    pm = disco_fl.partition(SegNet(), n, torch.randn(2, 3, 16, 16), capture="export").train()
    _random_masks(pm, 0.6, seed=n)
    g = torch.Generator().manual_seed(5)
    batches = [
        (torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4, 16, 16), generator=g))
        for _ in range(STEPS)
    ]
    ref = copy.deepcopy(pm)
    before = _snapshot(pm)
    ref.gate_mode = "hard"  # type: ignore[assignment]
    opt = _optimizer("sgd", list(ref.shards))
    for x, y in batches:
        loss = F.cross_entropy(ref(x)["out"], y)  # per pixel
        opt.zero_grad()
        loss.backward()
        opt.step()
    with InProcessHub(n, num_layers=len(pm.program.ops)) as hub:
        trainers = _trainers(pm, list(hub), "sgd", "hard", 0.0)
        results, errors = _run(trainers, batches, range(STEPS))
    assert errors == [None] * n
    assert not _same_snapshot(before, _snapshot(pm))
    _assert_shards_equal(pm, ref)
    assert all(r.loss is not None and r.loss > 0 for r in results[0])
