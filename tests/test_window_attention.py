"""Windowed attention through the ``torch.export`` capture (issue 15): torchvision's own Swin
(V1: shifted windows with an attention mask and a relative position bias; V2: cosine
attention, continuous position bias) blocks, a MaxViT-style einsum attention and a
timm-style ``scaled_dot_product_attention``, small.

The window partition merges the windows of each sample into dim 0 (``batch_mult``): gates
open, the emulation equals the original at N = 2, 3, 4 and any batch size; the runtime
equals the shards and its payload bytes equal the plan's (fp32 and int8, whose scales are per
row); a message with the wrong number of rows is refused; training gradients equal the
original's; what is still refused names the op and why.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import disco_fl
from disco_fl import PartitionError
from disco_fl.emulation.export import load_shard, run_shards
from disco_fl.node import message_problem
from disco_fl.runtime.training.dp import DPConfig, DPState
from disco_fl.runtime.transport import InProcessHub
from tests.conftest import import_torchvision
from tests.test_runtime_local import Household, _check_run

swin = import_torchvision().models.swin_transformer


class TinySwin(nn.Module):
    """Patch embedding, two Swin blocks (windows 4x4 on an 8x8 grid: 4 windows per sample;
    the second shifted by 2), 3 heads of 4 features, mean pooling and a head."""

    def __init__(self, v2: bool = False) -> None:
        super().__init__()
        block = swin.SwinTransformerBlockV2 if v2 else swin.SwinTransformerBlock
        self.patch = nn.Conv2d(3, 12, 2, stride=2)
        self.norm = nn.LayerNorm(12)
        self.blocks = nn.Sequential(block(12, 3, [4, 4], [0, 0]), block(12, 3, [4, 4], [2, 2]))
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.norm(self.patch(x).permute(0, 2, 3, 1)))  # (B, 8, 8, 12)
        return self.head(x.mean(dim=(1, 2)))


class EinsumAttention(nn.Module):
    """MaxViT's relative attention in miniature: qkv chunked, heads by reshape, einsum."""

    def __init__(self, equation: str = "bghid,bghjd->bghij") -> None:
        super().__init__()
        self.equation = equation
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.bias = nn.Parameter(torch.randn(1, 2, 4, 4) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2).reshape(x.shape[0], 4, 4, 8)  # (B,G,P,D)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        q, k, v = (a.reshape(x.shape[0], 4, 4, 2, 4).permute(0, 1, 3, 2, 4) for a in (q, k, v))
        attn = torch.einsum(self.equation, q, k * 0.5) + self.bias
        out = torch.einsum("bghij,bghjd->bghid", attn.softmax(dim=-1), v)
        return self.proj(out.permute(0, 1, 3, 2, 4).reshape(x.shape[0], 4, 4, 8))


