"""Plans for a latency target (disco_fl.runtime.serving.latency_target): the documented
accuracy order, the choice on fast and slow links, a clear error when nothing meets the target,
one latency model with link_plans, and `disco-fl train --latency-target-ms`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import disco_fl
from disco_fl.cli.main import main
from disco_fl.emulation.budget import calibrate_masks
from disco_fl.emulation.export import model_digest
from disco_fl.emulation.model import PartitionedModel
from disco_fl.partition.plan import Plan, plan_of
from disco_fl.runtime.serving.latency_target import (
    Candidate,
    LatencyTargetError,
    choose_for_latency,
    dense_compute_ms,
    parse_link,
)
from disco_fl.runtime.serving.link_plans import LadderPlan, LinkEstimate, plan_traffic, predict_ms
from tests.zoo import ZOO


def _pm(name: str = "resnet_narrow", seed: int = 0) -> PartitionedModel:
    build, shape = ZOO[name]
    torch.manual_seed(seed)
    return disco_fl.partition(build().eval(), 2, torch.randn(*shape)).eval()


def _train_gates(pm: PartitionedModel, seed: int) -> None:
    """Stand-in for trained gates: random logits (so masks are not the cheapest-first ones)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 2)


def _masks(pm: PartitionedModel) -> list[torch.Tensor]:
    return [g.mask(d).clone() for _, _, d, g in pm.gate_items()]


def _before(a: Candidate, b: Candidate) -> bool:
    """The documented accuracy order, written out: a higher budget first; at equal budget no
    limit, then more sync points; fp32 before int8 only at equal budget and limit."""
    if a.budget != b.budget:
        return a.budget > b.budget
    if a.max_sync_points != b.max_sync_points:
        return a.max_sync_points is None or (
            b.max_sync_points is not None and a.max_sync_points > b.max_sync_points
        )
    return (a.codec, b.codec) == ("fp32", "int8")


def _first_meeting(rows: tuple[Candidate, ...], target: float) -> Candidate:
    valid = [r for r in rows if r.predicted_ms is not None]
    return next(r for r in valid if r.predicted_ms is not None and r.predicted_ms <= target)


def test_fast_link_keeps_every_channel() -> None:
    pm = _pm()
    link = LinkEstimate(1e9, 1e-4)  # 1 Gbit/s, 0.1 ms
    c = choose_for_latency(pm, link, target_ms=50.0, compute_ms=1.0)
    assert (c.budget, c.max_sync_points, c.codec) == (1.0, None, "fp32")
    assert c.predicted_ms <= 50.0 and c.traffic == c.candidates[0].traffic
    # the table is in the documented order, skipped settings included
    rows = c.candidates
    assert all(
        not _before(rows[j], rows[i]) for i in range(len(rows)) for j in range(i + 1, len(rows))
    )


def test_slow_link_gives_up_budget_precision_and_sync_points() -> None:
    pm = _pm()
    link = parse_link("20/2")  # 20 Mbit/s, 2 ms round trip
    c = choose_for_latency(pm, link, target_ms=8.0, compute_ms=1.0)
    assert c.predicted_ms <= 8.0
    assert (c.budget, c.max_sync_points, c.codec) != (1.0, None, "fp32")
    assert c.budget < 1.0 and c.max_sync_points is not None  # 15 hops alone are 15 ms
    pick = _first_meeting(c.candidates, 8.0)
    assert (pick.budget, pick.max_sync_points, pick.codec) == (c.budget, c.max_sync_points, c.codec)
    # every setting the order puts first is predicted to miss the target
    for r in c.candidates:
        if r is pick:
            break
        assert r.skipped is not None or (r.predicted_ms is not None and r.predicted_ms > 8.0)
    # a looser target on the same link keeps more: never a less accurate setting
    loose = choose_for_latency(pm, link, target_ms=20.0, compute_ms=1.0)
    key = [(r.budget, r.max_sync_points, r.codec) for r in c.candidates]
    assert key.index((loose.budget, loose.max_sync_points, loose.codec)) < key.index(
        (c.budget, c.max_sync_points, c.codec)
    )


def test_impossible_target_names_the_fastest_candidate() -> None:
    pm = _pm()
    link = parse_link("100/2")
    with pytest.raises(LatencyTargetError) as err:
        choose_for_latency(pm, link, target_ms=2.0, compute_ms=1.0)
    valid = [r for r in err.value.candidates if r.predicted_ms is not None]
    fastest = min(valid, key=lambda r: r.predicted_ms or 0.0)
    assert fastest.predicted_ms is not None and fastest.predicted_ms > 2.0
    msg = str(err.value)
    assert f"predicted at {fastest.predicted_ms:.2f} ms" in msg
    assert "budget 0, sync limit -, int8" in msg  # input and output hops only, int8
    with pytest.raises(ValueError, match="target_ms"):
        choose_for_latency(pm, link, target_ms=0.0, compute_ms=1.0)
    with pytest.raises(ValueError, match="compute_ms"):
        choose_for_latency(pm, link, target_ms=5.0, compute_ms=-1.0)


