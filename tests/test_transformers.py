"""Transformer blocks partitioned by heads: nn.MultiheadAttention, nn.TransformerEncoderLayer,
nn.TransformerEncoder, hand-written (timm-style) attention and the ViT preset.

Gates open == original (fused and lock-step emulation, N = 2, 3, 4, other batch / token counts
at run time), shard-only execution == emulation with random hard masks, the runtime over
in-process transports == shard-only execution, exact communication accounting, refusals,
strict ViT checkpoints, and budget training.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import disco_fl
from disco_fl import PartitionError
from disco_fl.emulation.budget import BudgetConfig, fit_budget
from disco_fl.emulation.export import load_shard, run_shards
from disco_fl.models import (
    CheckpointError,
    ViT,
    ViTConfig,
    build_model,
    load_checkpoint_strict,
    vit_tiny_mnist,
)
from disco_fl.models.vit import Attention, Block
from disco_fl.partition.plan import Plan, PlanError
from disco_fl.runtime.transport import InProcessHub
from tests.test_runtime_local import Household, _check_run
from tests.test_shards import _random_masks

IN = 6  # input features per token


class MHANet(nn.Module):
    """Embedding, self-attention with a residual, LayerNorm, per-token head."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, 12)
        self.attn = nn.MultiheadAttention(12, 4, batch_first=batch_first)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (B, T, 12) or (T, B, 12)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.norm(h + a))


class EncoderNet(nn.Module):
    """Embedding, one nn.TransformerEncoderLayer (or a 2-layer nn.TransformerEncoder), head."""

    def __init__(
        self, norm_first: bool, batch_first: bool, activation: str, stack: bool = False
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, 12)
        layer = nn.TransformerEncoderLayer(
            12, 4, 20, dropout=0.1, activation=activation, batch_first=batch_first,
            norm_first=norm_first,
        )  # fmt: skip
        self.block: nn.Module = (
            nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(12), enable_nested_tensor=False)
            if stack
            else layer
        )
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)))


class SoftmaxAttention(nn.Module):
    """Hand-written attention with the explicit ``softmax(q k^T * scale) v``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))


class HandNet(nn.Module):
    """Embedding, a timm-style pre-norm block (SDPA, 5 heads: uneven splits), a second block
    with the explicit-softmax attention, head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, 20)
        self.shift = nn.Parameter(torch.randn(20))  # (D,): broadcast over (B, T, D)
        self.block = Block(20, 5, 24)
        self.norm = nn.LayerNorm(20)
        self.attn = SoftmaxAttention(20, 5)
        self.head = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.embed(x) + self.shift)
        h = h + self.attn(self.norm(h), attn_mask=None)
        return self.head(h.mean(dim=1))


def _vit(pool: str = "cls") -> nn.Module:
    model = vit_tiny_mnist(pool=pool)
    with torch.no_grad():  # non-trivial class token and positional embedding
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_()
    return model


# name -> (builder, example shape, other run-time shape)
FORMS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[int, ...]]] = {
    "mha_batch_first": (lambda: MHANet(True), (2, 5, IN), (3, 7, IN)),
    "mha_seq_first": (lambda: MHANet(False), (5, 2, IN), (7, 3, IN)),
    "tel_pre_bf_gelu": (lambda: EncoderNet(True, True, "gelu"), (2, 5, IN), (3, 8, IN)),
    "tel_pre_sf_relu": (lambda: EncoderNet(True, False, "relu"), (5, 2, IN), (8, 3, IN)),
    "tel_post_bf_relu": (lambda: EncoderNet(False, True, "relu"), (2, 5, IN), (3, 8, IN)),
    "tel_post_sf_gelu": (lambda: EncoderNet(False, False, "gelu"), (5, 2, IN), (8, 3, IN)),
    "encoder_stack": (lambda: EncoderNet(True, True, "gelu", stack=True), (2, 5, IN), (1, 9, IN)),
    "hand_written": (HandNet, (2, 5, IN), (3, 4, IN)),
    "vit_cls": (lambda: _vit("cls"), (2, 1, 28, 28), (3, 1, 28, 28)),
    "vit_mean": (lambda: _vit("mean"), (2, 1, 28, 28), (1, 1, 28, 28)),
}


def _build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    build, shape, other = FORMS[name]
    return build().eval(), torch.randn(*shape), torch.randn(*other)