class SdpaAttention(nn.Module):
    """timm's attention: ``qkv.reshape(B, T, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)`` and
    ``F.scaled_dot_product_attention`` with an additive bias per head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 12, 4, stride=4)
        self.qkv = nn.Linear(12, 36)
        self.proj = nn.Linear(12, 12)
        self.bias = nn.Parameter(torch.randn(1, 3, 16, 16) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)  # (B, 16, 12)
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, 3, 4).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)  # (B, 3, 16, 4)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model: nn.Module = {
        "swin": lambda: TinySwin(),
        "swin_v2": lambda: TinySwin(v2=True),
        "einsum": lambda: EinsumAttention(),
        "sdpa": lambda: SdpaAttention(),
    }[name]()
    return model.eval(), torch.randn(2, 3, 16, 16)


def _masks(pm: disco_fl.PartitionedModel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, _, d, gates in pm.gate_items():
        gates.set_mask(d, (torch.rand(gates.num_channels, generator=g) < 0.4).float())


@pytest.mark.parametrize("name", ["swin", "swin_v2", "einsum", "sdpa"])
@pytest.mark.parametrize("nodes", [2, 3, 4])
def test_gates_open_equals_original(name: str, nodes: int) -> None:
    model, x = _model(name)
    pm = disco_fl.partition(model, nodes, x, capture="export").eval()
    x3 = torch.randn(3, 3, 16, 16)  # the batch size (and so the rows of dim 0) is free
    with torch.no_grad():
        for execution in ("fused", "lockstep"):
            pm.execution = execution  # type: ignore[assignment]
            for inp in (x, x[:1], x3):
                ref, out = model(inp), pm(inp)
                assert out.shape == ref.shape
                assert torch.allclose(out, ref, atol=1e-5, rtol=0), (execution, inp.shape[0])


def test_windows_are_rows_of_dim0_and_heads_stay_whole() -> None:
    model, x = _model("swin")
    prog = disco_fl.partition(model, 4, x, capture="export").program
    # the window partition: (B, 8, 8, C) -> (B * 4, 16, C), 4 rows per sample, C still split
    windows = [o for o in prog.ops if o.kind == "reshape" and prog.infos[o.name].batch_mult == 4]
    assert windows and all(prog.infos[o.name].cdim == 2 for o in windows[:1])
    # ... through the exchange before qkv, and back to one row per sample after the reverse
    assert any(prog.infos[e.name].batch_mult == 4 for e in prog.exchanges)
    assert prog.infos[prog.ops[-1].name].batch_mult == 1
    # qkv gives each node whole heads of q, k and v: 3 heads on 4 nodes, node 3 has none
    qkv = [o for o in prog.ops if o.kind == "linear" and "layout" in o.attrs]
    assert len(qkv) == 2
    lay = prog.infos[qkv[0].name].layout
    assert lay is not None and [lay.count(k) for k in range(4)] == [12, 12, 12, 0]
    assert lay.owners[:12] == lay.owners[12:24] == lay.owners[24:]  # q, k, v alike
    assert not [o for o in prog.ops if o.kind == "reindex"]  # nothing re-sliced


@pytest.mark.parametrize(
    "name,codec", [("swin", "fp32"), ("swin", "int8"), ("einsum", "fp32"), ("sdpa", "fp32")]
)
@pytest.mark.parametrize("nodes", [2, 4])  # 4: node 3 holds none of the 3 heads
def test_runtime_equals_shards_and_plan_bytes(
    name: str, nodes: int, codec: str, tmp_path: Path
) -> None:
    model, x = _model(name)
    pm = disco_fl.partition(model, nodes, x, capture="export").eval()
    _masks(pm, nodes)
    pm.export(tmp_path, codec=codec)
    shards = [load_shard(tmp_path / "plan.json", k) for k in range(nodes)]
    ref = run_shards(shards, x)
    if codec == "fp32":
        pm.execution = "fused"  # type: ignore[assignment]
        with torch.no_grad():
            assert torch.allclose(ref, pm(x), atol=1e-5, rtol=0)
    hh = Household(shards, x, ref)
    with InProcessHub(nodes, num_layers=hh.num_layers) as hub:
        _check_run(hh, list(hub), "s-win")  # == shards, payload bytes == the plan's


def test_message_rows_are_checked() -> None:
    model, x = _model("swin")
    prog = disco_fl.partition(model, 2, x, capture="export").program
    e = next(o for o in prog.exchanges if prog.infos[o.name].batch_mult == 4)
    info = prog.infos[e.name]
    shape = list(info.shape[1:])
    shape[info.cdim - 1] = 6
    good = torch.zeros(3 * 4, *shape)  # 3 samples, 4 windows each
    assert message_problem(prog, e, good, 3, channels=6) is None
    assert message_problem(prog, e, good, 3, channels=6, strict=True) is None
    for rows in (3, 2 * 4, 3 * 4 + 1):
        bad = torch.zeros(rows, *shape)
        why = message_problem(prog, e, bad, 3, channels=6)
        assert why is not None and "batch size 3 (4 rows per sample)" in why
    plain = next(o for o in prog.exchanges if prog.infos[o.name].batch_mult == 1)
    assert message_problem(prog, plain, torch.zeros(3 * 4, 12), 3) is not None


def test_train_mode_gradients_equal_original() -> None:
    model, x = _model("swin")
    model.train()
    pm = disco_fl.partition(model, 3, x, capture="export").train()
    x = x.clone().requires_grad_(True)
    model(x).square().sum().backward()
    g_ref = x.grad.clone()
    ref_w = sum(float(p.grad.square().sum()) for p in model.parameters() if p.grad is not None)
    for execution in ("fused", "lockstep"):
        x.grad = None
        pm.zero_grad()
        pm.execution = execution  # type: ignore[assignment]
        pm(x).square().sum().backward()
        assert torch.allclose(x.grad, g_ref, atol=1e-4, rtol=1e-4), execution
        got_w = sum(float(p.grad.square().sum()) for p in pm.weight_parameters())
        # the relative position bias tables are folded into constants (not trained)
        tables = sum(
            float(m.relative_position_bias_table.grad.square().sum())
            for m in model.modules()
            if isinstance(m, swin.ShiftedWindowAttention)
        )
        assert got_w == pytest.approx(ref_w - tables, rel=1e-4), execution


def test_refusals_name_op_and_reason() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(PartitionError, match=r"einsum.*'bghid,bghjd->bghji'.*not a batched"):
        disco_fl.partition(EinsumAttention("bghid,bghjd->bghji"), 2, x, capture="export")

    model, x = _model("swin")
    prog = disco_fl.partition(model, 2, x, capture="export").program
    trainer = SimpleNamespace(plan=SimpleNamespace(program=prog), gate_mode="hard")
    cfg = DPConfig(dataset_sizes={0: 10, 1: 10}, noise_multiplier=1.0, batch_size=2)
    with pytest.raises(ValueError, match="several rows per sample"):
        DPState(cfg, trainer)  # type: ignore[arg-type]
