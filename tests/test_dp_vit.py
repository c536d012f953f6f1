"""Differential privacy for transformers: the ViT preset (class token, positional embedding:
model tensors used without a batch input) and ``nn.MultiheadAttention``.

With noise 0 the distributed DP step (per-sample gradients per shard, whole-model norms
summed across the household, flat clipping) must apply exactly the gradient Opacus's
``make_private`` computes on the same model in one process, with some samples clipped.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import disco_fl
from disco_fl.models import build_model
from disco_fl.partition.program import Op
from disco_fl.runtime.training.dp import DPConfig, _shared_values
from tests.test_training_distributed import _dp_distributed_grads

BATCH = 8


class _Tokens(nn.Module):
    """The ViT's class token and positional embedding as one module (Opacus computes its
    per-sample gradients with functorch; the other layers use Opacus's own grad samplers)."""

    def __init__(self, cls_token: nn.Parameter, pos_embed: nn.Parameter) -> None:
        super().__init__()
        self.cls_token = cls_token
        self.pos_embed = pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1) + self.pos_embed


class _LayeredViT(nn.Module):
    """The same ViT computation (same parameter tensors), laid out so that no parameter sits
    on the root module: Opacus then hooks every Conv2d / Linear / LayerNorm itself."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.tokens = _Tokens(vit.cls_token, vit.pos_embed)  # type: ignore[arg-type]
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.head = vit.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokens(self.patch_embed(x))
        x = self.norm(self.blocks(x))
        out: torch.Tensor = self.head(x[:, 0])
        return out


class MHAClassifier(nn.Module):
    """Embedding + a learned per-feature shift (a model tensor without a batch input), one
    ``nn.MultiheadAttention`` with a residual, LayerNorm, mean over tokens, head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 12)
        self.shift = nn.Parameter(torch.randn(12))
        self.attn = nn.MultiheadAttention(12, 4, batch_first=True)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.shift  # (B, T, 12)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.norm(h + a).mean(dim=1))


def _vit() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("vit_tiny_mnist", dropout=0.0)
    with torch.no_grad():  # a non-trivial class token (initialised at ~1e-6)
        model.cls_token.normal_(std=0.5)
    return model


def _opacus_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> None:
    """Opacus make_private (noise 0, flat clipping at ``clip``), one step of SGD(lr=1) on the
    whole batch."""
    from opacus import PrivacyEngine

    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    dm, opt, loader = PrivacyEngine().make_private(
        module=model,
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
    # Opacus made every per-sample gradient
    assert all(getattr(p, "grad_sample", None) is not None for p in model.parameters())


def _check(model: nn.Module, opacus_model: nn.Module, x: Any, y: Any, n: int, clip: float) -> None:
    """Distributed DP step on ``model`` at ``n`` nodes == Opacus on ``opacus_model`` (the same
    function; its state_dict keys are ``model``'s, up to a ``tokens.`` prefix) within 1e-5,
    some samples clipped."""
    start = copy.deepcopy(model)
    pm = disco_fl.partition(model, n, x[:2]).train()
    cfg = DPConfig(
        dataset_sizes={0: 800}, max_grad_norm=clip, noise_multiplier=0.0, batch_size=BATCH
    )
    grads, results = _dp_distributed_grads(pm, (x, y, cfg))
    info = results[0].dp
    assert info is not None and 0.0 < info.clipped_fraction < 1.0, info
    before = {k: v.clone() for k, v in opacus_model.state_dict().items()}
    _opacus_step(opacus_model, x, y, clip)
    applied = {
        k.removeprefix("tokens."): before[k] - v for k, v in opacus_model.state_dict().items()
    }
    gref = copy.deepcopy(start)  # the model holding Opacus's applied gradient
    gref.load_state_dict(applied)
    ref = disco_fl.partition(gref, n, x[:2])  # cut into shards exactly like the weights
    checked = 0
    for k in range(n):
        want = ref.shard(k).state_dict()
        assert {key for key in want if "gates" not in key} == set(grads[k])
        for key, got in grads[k].items():
            err = float((got - want[key]).abs().max())
            assert err <= 1e-5, f"node {k} {key}: {err:.3g}"
            checked += int(float(want[key].abs().max()) > 1e-4)
    assert checked > 10  # the comparison is not between zeros


def _vit_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


@pytest.mark.parametrize(("n", "layered"), [(2, True), (2, False), (3, True)])
def test_dp_vit_noise_zero_equals_opacus(n: int, layered: bool) -> None:
    """``layered``: Opacus's grad samplers per layer and functorch for the token module;
    otherwise Opacus's functorch path over the whole ViT (its root holds parameters)."""
    from opacus.validators import ModuleValidator

    model = _vit()
    # hand-written attention (qkv Linear -> SDPA -> proj): nothing for Opacus to replace
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    x, y = _vit_data()
    dense = copy.deepcopy(model)
    # per-sample norms 7.66 ... 7.87: C = 7.75 clips 6 of 8
    _check(model, _LayeredViT(dense) if layered else dense, x, y, n, clip=7.75)


def test_dp_vit_values_without_a_batch_input() -> None:
    """The class token and positional embedding are the values DP pulls per-sample gradients
    back to; the ops that combine them with the activation are batched."""
    from disco_fl.runtime.training import NodeTrainer, plan_of
    from disco_fl.runtime.transport import InProcessHub

    model = _vit()
    x, y = _vit_data()
    pm = disco_fl.partition(model, 2, x[:2]).train()
    cfg = DPConfig(dataset_sizes={0: 800}, max_grad_norm=1.0, noise_multiplier=0.0, batch_size=8)
    with InProcessHub(2) as hub:
        tr = NodeTrainer(
            pm.shard(0), plan_of(pm), hub[0], torch.optim.SGD(pm.shard(0).parameters()), dp=cfg
        )
    assert tr.dp_state is not None
    shared, grad = tr.dp_state._shared, tr.dp_state._grad_shared
    assert {"cls_token", "pos_embed"} <= grad <= shared
    assert "expand" not in shared and "cat" not in shared  # batched: read the activation


def _program(*ops: Op) -> Any:
    return SimpleNamespace(ops=list(ops))


def test_dp_refuses_unsupported_ops_on_model_tensors() -> None:
    pos = Op("pos", "param", [], {"trainable": True}, None)
    x = Op("x", "input", [], {}, None)
    shared, grad = _shared_values(_program(x, pos, Op("a", "binary", ["x", "pos"], {}, None)))
    assert shared == {"pos"} and grad == {"pos"}
    with pytest.raises(ValueError, match=r"drop \(dropout\) reads pos.*random op"):
        _shared_values(_program(pos, Op("drop", "dropout", ["pos"], {"p": 0.5}, None)))
    with pytest.raises(ValueError, match=r"pos_x \(exchange\) reads pos.*communicating op"):
        _shared_values(_program(pos, Op("pos_x", "exchange", ["pos"], {}, None)))
    with pytest.raises(ValueError, match=r"ln \(layer_norm\) reads pos.*communicating"):
        _shared_values(_program(pos, Op("ln", "layer_norm", ["pos"], {}, None)))
    # a frozen model tensor is a constant: nothing to differentiate, nothing refused
    frozen = Op("pos", "param", [], {"trainable": False}, None)
    assert _shared_values(_program(frozen, Op("ln", "layer_norm", ["pos"], {}, None))) == (
        {"pos", "ln"},
        set(),
    )


def _clipped_mean_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> Any:
    """DP-SGD's clipped gradient (noise 0) the plain way: one backward per sample, Opacus's
    clip factor ``min(1, C / (norm + 1e-6))``, summed, divided by the batch size."""
    total = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for b in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[b : b + 1]), y[b : b + 1]).backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}  # type: ignore[union-attr]
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values()))  # type: ignore[arg-type]
        factor = float((clip / (norm + 1e-6)).clamp(max=1.0))
        for k, g in grads.items():
            total[k] += factor * g
    return {k: v / len(x) for k, v in total.items()}


