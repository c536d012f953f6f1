"""The benchmark scripts keep what they finished when one cell cannot run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from disco_fl.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):  # bench/ is a folder of scripts, not a package
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_comm_accuracy_skips_a_cell_that_cannot_partition() -> None:
    bench = _load("comm_accuracy")
    state = build_model("vit_tiny_mnist").state_dict()
    setting = bench.SETTINGS["quick"]["vit_tiny_mnist"]
    # 4 heads cannot be split over 8 nodes: the cell is skipped with its reason, not raised
    cell = bench._job(("vit_tiny_mnist", 8, 0.1, setting, state, None, 0))
    assert cell["rows"] == []
    assert cell["skipped"]["nodes"] == 8
    assert "cannot partition" in cell["skipped"]["reason"]
    summary = _load("summarize").summarize(
        {"dense_accuracy": {}, "rows": [], "skipped": [cell["skipped"]]}
    )
    assert "vit_tiny_mnist, 8 nodes" in summary


def test_readme_zoo_block_is_generated_from_docs_zoo() -> None:
    """README.md's per-family table is what ``bench/zoo_table.py --no-run --readme README.md``
    makes of the committed docs/zoo.md (regenerate it after the zoo table changes), and every
    end-to-end test it names exists."""
    bench = _load("zoo_table")
    zoo_md = (ROOT / "docs" / "zoo.md").read_text()
    readme = (ROOT / "README.md").read_text()
    block = bench.readme_block(zoo_md)
    assert bench.rewrite_readme(readme, block) == readme, "run bench/zoo_table.py --no-run ..."
    assert readme.count(bench.README_START) == 1 and readme.count(bench.README_END) == 1
    # the summary counts what the table says, family by family
    rows = bench.parse_table(zoo_md)
    ok = [m for m, cells in rows if all(c == "ok" for c in cells)]
    assert f"{len(ok)} of {len(rows)} models partition" in block
    assert "| resnet | resnet101, resnet18, resnet34, resnet50 | 4 of 4 |" in block
    assert bench.family_of("deeplabv3_resnet50") == "deeplabv3"
    assert bench.family_of("swin_v2_t") == "swin" and bench.family_of("mnasnet0_5") == "mnasnet"
    from tests import test_zoo_system

    for fam, (_, tests) in bench.SYSTEM_TESTS.items():
        assert f"| {fam} |" in block
        assert all(callable(getattr(test_zoo_system, t, None)) for t in tests), tests
    # a stale block is noticed
    stale = bench.rewrite_readme(
        readme, bench.readme_block(zoo_md.replace("| ok |", "| refused |", 1))
    )
    assert stale != readme


def test_comm_accuracy_dense_task_rows_and_plot(tmp_path: Path) -> None:
    bench = _load("comm_accuracy")
    state = build_model("espcn").state_dict()
    setting = bench.SETTINGS["quick"]["espcn"]
    # budget 1.0 of a dense-prediction task: dense tensor parallelism, evaluated as trained
    cell = bench._job(("espcn", 2, 1.0, setting, state, None, 0, "super_resolution"))
    rows = cell["rows"]
    assert [r["codec"] for r in rows] == ["fp32", "int8"]
    assert all(r["metric"] == "psnr_db" for r in rows)
    assert rows[0]["bytes_per_sample"] == rows[0]["dense_bytes_per_sample"]
    data = {
        "dense_accuracy": {"espcn": rows[0]["accuracy"]},
        "rows": rows,
        "meta": {"task": "super_resolution", "metric": "psnr_db"},
    }
    summarize = _load("summarize")
    assert "| 2 | dense |" in summarize.summarize(data)
    assert "no row with 8x fewer bytes" in summarize.bars(data)
    cheap = dict(rows[0], budget=0.05, bytes_per_sample=rows[0]["bytes_per_sample"] / 10)
    cheap["accuracy"] -= 0.2  # 0.2 dB below dense, 10x fewer bytes: within the 0.3 dB bar
    assert summarize.bars(dict(data, rows=[*rows, cheap])).endswith("**met**")
    png = tmp_path / "plot.png"
    summarize.plot([data], str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow(seconds=30)
def test_household_uneven_runs_tiny(tmp_path: Path) -> None:
    """bench/household_uneven.py end to end at a tiny setting: 2 households of 2 real
    ``disco-fl serve`` processes, measured capacities, alternating requests. Where the
    cgroup-v1 ``cpu`` hierarchy is not writable, only the throttle is skipped (the script
    says why in ``cgroup_skipped``); everything else runs."""
    import json
    import os
    import subprocess
    import sys

    bench = _load("household_uneven")
    problem = bench.cgroup_problem()
    out = tmp_path / "uneven.json"
    reps = 2
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "household_uneven.py"),
        *("--model", "resnet", "--px", "16", "--batch", "2", "--reps", str(reps)),
        *("--warmup", "1", "--probe-reps", "1", "--probe-seconds", "0.2", "--compute-reps", "1"),
        *("--json", str(out)),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    rows = d["rows"]
    assert [r["slices"] for r in rows] == ["even", "proportional"]
    assert rows[0]["capacities"] == [1.0, 1.0]
    assert rows[1]["capacities"] == d["probe"]["capacities"]  # measured, not assumed
    for r in rows:
        assert len(r["latency_ms_all"]) == reps and r["latency_ms_median"] > 0
        assert abs(sum(r["channel_shares"]) - 1.0) < 1e-9
        assert r["max_abs_diff_vs_shards"] < 1e-4  # the household computes its plan
        assert r["throttled_node"] == 1
    assert len(d["loadavg_start"]) == 3 and len(d["loadavg_end"]) == 3
    assert d["ratio_even_over_proportional"] > 0 and "met" in d["bar"]
    assert "| even |" in proc.stdout and "even / proportional" in proc.stdout
    if problem is None:
        assert d["cgroup_skipped"] is None
        assert all(r["quota"] == 0.5 for r in rows)
        assert d["cgroup"]["removed"] and not Path(d["cgroup"]["path"]).exists()
        assert "inside the throttled cgroup" in d["probe"]["how"]
    else:  # the throttle alone is skipped, with its reason
        assert d["cgroup_skipped"] == problem and d["cgroup"] is None
        assert all(r["quota"] is None for r in rows)


@pytest.mark.parametrize(("name", "exchange"), [("seg_small_rh", 351488), ("seg_narrow", 175744)])
def test_comm_accuracy_requester_head_cell(name: str, exchange: int) -> None:
    """seg_small_rh (and seg_narrow, at half its width) is partitioned with head="requester":
    no output bytes; its int8 row runs the lock-step node runtime (the other node holds 0
    channels of the head). A row without a figure (earlier runs' int8 rows) prints as n/a."""
    bench = _load("comm_accuracy")
    state = build_model(name).state_dict()
    setting = bench.SETTINGS["quick"][name]
    rows = bench._job((name, 2, 1.0, setting, state, None, 0, "segmentation"))["rows"]
    assert [r["codec"] for r in rows] == ["fp32", "int8"]
    assert 0.0 <= rows[0]["accuracy"] <= 1.0 and 0.0 <= rows[1]["accuracy"] <= 1.0
    assert rows[0]["bytes_per_sample"] == rows[0]["dense_bytes_per_sample"] == 3136 + exchange
    rows[1]["accuracy"] = None
    data = {
        "dense_accuracy": {name: rows[0]["accuracy"]},
        "rows": rows,
        "meta": {"task": "segmentation", "metric": "miou"},
    }
    assert "| n/a |" in _load("summarize").summarize(data)


def test_latency_resnet50_random_calibrated_plans(tmp_path: Path) -> None:
    """bench/latency.py --model resnet50's plans at 64 px, N = 2: the dense-TP plan computes
    the model; every DISCO plan (masks from calibrated random gate logits) is exported with
    its codec, within its byte budget and sync-point limit, and its shards run (overlap on and
    off); the speed table and the latency-vs-link plot take the rows."""
    import torch

    from disco_fl.emulation.comm import program_traffic
    from disco_fl.emulation.export import load_shard, run_shards
    from disco_fl.partition import plan_open_count
    from disco_fl.partition.plan import Plan

    lm = _load("latency_models")
    model, x = lm.load_resnet50(64, 2, seed=0)
    assert lm.parse_plans("0.05:8:int8,0.1:-:fp32,0.05:8:int8:3/1") == [
        (0.05, 8, "int8"),
        (0.1, None, "fp32"),
        (0.05, 8, "int8", (3.0, 1.0)),
    ]
    with pytest.raises(ValueError, match="capacities must be positive"):
        lm.parse_plans("0.05:8:int8:1/0")
    # the recipe, the recipe with the requester holding 3/4 of every layer, and no sync limit
    recipe = [(0.05, 8, "int8"), (0.05, 8, "int8", (3.0, 1.0)), (0.1, None, "fp32")]
    plans = lm.random_calibrated_plans(model, 2, x, tmp_path, recipe, log=lambda _: None)
    assert [p["mode"] for p in plans] == ["dense_tp", "disco", "disco", "disco"]
    shards = [load_shard(plans[0]["dir"] / "plan.json", k) for k in range(2)]
    with torch.no_grad():
        ref = model(x[:1])
    assert torch.allclose(run_shards(shards, x[:1]), ref, rtol=1e-4, atol=1e-4 * ref.abs().max())
    for info, spec in zip(plans[1:], recipe, strict=True):
        budget, max_sync, codec = spec[:3]
        assert (info["budget"], info["max_sync_points"], info["codec"]) == (budget, max_sync, codec)
        caps = info["capacities"]
        assert caps == (list(spec[3]) if len(spec) > 3 else None)
        assert info["masks"] == "random-calibrated" and info["accuracy"] is None
        assert info["overlaps"] == [True, False]
        plan = Plan.load(info["dir"] / "plan.json")
        assert plan.codec == codec
        rep = program_traffic(plan.program, plan_open_count(plan), "fp32")
        assert 0.5 * budget < rep.exchange_fraction <= budget + 1e-9
        assert rep.sync_points <= (max_sync or rep.dense_sync_points)
        shards = [load_shard(info["dir"] / "plan.json", k) for k in range(2)]
        b0, b1 = (sh.param_bytes for sh in shards)
        # 3:1 slices hold ~9:1 of the weights (out x in channels, little exchanged), or even
        assert b0 / b1 > 3.0 if caps else 0.8 < b0 / b1 < 1.25
        for overlap in (True, False):
            y = run_shards(shards, x[:1], overlap=overlap)
            assert y.shape == (1, 1000) and torch.isfinite(y).all()
    assert rep.sync_points > 8  # the last plan has no limit: more sync points
    # the table and the plot of a run's rows
    row = {
        "nodes": 2,
        "link": "1Gbit_0.5ms",
        "sync_points": 8,
        "payload_bytes_per_sample": 1e5,
        "floor_ms": 10.0,
        "node_compute_ms": [9.0, 8.0],
    }
    rows = [
        dict(row, mode="single", nodes=1, budget=None, latency_ms_median=20.0),
        dict(row, mode="dense_tp", budget=None, codec="fp32", latency_ms_median=40.0),
        *(
            dict(row, mode="disco", budget=0.05, max_sync_points=8, codec="int8", link=link)
            | {"overlap": overlap, "latency_ms_median": ms, "speedup_vs_single": 20.0 / ms}
            for link in ("1Gbit_0.5ms", "50Mbit_4ms")
            for overlap, ms in ((True, 12.0), (False, 15.0))
        ),
    ]
    table = lm.speed_table(rows)
    assert (
        "| disco | 2 | 0.05 | 8 | int8 | even | off | 50Mbit_4ms |" in table
        and "| 1.67x |" in table
    )
    plot = _load("latency_plot")
    data = {"rows": rows, "model": "resnet50", "masks": "random-calibrated"}
    links, series = plot.series(data, 2)
    assert links == ["1Gbit_0.5ms", "50Mbit_4ms"]
    disco = [s for s in series if s["mode"] == "disco"]
    assert [s["overlap"] for s in disco] == [True, False] and disco[0]["ms"] == [12.0, 12.0]
    png = tmp_path / "latency.png"
    plot.plot(data, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow(seconds=70)
def test_household_link_runs_tiny(tmp_path: Path) -> None:
    """bench/household_link.py end to end at a tiny setting: a ladder of 3 plans served by 2
    real ``disco-fl serve`` processes through a link that changes twice; one row per phase,
    every plan measured in every phase, the plans of one model."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "link.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "household_link.py"),
        *("--quick", "--phase-s", "8", "--probe-interval", "1"),
        *("--dense-epochs", "1", "--gate-steps", "3", "--requests", "3", "--json", str(out)),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    plans = d["plans"]
    assert len(plans) == 3 and [p["accuracy"] for p in plans] == sorted(
        (p["accuracy"] for p in plans), reverse=True
    )
    assert d["target_ms"] > 0 and d["target_rule"] == _load("household_link").TARGET_RULE
    assert [r["link"] for r in d["rows"]] == ["1Gbit_0.5ms", "20Mbit_4ms", "1Gbit_0.5ms"]
    for r in d["rows"]:
        assert r["requests"] > 0 and r["latency_ms_median"] > 0
        assert set(r["per_plan_latency_ms_median"]) == {p["name"] for p in plans}
        assert r["plan_in_use"] in r["per_plan_latency_ms_median"]
        acc = {p["name"]: p["accuracy"] for p in plans}
        best = r["most_accurate_meeting_target"]
        assert r["bar_met"] == (
            r["meets_target"] and best is not None and acc[r["plan_in_use"]] == acc[best]
        )
    assert d["ladder_status"]["switches"] == len(d["switches"])
    assert d["bar"] == ("met" if all(r["bar_met"] for r in d["rows"]) else "not met")
    assert "| 20Mbit_4ms |" in proc.stdout


def test_latency_uint8_requests_rows(tmp_path: Path) -> None:
    """bench/latency.py --input-dtype uint8 at a tiny setting (resnet50 at 32 px, N = 2, the
    dense-TP plan, one link): requests carry uint8 pixels, the row records ``input_dtype``, and
    the payload the nodes count per image == the plan's prediction for a uint8 input, whose
    input hop is a quarter of fp32's; the adjacent floor uses the mean of the two single-device
    measurements bracketing the row; the interleaved floor, the single device's blocks between
    the household's."""
    from disco_fl.emulation.comm import program_traffic
    from disco_fl.partition import plan_open_count
    from disco_fl.partition.plan import Plan

    lat = _load("latency")
    lm = _load("latency_models")
    model, x = lm.load_resnet50(32, 12, seed=0)  # 5 warm-up requests, then 12 timed
    pixels, x = lat.random_pixels(x.shape)
    meta = {"input": lat.IMAGENET_NORMALIZATION}
    plans = lm.random_calibrated_plans(model, 2, x, tmp_path, [], log=lambda _: None, meta=meta)
    cfg = {"requests": 12, "throughput_images": 0}
    links = {"1Gbit_0.5ms": (1000.0, 0.5)}
    singles = iter([8.0, 12.0])  # the single device right before and right after the row
    blocks: list[range] = []

    def single_block(idx: range) -> list[float]:  # the single device between household blocks
        blocks.append(idx)
        return [6.0 + i for i in idx]

    (row,) = lat.measure_plans(
        plans, 2, links, x, cfg, 10.0, pixels, lambda: next(singles), single_block
    )
    assert blocks == [range(0, 10), range(10, 12)]  # after each block of the household's
    assert row["single_ms_interleaved"] == 11.5  # the median of 6.0 ... 17.0
    assert row["floor_interleaved_ms"] == pytest.approx(11.5 / 2 + row["comm_ms"])
    assert row["latency_over_floor_interleaved"] == pytest.approx(
        row["latency_ms_median"] / row["floor_interleaved_ms"]
    )
    assert row["input_dtype"] == "uint8"
    assert row["single_ms_adjacent"] == 10.0
    assert row["floor_adjacent_ms"] == pytest.approx(10.0 / 2 + row["comm_ms"])
    assert row["latency_over_floor_adjacent"] == pytest.approx(
        row["latency_ms_median"] / row["floor_adjacent_ms"]
    )
    plan = Plan.load(plans[0]["dir"] / "plan.json")
    reps = {
        d: program_traffic(plan.program, plan_open_count(plan), plan.codec, d)
        for d in ("float32", "uint8")
    }
    assert row["payload_bytes_per_sample"] == row["plan_bytes_per_sample"]
    assert row["plan_bytes_per_sample"] == reps["uint8"].bytes_per_sample
    assert reps["uint8"].input_bytes == 3 * 32 * 32 == reps["float32"].input_bytes // 4


def test_wake_penalty_answers_every_receive_with_the_recorded_message(tmp_path: Path) -> None:
    """bench/wake_penalty.py: the recorded messages let one node's program run alone to the
    same output as the whole household, in each mode, one receive per message."""
    import torch

    import disco_fl
    from disco_fl.emulation.export import load_shard, run_shards
    from disco_fl.node import Recv
    from disco_fl.runtime.inference import node_schedule
    from tests.zoo import ZOO

    wp = _load("wake_penalty")
    torch.manual_seed(0)
    x = torch.randn(1, 1, 28, 28)
    disco_fl.partition(ZOO["resnet_narrow"][0]().eval(), 2, x).eval().export(tmp_path)
    nodes = [load_shard(tmp_path / "plan.json", k) for k in range(2)]
    with torch.inference_mode():
        msgs = wp.recorded_messages(nodes, x)
        for k in range(2):
            receives = sum(len(st.in_from) for st in node_schedule(nodes[k]))
            assert len(msgs[k]) == receives > 0
            for mode in ("none", "sleep", "poll", "spin"):
                ms, seen = wp.compute_ms(nodes[k], x, msgs[k], mode, 0.001)
                assert seen == receives and ms > 0
        # node 0 (the requester) alone, fed its recorded messages: the household's output
        run = wp.drive(
            node_schedule(nodes[0]), wp.Executor(nodes[0].program, nodes[0], overlap=True), x
        )
        answers = iter(msgs[0])
        try:
            ev = next(run)
            while True:
                ev = run.send(next(answers)) if isinstance(ev, Recv) else next(run)
        except StopIteration as stop:
            torch.testing.assert_close(stop.value, run_shards(nodes, x), atol=1e-5, rtol=0)


def _narrow_plan(tmp_path: Path) -> Path:
    """An exported 2-node plan of the zoo's narrow ResNet (MNIST-shaped input)."""
    import torch

    import disco_fl
    from tests.zoo import ZOO

    torch.manual_seed(0)
    plan = tmp_path / "plan"
    model = ZOO["resnet_narrow"][0]().eval()
    disco_fl.partition(model, 2, torch.randn(1, 1, 28, 28)).eval().export(plan)
    return plan


def _run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``bench/<name>.py`` with ``args`` in a process of its own; it must succeed."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_latency_timeline_with_op_times(tmp_path: Path) -> None:
    """bench/latency_timeline.py --op-times over two real ``disco-fl serve`` processes: the
    stages of the critical path and, per node, the same ops timed in the household and alone."""
    out = tmp_path / "timeline.json"
    plan = _narrow_plan(tmp_path)
    proc = _run_script("latency_timeline", str(plan), "--requests", "20", "--op-times",
                       "--data-path", "socket", "--json", str(out))  # fmt: skip
    d = json.loads(out.read_text())
    lat = _load("latency_timeline")
    assert d["requests_analyzed"] > 0 and d["median_ms"][lat.TOTAL_KEY] > 0
    ops = d["op_times"]
    assert len(ops["household_ms"]) == len(ops["alone_ms"]) == 2
    for hh, alone in zip(ops["household_ms"], ops["alone_ms"], strict=True):
        assert set(hh) == set(alone) and all(v > 0 for v in hh.values())
    assert "node 1: Executor.compute per request" in proc.stdout


def test_latency_households(tmp_path: Path) -> None:
    """bench/latency_households.py: the same plan in two fresh households of real ``disco-fl
    serve`` processes, a summary per household."""
    out = tmp_path / "households.json"
    plan = _narrow_plan(tmp_path)
    proc = _run_script("latency_households", str(plan), "--households", "2", "--requests", "8",
                       "--json", str(out))  # fmt: skip
    d = json.loads(out.read_text())
    assert d["num_nodes"] == 2 and len(d["households"]) == 2
    for h in d["households"]:
        assert 0 < h["p10_ms"] <= h["median_ms"] <= h["p90_ms"]
        assert len(h["quarters_ms"]) == 4
    assert "household 1: median" in proc.stdout
