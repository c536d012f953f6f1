"""Devices that differ: the probe, capacities -> uneven slices, the memory estimate."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import disco_fl
from disco_fl.cli.main import main
from disco_fl.core.layout import split_sizes
from disco_fl.emulation.capacity import (
    channel_shares,
    parse_capacities,
    shared_capacities,
    training_memory,
)
from disco_fl.emulation.model import partition
from disco_fl.models import build_model
from disco_fl.runtime.probe import available_memory, measure_compute, probe


@pytest.mark.exclusive  # times itself: wall < 3 s
def test_probe_is_positive_and_bounded() -> None:
    t0 = time.perf_counter()
    res = probe(0.4)
    wall = time.perf_counter() - t0
    assert wall < 3.0, wall
    c = res.compute
    assert c.matmul_gflops > 0 and c.conv_gflops > 0 and res.capacity > 0
    assert min(c.matmul_gflops, c.conv_gflops) <= c.gflops <= max(c.matmul_gflops, c.conv_gflops)
    assert c.threads == torch.get_num_threads()
    assert res.memory_bytes > 0 and res.memory.source in ("meminfo", "cgroup")
    have = [v for v in (res.memory.meminfo_bytes, res.memory.cgroup_bytes) if v is not None]
    assert res.memory_bytes == min(have)
    with pytest.raises(ValueError, match="seconds"):
        measure_compute(0)


def test_memory_is_the_smaller_of_meminfo_and_cgroup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import disco_fl.runtime.probe as probe_mod

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 8000 kB\nMemAvailable: 4000 kB\n")
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "memory.max").write_text("3000000\n")
    (cg / "memory.current").write_text("1000000\n")
    monkeypatch.setattr(probe_mod, "_meminfo_available", lambda: probe_mod._read_meminfo(meminfo))
    monkeypatch.setattr(probe_mod, "_cgroup_headroom", lambda: probe_mod._cgroup_at(cg))
    m = available_memory()
    assert (m.bytes, m.source, m.meminfo_bytes) == (2_000_000, "cgroup", 4_096_000)
    (cg / "memory.max").write_text("max\n")  # no limit: /proc/meminfo decides
    m = available_memory()
    assert (m.bytes, m.source, m.cgroup_bytes) == (4_096_000, "meminfo", None)


def test_probe_command_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "probe.json"
    assert main(["probe", "--seconds", "0.2", "--threads", "1", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["capacity"] > 0 and got["memory_bytes"] > 0 and got["compute"]["threads"] == 1
    assert f"capacity={got['capacity']:g} memory-bytes={got['memory_bytes']}" in (
        capsys.readouterr().out
    )
    assert main(["probe", "--seconds", "0"]) == 2


def test_split_sizes_follow_capacities() -> None:
    assert split_sizes(8, 2, [1, 3]) == [2, 6]
    assert split_sizes(32, 2, [1, 3]) == [8, 24]
    assert split_sizes(10, 2, [1, 1000]) == [1, 9]  # every node keeps one channel
    assert split_sizes(7, 3, [1, 1, 1]) == split_sizes(7, 3) == [3, 2, 2]
    assert split_sizes(4, 3, [100, 1, 1]) == [2, 1, 1]
    for bad in ([1], [1, 0], [1, float("inf")], [1, -2]):
        with pytest.raises(ValueError, match="capacities"):
            split_sizes(8, 2, bad)


def test_uneven_channel_slices_come_in_groups_of_eight() -> None:
    """With capacities, a layer of at least 4 groups of 8 channels per node is split in whole
    groups (the same largest-remainder rounding over groups); smaller or odd layers and equal
    splits channel by channel; a mixing layer of a partitioned model uses it."""
    assert split_sizes(64, 2, [0.64, 0.36], align=8) == [40, 24]
    assert split_sizes(64, 2, [0.64, 0.36]) == [41, 23]
    assert split_sizes(512, 2, [0.64, 0.36], align=8) == [328, 184]
    assert split_sizes(512, 3, [5, 2, 1], align=8) == [320, 128, 64]
    assert split_sizes(32, 2, [2, 1], align=8) == [21, 11]  # 4 groups: < 4 per node
    assert split_sizes(100, 2, [0.64, 0.36], align=8) == [64, 36]  # not a multiple of 8
    assert split_sizes(64, 2, align=8) == split_sizes(64, 2) == [32, 32]
    assert split_sizes(66, 4, align=8) == [17, 17, 16, 16]  # equal: never aligned
    model = build_model("resnet18", num_classes=10, small_input=True).eval()
    pm = partition(model, 2, torch.randn(1, 3, 16, 16), capacities=[0.64, 0.36])
    sizes = {
        name: [info.layout.count(k) for k in range(2)]
        for name, info in pm.program.infos.items()
        if info.kind == "sharded" and info.layout is not None
    }
    wide = [counts for counts in sizes.values() if sum(counts) >= 64]  # all but the 10 classes
    assert len(wide) > 20 and all(c % 8 == 0 for counts in wide for c in counts)
    assert [40, 24] in wide and [328, 184] in wide and sizes["fc"] == [6, 4]


def test_parse_and_share_capacities() -> None:
    assert parse_capacities("1, 3", 2) == (1.0, 3.0)
    assert parse_capacities("", 2) is None and parse_capacities(None, 2) is None
    for bad in ("1,2,3", "1,x", "1,-1", "0,1", "nan,1"):
        with pytest.raises(ValueError, match="capacities"):
            parse_capacities(bad, 2)
    # households slice the model the same way: normalized shares, averaged per shard
    assert shared_capacities([[1, 3], [100, 300]]) == pytest.approx((0.25, 0.75))
    assert shared_capacities([[1, 3], [3, 1]]) == pytest.approx((0.5, 0.5))


def test_uneven_partition_with_gates_open_equals_the_model() -> None:
    torch.manual_seed(0)
    model = build_model("resnet_narrow").eval()
    x = torch.randn(4, 1, 28, 28)
    pm = disco_fl.partition(model, 3, x, capacities=[1.0, 2.0, 5.0]).eval()
    shares = channel_shares(pm.program)
    assert shares[0] < shares[1] < shares[2]
    assert shares == pytest.approx([1 / 8, 2 / 8, 5 / 8], abs=0.06)
    with torch.no_grad():
        assert torch.allclose(pm(x), model(x), atol=1e-5)


def test_training_memory_estimate() -> None:
    model = build_model("resnet_narrow").eval()
    ex = torch.zeros(2, 1, 28, 28)
    even = disco_fl.partition(model, 2, ex)
    uneven = disco_fl.partition(model, 2, ex, capacities=[1, 3])
    need = training_memory(uneven, 1, 32)
    params = sum(p.numel() * 4 for p in uneven.shard(1).parameters())
    assert need.param_bytes == params
    assert need.total == 4 * params + need.buffer_bytes + 2 * need.activation_bytes
    # the activations grow with the batch; the large node needs more than an even one
    assert training_memory(uneven, 1, 64).activation_bytes == 2 * need.activation_bytes
    assert training_memory(uneven, 0, 32).total < training_memory(even, 0, 32).total < need.total
    dp = training_memory(uneven, 1, 32, dp=True)
    assert dp.total == need.total + 32 * params and "per-sample" in dp.explain()


@pytest.mark.parametrize(
    ("name", "caps"),
    [("resnet_narrow", [1.0, 3.0]), ("user", [1.0, 3.0]), ("resnet_narrow", [1.0, 2.0, 5.0])],
)
def test_uneven_plan_shards_and_runtime_equal_emulation(
    tmp_path: Path, name: str, caps: list[float]
) -> None:
    """An exported uneven plan: shard-only execution == emulation, and the runtime over
    in-process transports == the shards, with the plan's payload bytes on the wire."""
    from disco_fl.emulation.export import load_shard, run_shards
    from disco_fl.runtime.transport import InProcessHub
    from tests.test_runtime_local import Household, _check_run
    from tests.test_shards import _random_masks
    from tests.zoo import ZOO

    n = len(caps)
    build, shape = ZOO[name]
    torch.manual_seed(n)
    model = build().eval()
    x = torch.randn(*shape)
    pm = disco_fl.partition(model, n, x, capacities=caps).eval()
    shares = channel_shares(pm.program)
    assert shares == sorted(shares) and shares[-1] > 0.5  # really uneven
    _random_masks(pm, 0.35, seed=n)
    with torch.no_grad():
        ref = pm(x)
    pm.export(tmp_path)
    nodes = [load_shard(tmp_path / "plan.json", k) for k in range(n)]
    out = run_shards(nodes, x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()
    hh = Household(nodes, x, out)
    with InProcessHub(n, num_layers=hh.num_layers) as hub:
        _check_run(hh, list(hub), "uneven")