@pytest.mark.parametrize("n", [2, 3])
def test_dp_multihead_attention_noise_zero_equals_per_sample_reference(n: int) -> None:
    """``nn.MultiheadAttention`` (batch first), split by heads. Opacus refuses it and its
    replacement (``ModuleValidator.fix`` -> ``DPMultiheadAttention``) computes another function
    with ``batch_first=True`` in opacus 1.6 (its output reshape mixes heads and positions,
    opacus PR #825), so the reference is the clipped gradient from one backward per sample."""
    from opacus.validators import ModuleValidator

    torch.manual_seed(0)
    model = MHAClassifier()
    assert ModuleValidator.validate(model, strict=False)  # Opacus refuses nn.MultiheadAttention
    g = torch.Generator().manual_seed(4)
    x = torch.randn(BATCH, 5, 6, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    clip = 3.65  # per-sample norms 2.9 ... 4.4
    want_full = _clipped_mean_grad(copy.deepcopy(model), x, y, clip)
    pm = disco_fl.partition(model, n, x[:2]).train()
    assert any(op.kind == "attention" for op in pm.program.ops)
    cfg = DPConfig(
        dataset_sizes={0: 800}, max_grad_norm=clip, noise_multiplier=0.0, batch_size=BATCH
    )
    grads, results = _dp_distributed_grads(pm, (x, y, cfg))
    info = results[0].dp
    assert info is not None and 0.0 < info.clipped_fraction < 1.0, info
    gref = copy.deepcopy(model)
    gref.load_state_dict(want_full)
    ref = disco_fl.partition(gref, n, x[:2])
    for k in range(n):
        want = ref.shard(k).state_dict()
        for key, got in grads[k].items():
            err = float((got - want[key]).abs().max())
            assert err <= 1e-5, f"node {k} {key}: {err:.3g}"


def test_dp_refuses_sequence_first_attention_and_attention_dropout() -> None:
    """DP takes dim 0 as the samples; in a sequence-first model it is the sequence."""
    from disco_fl.runtime.training import NodeTrainer, plan_of
    from disco_fl.runtime.transport import InProcessHub

    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(6, 12)
            self.attn = nn.MultiheadAttention(12, 4)  # batch_first=False: (T, B, E)
            self.head = nn.Linear(12, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            a, _ = self.attn(h, h, h, need_weights=False)
            return self.head((h + a).mean(dim=0))

    cfg = DPConfig(dataset_sizes={0: 800}, max_grad_norm=1.0, noise_multiplier=0.0, batch_size=8)
    pm = disco_fl.partition(SeqFirst(), 2, torch.randn(5, 2, 6)).train()
    with InProcessHub(2) as hub, pytest.raises(ValueError, match="attn.*sequence first"):
        NodeTrainer(pm.shard(0), plan_of(pm), hub[0], torch.optim.SGD(pm.parameters()), dp=cfg)
    # dropout on the attention weights: the per-sample re-run cannot redraw the step's mask
    vit = build_model("vit_tiny_mnist", dropout=0.1)
    pm = disco_fl.partition(vit, 2, torch.randn(2, 1, 28, 28)).train()
    with InProcessHub(2) as hub, pytest.raises(ValueError, match="blocks_0_attn.*dropout to 0"):
        NodeTrainer(pm.shard(0), plan_of(pm), hub[0], torch.optim.SGD(pm.parameters()), dp=cfg)