def test_choice_is_deterministic_and_leaves_the_masks() -> None:
    pm = _pm()
    _train_gates(pm, 1)
    calibrate_masks(pm, 0.3)
    masks = _masks(pm)
    link = parse_link("50/4")
    a = choose_for_latency(pm, link, 15.0, 0.5)
    b = choose_for_latency(pm, link, 15.0, 0.5)
    assert a == b
    assert all(torch.equal(m, n) for m, n in zip(masks, _masks(pm), strict=True))
    # the same model partitioned again (same gates) gives the same table
    again = _pm()
    _train_gates(again, 1)
    assert choose_for_latency(again, link, 15.0, 0.5) == a


def test_prediction_is_predict_ms_of_the_exported_plan(tmp_path: Path) -> None:
    """One latency model: a candidate's prediction (exact, for trained gates) is link_plans'
    predict_ms of the plan exported with its masks; the default bound never predicts less."""
    pm = _pm()
    _train_gates(pm, 2)
    link = LinkEstimate(30e6, 3e-3, frame_s=1e-4)
    exact = choose_for_latency(pm, link, 12.0, 0.7, upper_bound=False)
    for r in exact.candidates:
        if r.skipped is not None:
            continue
        calibrate_masks(pm, r.budget, r.max_sync_points)
        traffic = plan_traffic(plan_of(pm, r.codec))
        assert r.traffic == traffic
        rung = LadderPlan(tmp_path, "h", 0.0, 0.7, traffic)
        assert r.predicted_ms == predict_ms(rung, link)
    calibrate_masks(pm, exact.budget, exact.max_sync_points)
    digest = model_digest(ZOO["resnet_narrow"][0]())
    pm.export(tmp_path / "plan", codec=exact.codec, meta={"model_sha256": digest, "accuracy": 0.9})
    plan = Plan.load(tmp_path / "plan" / "plan.json")
    rung = LadderPlan(tmp_path / "plan", plan.hash, 0.9, 0.7, plan_traffic(plan))
    assert predict_ms(rung, link) == exact.predicted_ms
    bound = choose_for_latency(pm, link, 12.0, 0.7)
    for r, e in zip(bound.candidates, exact.candidates, strict=True):
        assert (r.budget, r.max_sync_points, r.codec) == (e.budget, e.max_sync_points, e.codec)
        if r.traffic is None or e.traffic is None:
            continue
        assert r.traffic.hops >= e.traffic.hops
        assert r.traffic.busiest_link_bytes >= e.traffic.busiest_link_bytes
        if r.budget in (0.0, 1.0):  # no gate training: the masks are known
            assert r.traffic == e.traffic
        elif r.max_sync_points is None:  # training may open every layer that can exchange
            assert r.traffic.hops == pm.comm_report().dense_sync_points + 2


def test_a_limit_below_the_normalization_layers_is_skipped() -> None:
    pm = _pm("user")  # GroupNorm across nodes twice and a LayerNorm: 3 statistics layers
    c = choose_for_latency(pm, parse_link("100/2"), 100.0, 1.0)
    skipped = [r for r in c.candidates if r.skipped and "normalization" in r.skipped]
    assert {r.max_sync_points for r in skipped} == {2}
    assert all(r.predicted_ms is None for r in skipped)
    assert {
        r.max_sync_points for r in c.candidates if r.budget in (0.0, 1.0) and not r.skipped
    } == {None}


def test_link_and_compute_estimate() -> None:
    assert parse_link("100/2") == LinkEstimate(100e6, 0.002)
    for bad in ("100", "a/2", "100/2/3", "0/2", "100/-1"):
        with pytest.raises(ValueError):
            parse_link(bad)
    build, shape = ZOO["resnet_narrow"]
    model = build().train()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # not 1 (an xdist worker's): the restore below is then seen
    try:
        ms = dense_compute_ms(model, torch.randn(*shape), 2, warmup=1, runs=3)
        assert ms > 0 and model.training and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def _small_data(tmp_path: Path) -> Path:
    from disco_fl.data import load_builtin

    images, labels = load_builtin()
    data = tmp_path / "small.npz"
    pick = np.random.default_rng(0).choice(len(labels), 300, replace=False)
    np.savez(data, images=images[pick], labels=labels[pick])
    return data