@pytest.mark.parametrize("name", sorted(FORMS))
@pytest.mark.parametrize("nodes", [2, 3, 4])
def test_gates_open_equals_original(name: str, nodes: int) -> None:
    model, x, other = _build(name, nodes)
    pm = disco_fl.partition(model, nodes, x).eval()
    assert any(op.kind == "attention" for op in pm.program.ops)
    for execution in ("fused", "lockstep"):
        pm.execution = execution  # type: ignore[assignment]
        for inp in (x, other):  # another batch size / token count at run time
            with torch.no_grad():
                ref, out = model(inp), pm(inp)
            assert out.shape == ref.shape
            assert torch.allclose(out, ref, atol=1e-5, rtol=0), (execution, (out - ref).abs().max())


def test_heads_are_split_unevenly_and_by_capacity() -> None:
    model, x, _ = _build("hand_written")
    pm = disco_fl.partition(model, 3, x)
    heads = [pm.shard(k).ops["block_attn_heads"].weight.shape[0] // (3 * 4) for k in range(3)]
    assert heads == [2, 2, 1]  # 5 heads of 4 features on 3 nodes
    pm = disco_fl.partition(model, 2, x, capacities=[1.0, 9.0]).eval()
    heads = [pm.shard(k).ops["block_attn_heads"].weight.shape[0] // (3 * 4) for k in range(2)]
    assert heads == [1, 4]
    with torch.no_grad():
        assert torch.allclose(pm(x), model(x), atol=1e-5)
    with pytest.raises(PartitionError, match=r"'block.attn' has 5 heads, fewer than num_nodes=6"):
        disco_fl.partition(model, 6, x)


def test_train_mode_gradients_equal_original() -> None:
    torch.manual_seed(0)
    model = EncoderNet(False, True, "gelu").train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model.block.self_attn.dropout = 0.0  # type: ignore[union-attr]
    x = torch.randn(3, 5, IN, requires_grad=True)
    pm = disco_fl.partition(model, 3, x.detach()).train()
    y = torch.randn(3, 5, 5)
    F.mse_loss(model(x), y).backward()
    g_ref = x.grad.clone()  # type: ignore[union-attr]
    for execution in ("fused", "lockstep"):
        x.grad = None
        pm.execution = execution  # type: ignore[assignment]
        F.mse_loss(pm(x), y).backward()
        assert torch.allclose(x.grad, g_ref, atol=1e-5), execution  # type: ignore[arg-type]
    # gates train: stochastic gates get gradients through the attention's exchanged input
    pm.gate_mode = "stochastic"
    with torch.no_grad():  # logits 0: samples strictly inside (0, 1), so gradients flow
        for p in pm.gate_parameters():
            p.zero_()
    pm.zero_grad()
    F.mse_loss(pm(x), y).backward()
    gates = pm.shard(0).gates["embed_x"]
    assert gates.log_alpha["1"].grad is not None  # type: ignore[index]
    assert float(gates.log_alpha["1"].grad.abs().sum()) > 0  # type: ignore[index]


@pytest.mark.parametrize("name", sorted(FORMS))
@pytest.mark.parametrize("nodes", [2, 3, 4])
def test_shard_only_equals_emulation(name: str, nodes: int, tmp_path: Path) -> None:
    model, x, other = _build(name, nodes)
    pm = disco_fl.partition(model, nodes, x).eval()
    _random_masks(pm, 0.5, seed=nodes)
    with torch.no_grad():
        ref = pm(x)
    assert not torch.allclose(ref, model(x), atol=1e-3)  # the masks change the function
    exported = pm.export(tmp_path)
    shards = [load_shard(tmp_path / "plan.json", k) for k in range(nodes)]
    for inp, want in ((x, ref), (other, None)):
        if want is None:
            with torch.no_grad():
                want = pm(inp)
        out = run_shards(shards, inp)
        assert torch.allclose(out, want, atol=1e-5, rtol=0), (out - want).abs().max()
    assert sum(exported.param_bytes_per_node) < exported.whole_model_param_bytes


def test_forged_head_split_is_refused(tmp_path: Path) -> None:
    model, x, _ = _build("tel_pre_bf_gelu")
    disco_fl.partition(model, 2, x).export(tmp_path)
    raw = json.loads((tmp_path / "plan.json").read_text())
    info = raw["program"]["infos"]["block_attn_heads"]
    assert info["layout"] == [[0, 6], [1, 6]]  # 2 heads of 3 features each
    info["layout"] = [[0, 5], [1, 7]]  # not whole heads
    body = {k: v for k, v in raw.items() if k != "hash"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    raw["hash"] = hashlib.sha256(canon).hexdigest()  # consistent: only validation can tell
    with pytest.raises(PlanError, match="whole heads"):
        Plan.from_json(raw)


def test_comm_report_equals_hand_count() -> None:
    """Pre-norm encoder layer, D = 8 (4 + 4 per node), 2 heads, MLP 12 (6 + 6), T = 5."""

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(IN, 8)
            self.layer = nn.TransformerEncoderLayer(8, 2, 12, batch_first=True, norm_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.layer(self.embed(x)))

    t = 5
    pm = disco_fl.partition(Tiny().eval(), 2, torch.randn(2, t, IN))
    rep = pm.comm_report()
    f = 4  # fp32 bytes
    input_b = t * IN * f  # node 0 sends the input to node 1
    stats_b = 2 * (2 * t * f)  # (mean, M2) per token, both directions, per LayerNorm
    exch = {
        "layer_norm1_x": 2 * 4 * t * f,  # qkv input: 4 features per node, both directions
        "layer_attn_heads_x": 2 * 4 * t * f,  # out_proj input: 1 head of 4 features per node
        "layer_norm2_x": 2 * 4 * t * f,  # linear1 input
        "layer_dropout_x": 2 * 6 * t * f,  # linear2 input: 6 hidden units per node
        "layer_add2_x": 2 * 4 * t * f,  # head input
    }
    output_b = 1 * t * f  # head: 3 outputs = 2 + 1, node 1 sends its one
    assert {lc.op: lc.bytes for lc in rep.layers if lc.kind == "exchange"} == exch
    assert rep.stats_bytes == 2 * stats_b
    assert (rep.input_bytes, rep.output_bytes) == (input_b, output_b)
    assert rep.bytes_per_sample == input_b + 2 * stats_b + sum(exch.values()) + output_b == 1180
    assert rep.sync_points == 7  # 5 exchanges + 2 LayerNorms
    readers = {lc.op: lc.readers for lc in rep.layers}
    assert readers["layer_norm1_x"] == ["layer.self_attn"]
    assert readers["layer_attn_heads_x"] == ["layer.self_attn.out_proj"]
    # closing every gate of the attention output: that exchange costs nothing
    for name, _, d, g in pm.gate_items():
        if name == "layer_attn_heads_x":
            g.set_mask(d, torch.zeros(g.num_channels))
    assert pm.comm_report().bytes_per_sample == 1180 - exch["layer_attn_heads_x"]


@pytest.mark.parametrize("name", ["vit_cls", "tel_post_sf_gelu", "hand_written"])
def test_inprocess_runtime_equals_shards(name: str, tmp_path: Path) -> None:
    model, x, _ = _build(name)
    pm = disco_fl.partition(model, 2, x).eval()
    _random_masks(pm, 0.5, seed=3)
    pm.export(tmp_path)
    nodes = [load_shard(tmp_path / "plan.json", k) for k in range(2)]
    hh = Household(nodes, x, run_shards(nodes, x))
    with torch.no_grad():
        assert torch.allclose(hh.ref, pm(x), atol=1e-5, rtol=0)
    with InProcessHub(2, num_layers=hh.num_layers) as hub:
        _check_run(hh, list(hub), f"s-{name}")  # bit-equal output, wire bytes == the plan's


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_lossy_codecs_shards_equal_emulation(codec: str, tmp_path: Path) -> None:
    model, x, _ = _build("vit_cls")
    pm = disco_fl.partition(model, 3, x).eval()
    _random_masks(pm, 0.5, seed=1)
    pm.codec = codec
    with torch.no_grad():
        ref = pm(x)  # lock-step: received channels rounded by the codec
        pm.codec = "fp32"
        assert not torch.equal(ref, pm(x))
    pm.export(tmp_path, codec=codec)
    out = run_shards([load_shard(tmp_path / "plan.json", k) for k in range(3)], x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)


class _HeadsInnermost(Attention):
    """A qkv/proj/num_heads module whose qkv output is laid out (H, 3, hd): not the standard."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.proj(x)


class _QKNorm(Attention):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads)
        self.q_norm = nn.LayerNorm(self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), k, v)
        return self.proj(x.transpose(1, 2).reshape(b, t, d))


class _Wrap(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, 8)
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.embed(x))


class _MaskedHand(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, 8)
        self.attn = SoftmaxAttention(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.embed(x), attn_mask=torch.ones(5, 5))


class _CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.attn(h, x[:, :, :1].expand(-1, -1, 8), h)[0]


class _Weights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        out, weights = self.attn(h, h, h)
        return out + weights.sum()


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.embed(x), is_causal=True, src_mask=torch.ones(5, 5).triu(1).bool())


@pytest.mark.parametrize(
    ("model", "pattern"),
    [
        (_Wrap(_HeadsInnermost(8, 2)), r"module 'attn' \(_HeadsInnermost\).*differs from"),
        (_Wrap(_QKNorm(8, 2)), r"module 'attn' \(_QKNorm\).*refusing"),
        (_MaskedHand(), r"module 'attn' \(SoftmaxAttention\).*must be None\); got \['attn_mask'\]"),
        (_CrossAttention(), r"module 'attn'.*only self-attention"),
        (_Weights(), r"output 1 of 'attn' is not supported"),
        (_Masked(), r"module 'layer'.*not supported \(attention masks"),
    ],
)
def test_refused_variants_name_the_module(model: nn.Module, pattern: str) -> None:
    with pytest.raises(PartitionError, match=pattern):
        disco_fl.partition(model.eval(), 2, torch.randn(2, 5, IN))


# timm VisionTransformer keys for depth 1 with a class token, in order
TIMM_KEYS = [
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "blocks.0.norm1.weight",
    "blocks.0.norm1.bias",
    "blocks.0.attn.qkv.weight",
    "blocks.0.attn.qkv.bias",
    "blocks.0.attn.proj.weight",
    "blocks.0.attn.proj.bias",
    "blocks.0.norm2.weight",
    "blocks.0.norm2.bias",
    "blocks.0.mlp.fc1.weight",
    "blocks.0.mlp.fc1.bias",
    "blocks.0.mlp.fc2.weight",
    "blocks.0.mlp.fc2.bias",
    "norm.weight",
    "norm.bias",
    "head.weight",
    "head.bias",
]


def test_vit_names_and_strict_checkpoint_loading(tmp_path: Path) -> None:
    cfg = ViTConfig(image_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2)
    model = ViT(cfg)
    assert list(model.state_dict()) == TIMM_KEYS
    assert model.pos_embed.shape == (1, 5, 8) and model.blocks[0].attn.qkv.out_features == 24
    torch.manual_seed(1)
    src = ViT(cfg)
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)
    load_checkpoint_strict(model, path)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), src.eval()(x))
    sd = src.state_dict()
    missing = {k: v for k, v in sd.items() if k != "cls_token"}
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): cls_token"):
        load_checkpoint_strict(model, missing)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): blocks.1.norm1.weight"):
        load_checkpoint_strict(model, {**sd, "blocks.1.norm1.weight": torch.ones(8)})
    wrong = {**sd, "pos_embed": torch.zeros(1, 4, 8)}
    with pytest.raises(CheckpointError, match=r"pos_embed: expected \(1, 5, 8\), got \(1, 4, 8\)"):
        load_checkpoint_strict(model, wrong)
    mean_cfg = ViTConfig(image_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2, pool="mean")
    mean = ViT(mean_cfg)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_checkpoint_strict(mean, sd)  # a class-token checkpoint does not fit pool="mean"
    preset = build_model("vit_tiny_mnist", num_classes=7, in_channels=3)
    assert preset(torch.randn(1, 3, 28, 28)).shape == (1, 7)
    with pytest.raises(ValueError, match="patch_size"):
        ViTConfig(image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ViTConfig(embed_dim=10, num_heads=4)


def test_vit_class_token_and_positions_are_sharded_and_train() -> None:
    model, x, _ = _build("vit_cls")
    pm = disco_fl.partition(model, 3, x)
    cls = [pm.shard(k).ops["cls_token"].value for k in range(3)]
    assert [tuple(c.shape) for c in cls] == [(22, 1, 1), (21, 1, 1), (21, 1, 1)]
    assert all(isinstance(c, nn.Parameter) for c in cls)
    pm.train()
    pm(x).sum().backward()
    assert all(c.grad is not None and float(c.grad.abs().sum()) > 0 for c in cls)
    model, x, _ = _build("hand_written")
    shift = disco_fl.partition(model, 3, x).shard(2).ops["shift"].value
    assert tuple(shift.shape) == (6, 1, 1)  # (D,) lined up as (1, 1, D): node 2's 6 features


def test_fit_budget_runs_on_a_vit() -> None:
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=4, num_classes=3, embed_dim=8, depth=1, num_heads=2)
    model = ViT(cfg).eval()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
    pm = disco_fl.partition(model, 2, x[:2])
    before = pm.shard(0).ops["blocks_0_attn_heads"].weight.detach().clone()
    bc = BudgetConfig(
        budget=0.4, gate_epochs=1, finetune_epochs=1, batch_size=16, max_steps_per_epoch=2
    )
    res = fit_budget(pm, x, y, bc, teacher=model)
    assert 0.0 < res.achieved_fraction <= 0.4
    assert pm.comm_report().exchange_fraction == pytest.approx(res.achieved_fraction)
    assert not torch.equal(pm.shard(0).ops["blocks_0_attn_heads"].weight, before)
    assert len(res.history) == 2 and all(h["loss"] == h["loss"] for h in res.history)