def test_train_to_a_latency_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _small_data(tmp_path)
    out_json = tmp_path / "s.json"
    rc = main(
        [
            "train", "--data", str(data), "--nodes", "2",
            "--latency-target-ms", "8", "--link", "20/2", "--compute-ms", "1",
            "--dense-epochs", "1", "--gate-epochs", "1", "--finetune-epochs", "1",
            "--out", str(tmp_path / "run"), "--json", str(out_json),
        ]
    )  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert "candidates for 8 ms" in err and "chosen: budget" in err
    s = json.loads(out_json.read_text())
    plan = Plan.load(tmp_path / "run" / "plan" / "plan.json")
    lat = plan.meta["latency_target"]
    assert lat == s["latency_target"]
    assert lat["target_ms"] == 8.0 and lat["compute_ms"] == 1.0
    assert lat["compute_ms_source"] == "given"
    assert lat["link"] == {"bandwidth_bps": 20e6, "rtt_s": 0.002, "frame_s": 0.0}
    assert (lat["budget"], lat["max_sync_points"], lat["codec"]) == (
        s["budget"],
        s["max_sync_points"],
        s["codec"],
    )
    assert plan.codec == lat["codec"] and lat["predicted_ms"] <= 8.0
    # the choice is the chooser's on the untrained gates of the same partition
    build, shape = ZOO["resnet_narrow"]
    ref = choose_for_latency(
        disco_fl.partition(build(), 2, torch.randn(*shape)), parse_link("20/2"), 8.0, 1.0
    )
    assert (ref.budget, ref.max_sync_points, ref.codec) == (
        lat["budget"],
        lat["max_sync_points"],
        lat["codec"],
    )
    # after training: the exported plan's own prediction, as a plan ladder predicts it
    traffic = plan_traffic(plan)
    rung = LadderPlan(tmp_path / "run" / "plan", plan.hash, 0.0, 1.0, traffic)
    assert lat["predicted_ms_trained"] == pytest.approx(predict_ms(rung, parse_link("20/2")))
    assert lat["meets_target"] == (lat["predicted_ms_trained"] <= 8.0)
    if lat["max_sync_points"] is not None:  # training kept the limit
        assert traffic.hops <= lat["max_sync_points"] + 2
    assert s["shard_vs_emulation_max_abs_diff"] < 1e-4


def test_latency_target_refusals_and_the_compute_estimate(tmp_path: Path) -> None:
    common = ["train", "--nodes", "2", "--out", str(tmp_path / "r")]
    target = ["--latency-target-ms", "10", "--link", "20/2"]
    for extra in (["--budget", "0.2"], ["--codec", "int8"], ["--max-sync-points", "4"]):
        assert main([*common, *target, *extra]) == 2  # the target chooses these
    assert main([*common, "--link", "20/2"]) == 2  # a link without a target
    assert main([*common, "--latency-target-ms", "10"]) == 2  # a target without a link
    assert main([*common, *target, "--compute-ms", "-1"]) == 2
    assert main([*common, "--input-dtype", "uint8"]) == 2  # an input dtype without a target
    assert not (tmp_path / "r").exists()  # refused before any training
    # without --compute-ms: the dense forward's estimate; a loose target keeps every channel
    out_json = tmp_path / "s.json"
    rc = main(
        [
            "train", "--data", str(_small_data(tmp_path)), "--nodes", "2",
            "--latency-target-ms", "1000", "--link", "100/2", "--input-dtype", "uint8",
            "--dense-epochs", "0", "--gate-epochs", "0", "--finetune-epochs", "0",
            "--out", str(tmp_path / "run"), "--json", str(out_json),
        ]
    )  # fmt: skip
    assert rc == 0
    lat = json.loads(out_json.read_text())["latency_target"]
    assert lat["compute_ms_source"] == "estimate" and 0 < lat["compute_ms"] < 1000
    assert (lat["budget"], lat["max_sync_points"], lat["codec"]) == (1.0, None, "fp32")
    assert lat["meets_target"] and lat["predicted_ms_trained"] == pytest.approx(lat["predicted_ms"])
    # requests of uint8 pixels: the input hop counted at 1 byte per pixel
    plan = Plan.load(tmp_path / "run" / "plan" / "plan.json")
    assert lat["input_dtype"] == "uint8"
    traffic = plan_traffic(plan, 1, "uint8")
    rung = LadderPlan(tmp_path / "run" / "plan", plan.hash, 0.0, lat["compute_ms"], traffic)
    assert lat["predicted_ms_trained"] == pytest.approx(predict_ms(rung, parse_link("100/2")))


def test_max_sync_points_is_a_plain_train_option(tmp_path: Path) -> None:
    out_json = tmp_path / "s.json"
    rc = main(
        [
            "train", "--data", str(_small_data(tmp_path)), "--nodes", "2",
            "--budget", "0.3", "--max-sync-points", "3",
            "--dense-epochs", "0", "--gate-epochs", "0", "--finetune-epochs", "0",
            "--out", str(tmp_path / "run"), "--json", str(out_json),
        ]
    )  # fmt: skip
    assert rc == 0
    s = json.loads(out_json.read_text())
    assert s["max_sync_points"] == 3 and s["latency_target"] is None
    assert 0 < s["sync_points"] <= 3  # without the limit: 8 layers at this budget
    plan = Plan.load(tmp_path / "run" / "plan" / "plan.json")
    assert "latency_target" not in plan.meta and plan_traffic(plan).hops <= 3 + 2
